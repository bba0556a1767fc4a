"""``--network_module hina_kohya.networks.lora_anima``: sd-scripts' Anima LoRA (``networks.lora_anima``) with named, decay-split optimizer groups."""

from ._wrap import SD_SCRIPTS, expose

create_network, create_network_from_weights, __getattr__ = expose(__name__, "networks.lora_anima", SD_SCRIPTS)
