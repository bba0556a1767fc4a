"""Recipes: which transforms, in which order, with which defaults. No math lives here."""

from ._variants import eight_bit_variant
from .adaptive_hina_adamw import AdaptiveHinaAdamW
from .automagic import (Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved,
                        ImprovedOptimizerConfig, OptimizerConfig, create_full_finetune_optimizer,
                        create_lora_optimizer)
from .hina_adamw import HinaAdamW, HinaAdamWOptimizer
from ..transforms.spatial import RegularizationStrategy

HinaAdamW8bit = eight_bit_variant(HinaAdamW, "HinaAdamW8bit")
AdaptiveHinaAdamW8bit = eight_bit_variant(AdaptiveHinaAdamW, "AdaptiveHinaAdamW8bit")
Automagic_CameAMP8bit = eight_bit_variant(Automagic_CameAMP, "Automagic_CameAMP8bit")
Automagic_CameAMP_COptim8bit = eight_bit_variant(Automagic_CameAMP_COptim, "Automagic_CameAMP_COptim8bit")

__all__ = ["AdaptiveHinaAdamW", "AdaptiveHinaAdamW8bit", "Automagic_CameAMP", "Automagic_CameAMP8bit",
           "Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim8bit", "Automagic_CameAMP_Improved", "HinaAdamW",
           "HinaAdamW8bit", "HinaAdamWOptimizer", "ImprovedOptimizerConfig", "OptimizerConfig",
           "RegularizationStrategy", "create_full_finetune_optimizer", "create_lora_optimizer"]
