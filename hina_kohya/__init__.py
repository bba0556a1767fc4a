"""hina-kohya: the Hina optimizer family for kohya sd-scripts and LyCORIS.

    from hina_kohya import HinaAdamW, create_optimizer
    opt = HinaAdamW(network.parameters(), lr=1e-4, ...)
"""

from .args import OptimizerArgumentError, UnknownOptimizerArgument, parse_optimizer_args
from .optim import AdaptiveHinaAdamW, AdaptiveHinaAdamW8bit, HinaAdamW, HinaAdamW8bit, HinaAdamWOptimizer
from .registry import OptimizerSpec, create_optimizer, get_optimizer_class, get_spec, list_optimizers

__version__ = "0.1.0"

__all__ = [
    "AdaptiveHinaAdamW", "AdaptiveHinaAdamW8bit", "HinaAdamW", "HinaAdamW8bit", "HinaAdamWOptimizer", "OptimizerArgumentError", "OptimizerSpec",
    "UnknownOptimizerArgument", "create_optimizer", "get_optimizer_class", "get_spec", "list_optimizers",
    "parse_optimizer_args",
]
