"""``--network_module hina_kohya.networks.lora_sd3``: sd-scripts' SD3 LoRA (``networks.lora_sd3``) with named, decay-split optimizer groups."""

from ._wrap import SD_SCRIPTS, expose

create_network, create_network_from_weights, __getattr__ = expose(__name__, "networks.lora_sd3", SD_SCRIPTS)
