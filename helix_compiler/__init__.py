"""Helix: partition transformer attention over n head groups x m head-dim slices."""

from .api import helix_compile, plan_model
from .errors import HelixError
from .program import HelixProgram, load_rank_module
from .weights import empty_weights

__all__ = ["helix_compile", "plan_model", "HelixError", "HelixProgram", "load_rank_module", "empty_weights"]
