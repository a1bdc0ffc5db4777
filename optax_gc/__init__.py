"""optax_gc: Gradient Centralization for JAX and Optax, on every JAX layout."""

import importlib.metadata

from optax_gc._alias import gc_adam, gc_adamw, gc_sgd, with_gc
from optax_gc._transform import (
    AxesLike,
    OutputAxes,
    OutputAxesFn,
    centralize,
    centralize_array,
    gc_fraction,
)
from optax_gc._utils import path_rules

__version__ = importlib.metadata.version("optax-gc")

__all__ = [
    "AxesLike",
    "OutputAxes",
    "OutputAxesFn",
    "centralize",
    "centralize_array",
    "gc_adam",
    "gc_adamw",
    "gc_fraction",
    "gc_sgd",
    "path_rules",
    "with_gc",
]
