"""Techniques, one family per file, each a Transform (see ``hina_kohya.core.chain``)."""

from .moments import ScaleByAdam

__all__ = ["ScaleByAdam"]
