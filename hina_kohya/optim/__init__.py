"""Recipes: which transforms, in which order, with which defaults. No math lives here."""

from ._variants import eight_bit_variant
from .hina_adamw import HinaAdamW, HinaAdamWOptimizer

HinaAdamW8bit = eight_bit_variant(HinaAdamW, "HinaAdamW8bit")

__all__ = ["HinaAdamW", "HinaAdamW8bit", "HinaAdamWOptimizer"]
