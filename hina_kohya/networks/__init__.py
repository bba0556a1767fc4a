"""Wrapper network modules for sd-scripts' ``--network_module``: the wrapped module's networks,
whose optimizer groups carry parameter names and separate no-decay groups.

| ``--network_module`` | wraps |
|---|---|
| ``hina_kohya.networks.lycoris`` | ``lycoris.kohya`` (LyCORIS: LoRA/LoCon, LoHa, LoKr, ...) |
| ``hina_kohya.networks.lora`` | sd-scripts ``networks.lora`` (SD1/SD2/SDXL) |
| ``hina_kohya.networks.lora_flux`` / ``lora_sd3`` / ``lora_lumina`` / ``lora_anima`` / ``lora_hunyuan_image`` | the sd-scripts modules of those names |
| ``hina_kohya.networks.dylora`` | sd-scripts ``networks.dylora`` |

Importing one also installs the short optimizer names into sd-scripts (``hina_kohya.kohya``).
This package's ``__init__`` imports none of them: each needs its wrapped module.
"""
