"""optax_gc: Gradient Centralization for JAX and Optax, on every JAX layout."""

import importlib.metadata

from optax_gc._alias import gc_adam, gc_adamw, gc_sgd
from optax_gc._axes import AxesLike, OutputAxes, OutputAxesFn
from optax_gc._diagnostics import Explanation, LeafReport, explain, gc_fraction
from optax_gc._infer import InferredAxes, infer_output_axes
from optax_gc._path_rules import PathRules, UnmatchedPatternWarning, path_rules
from optax_gc._placement import Location, with_gc
from optax_gc._transform import centralize, centralize_array

__version__ = importlib.metadata.version("optax-gc")

__all__ = [
    "AxesLike",
    "Explanation",
    "InferredAxes",
    "LeafReport",
    "Location",
    "OutputAxes",
    "OutputAxesFn",
    "PathRules",
    "UnmatchedPatternWarning",
    "centralize",
    "centralize_array",
    "explain",
    "gc_adam",
    "gc_adamw",
    "gc_fraction",
    "gc_sgd",
    "infer_output_axes",
    "path_rules",
    "with_gc",
]
