"""``--network_module hina_kohya.networks.lycoris``: LyCORIS' kohya network (``lycoris.kohya``) with named, decay-split optimizer groups."""

from ._wrap import LYCORIS, expose

create_network, create_network_from_weights, __getattr__ = expose(__name__, "lycoris.kohya", LYCORIS)
