"""``--network_module hina_kohya.networks.lora_hunyuan_image``: sd-scripts' HunyuanImage LoRA (``networks.lora_hunyuan_image``) with named, decay-split optimizer groups."""

from ._wrap import SD_SCRIPTS, expose

create_network, create_network_from_weights, __getattr__ = expose(__name__, "networks.lora_hunyuan_image", SD_SCRIPTS)
