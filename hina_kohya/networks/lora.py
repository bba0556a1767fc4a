"""``--network_module hina_kohya.networks.lora``: sd-scripts' LoRA for SD1/SD2/SDXL (``networks.lora``) with named, decay-split optimizer groups."""

from ._wrap import SD_SCRIPTS, expose

create_network, create_network_from_weights, __getattr__ = expose(__name__, "networks.lora", SD_SCRIPTS)
