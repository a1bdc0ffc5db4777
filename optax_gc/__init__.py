"""optax_gc: Gradient Centralization for JAX and Optax, on every JAX layout."""

import importlib.metadata

from optax_gc._alias import gc_adam, gc_adamw, gc_sgd
from optax_gc._axes import (
    AxesLike,
    AxesTree,
    OutputAxes,
    OutputAxesFn,
    PerLeaf,
    per_leaf,
)
from optax_gc._diagnostics import Explanation, LeafReport, explain, gc_fraction
from optax_gc._infer import InferredAxes, infer_output_axes
from optax_gc._muon import muon_dimension_numbers
from optax_gc._path_rules import PathRules, path_rules
from optax_gc._placement import Location, with_gc
from optax_gc._transform import centralize, centralize_array
from optax_gc._warnings import (
    InferenceWarning,
    LayoutWarning,
    OptaxGCWarning,
    ScheduleFreeWarning,
    UnmatchedPatternWarning,
)

__version__ = importlib.metadata.version("optax-gc")

__all__ = [
    "AxesLike",
    "AxesTree",
    "Explanation",
    "InferenceWarning",
    "InferredAxes",
    "LayoutWarning",
    "LeafReport",
    "Location",
    "OptaxGCWarning",
    "OutputAxes",
    "OutputAxesFn",
    "PathRules",
    "PerLeaf",
    "ScheduleFreeWarning",
    "UnmatchedPatternWarning",
    "centralize",
    "centralize_array",
    "explain",
    "gc_adam",
    "gc_adamw",
    "gc_fraction",
    "gc_sgd",
    "infer_output_axes",
    "muon_dimension_numbers",
    "path_rules",
    "per_leaf",
    "with_gc",
]
