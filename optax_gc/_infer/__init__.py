"""``infer_output_axes``: output axes read from the computation."""

from optax_gc._infer._interpreter import InferredAxes, infer_output_axes

__all__ = ["InferredAxes", "infer_output_axes"]
