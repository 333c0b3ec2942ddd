"""Template matching with learned templates (matching pursuit)."""

from .peel import low_rank, match

__all__ = ["match", "low_rank"]
