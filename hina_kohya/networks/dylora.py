"""``--network_module hina_kohya.networks.dylora``: sd-scripts' DyLoRA (``networks.dylora``) with named, decay-split optimizer groups."""

from ._wrap import SD_SCRIPTS, expose

create_network, create_network_from_weights, __getattr__ = expose(__name__, "networks.dylora", SD_SCRIPTS)
