"""hina-kohya: the Hina optimizer family for kohya sd-scripts and LyCORIS.

    from hina_kohya import HinaAdamW, create_optimizer
    opt = HinaAdamW(network.parameters(), lr=1e-4, ...)
"""

from .args import OptimizerArgumentError, UnknownOptimizerArgument, parse_optimizer_args
from .optim import (AdaptiveHinaAdamW, AdaptiveHinaAdamW8bit, Automagic_CameAMP, Automagic_CameAMP8bit,
                    Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit, Automagic_CameAMP_Improved, HinaAdamW,
                    HinaAdamW8bit, HinaAdamWOptimizer, ImprovedOptimizerConfig, OptimizerConfig,
                    RegularizationStrategy, create_full_finetune_optimizer, create_lora_optimizer)
from .registry import OptimizerSpec, create_optimizer, get_optimizer_class, get_spec, list_optimizers

__version__ = "0.2.0"

__all__ = [
    "AdaptiveHinaAdamW", "AdaptiveHinaAdamW8bit", "Automagic_CameAMP", "Automagic_CameAMP8bit",
    "Automagic_CameAMP_COptim", "Automagic_CameAMP_COptim8bit", "Automagic_CameAMP_Improved", "HinaAdamW",
    "HinaAdamW8bit", "HinaAdamWOptimizer", "ImprovedOptimizerConfig", "OptimizerArgumentError", "OptimizerConfig",
    "OptimizerSpec", "RegularizationStrategy", "create_full_finetune_optimizer", "create_lora_optimizer",
    "UnknownOptimizerArgument", "create_optimizer", "get_optimizer_class", "get_spec", "list_optimizers",
    "parse_optimizer_args",
]
