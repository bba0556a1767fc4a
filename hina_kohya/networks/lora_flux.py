"""``--network_module hina_kohya.networks.lora_flux``: sd-scripts' FLUX.1 LoRA (``networks.lora_flux``) with named, decay-split optimizer groups."""

from ._wrap import SD_SCRIPTS, expose

create_network, create_network_from_weights, __getattr__ = expose(__name__, "networks.lora_flux", SD_SCRIPTS)
