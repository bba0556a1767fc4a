"""The engine: optimizer loop, transform protocol, precision and state storage."""

from .chain import Bucket, Chain, StateSpec, Transform
from .optimizer import HinaOptimizer
from .quant import StateStore, dynamic_map

__all__ = ["Bucket", "Chain", "HinaOptimizer", "StateSpec", "StateStore", "Transform", "dynamic_map"]
