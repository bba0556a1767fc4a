"""Recipes: which transforms, in which order, with which defaults. No math lives here."""

from ._variants import eight_bit_variant
from .adaptive_hina_adamw import AdaptiveHinaAdamW
from .hina_adamw import HinaAdamW, HinaAdamWOptimizer

HinaAdamW8bit = eight_bit_variant(HinaAdamW, "HinaAdamW8bit")
AdaptiveHinaAdamW8bit = eight_bit_variant(AdaptiveHinaAdamW, "AdaptiveHinaAdamW8bit")

__all__ = ["AdaptiveHinaAdamW", "AdaptiveHinaAdamW8bit", "HinaAdamW", "HinaAdamW8bit", "HinaAdamWOptimizer"]
