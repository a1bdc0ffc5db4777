"""Muon's per-leaf dimension numbers, from the axes ``infer_output_axes`` read."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_gc._axes import path_str
from optax_gc._infer import InferredAxes

_NEEDED = "optax >= 0.2.6"


def _dimension_numbers_class() -> Any:
    """``optax.contrib.MuonDimensionNumbers``, or an error naming the version."""
    contrib = getattr(optax, "contrib", None)
    has_muon = hasattr(contrib, "muon")
    cls = getattr(contrib, "MuonDimensionNumbers", None)
    if cls is None:
        has = (
            "optax.contrib.muon but not optax.contrib.MuonDimensionNumbers"
            if has_muon
            else "no optax.contrib.muon"
        )
        raise ImportError(
            "optax_gc.muon_dimension_numbers needs optax.contrib.muon with "
            "muon_weight_dimension_numbers= and optax.contrib.MuonDimensionNumbers "
            f"({_NEEDED}); the installed optax {optax.__version__} has {has}. "
            f"Upgrade it: pip install -U 'optax>=0.2.6'."
        )
    return cls


def _leaf_numbers(
    cls: Any, leaf: Any, kept: Any, stacked: tuple[int, ...]
) -> Any | None:
    """One leaf's ``MuonDimensionNumbers``, or ``None`` (Muon's Adam fallback)."""
    shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if kept is None or shape is None or dtype is None:
        return None
    if not jnp.issubdtype(dtype, jnp.inexact):  # bfloat16 is no numpy inexact
        return None
    ndim = len(shape)
    kept = {a % ndim for a in kept}
    batch = {a % ndim for a in stacked}
    output = tuple(a for a in range(ndim) if a in kept and a not in batch)
    reduction = tuple(a for a in range(ndim) if a not in kept)
    rows = math.prod(shape[a] for a in reduction)
    cols = math.prod(shape[a] for a in output)
    if rows < 2 or cols < 2:  # a vector (or nothing) per matrix: not Muon's case
        return None
    return cls(reduction_axis=reduction, output_axis=output)


def muon_dimension_numbers(rule: InferredAxes, params: optax.Params) -> optax.Params:
    r"""Muon's ``muon_weight_dimension_numbers``, from an inferred axes rule.

    :func:`optax.contrib.muon` orthogonalizes each weight's momentum as a
    stack of matrices: for every leaf it needs a
    ``optax.contrib.MuonDimensionNumbers(reduction_axis, output_axis)``, all
    other axes being batch axes (one matrix each, via ``vmap``), or ``None``
    to leave the leaf to its Adam fallback. Its default treats 2-D leaves
    only, as ``(in, out)``. The rule :func:`optax_gc.infer_output_axes`
    returns already read every leaf's roles from the computation, which are
    the same ones GC needs; this translates them, leaf by leaf:

    * the *reduction* axes are the leaf's fan-in: the axes contracted with
      the layer's input (GC's mean is taken over them);
    * the *batch* axes are the kept axes that stack layers or ensemble
      members (``nn.scan``, ``lax.scan``, a loop over a stack, ``vmap``):
      those ``rule.stacked`` lists;
    * the *output* axes are the other kept axes, which index output units.

    A DenseGeneral or attention q/k/v kernel ``(in, H, D)`` gets reduction
    ``(0,)`` and output ``(1, 2)`` (one ``in x H*D`` matrix), an attention
    out-projection ``(H, D, out)`` reduction ``(0, 1)`` and output ``(2,)``,
    a convolution ``(kh, kw, in, out)`` reduction ``(0, 1, 2)`` and output
    ``(3,)``, an Equinox ``(out, in)`` weight reduction ``(1,)`` and output
    ``(0,)``, and an ``nn.scan``-stacked kernel ``(L, in, out)`` reduction
    ``(1,)`` and output ``(2,)``: ``L`` matrices, never one across layers.
    Axes are non-negative and ascending, in tuples. One stack is not
    recognised: a weight mapped by ``vmap`` against data that is not mapped
    (``in_axes=(0, None)``, the first layer of an ensemble on a shared
    input) computes exactly what a DenseGeneral kernel with two output axes
    does, so its member axis is an output axis here (one matrix across the
    members); check ``rule.stacked`` for such leaves.

    ``None`` (Adam) is given to: every leaf the rule leaves alone (embedding
    tables and other lookups, tied embeddings, biases, norm scales, leaves
    whose uses disagree, unsupported ops; ``rule.decisions`` says why), leaves
    that are not floating-point arrays, and leaves whose matrices would be
    vectors or empty: fewer than 2 entries along the reduction axes or along
    the output axes (a ``Dense(1)`` head ``(in, 1)``, a layer with one input
    feature ``(1, out)``, a stack of vectors ``(L, in)`` contracted to one
    unit per layer, zero-size leaves). Orthogonalizing a vector only
    normalizes it, so such a leaf is no matrix for Muon, as a 1-D leaf is
    not; ``optax.contrib.muon``'s own default would still give a 2-D
    ``(in, 1)`` leaf to Muon. Size-1 axes elsewhere are kept in their set: a
    ``(in, 1, D)`` kernel has output ``(1, 2)``.

    Every matrix leaf goes to Muon, the first layer and the classifier head
    included: which layer reads the input or feeds the loss is not a
    property of its weight. Jordan et al. (2024) advise giving those two to
    Adam; set their entries of the returned tree to ``None`` where you agree.

    GC composes exactly with Muon, in ``optax.chain(optax_gc.centralize(
    output_axes=rule), muon)``: the reduction axes are GC's fan-in, Muon's
    momentum is linear, and a Newton-Schulz step maps a matrix :math:`X` to
    :math:`X p(X^\top X)` for a polynomial :math:`p`, so when each output
    unit's column sums to zero, it still does after. For the leaves Muon
    orthogonalizes, the update of a centred gradient is centred and every
    output unit's mean weight stays fixed (up to Muon's weight decay, added
    after the orthogonalization); leaves GC centres that go to the Adam
    fallback (a ``Dense(1)`` head) get Adam's update of a centred gradient,
    which is not centred.
    Whether that helps training has not been measured.

    Args:
      rule: what :func:`optax_gc.infer_output_axes` returned, inferred from a
        tree with the structure of ``params``. Hand-written rules
        (:func:`optax_gc.path_rules`, :func:`optax_gc.per_leaf`) do not say
        which kept axes are stacks, so they are refused.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``; only shapes
        and dtypes are read), as given to the optimizer.

    Returns:
      A tree with the structure of ``params``: a
      ``MuonDimensionNumbers(reduction_axis=tuple, output_axis=tuple)`` for
      each leaf Muon should orthogonalize, ``None`` for the others. Pass it
      as ``muon_weight_dimension_numbers`` to :func:`optax.contrib.muon`, or
      ``lambda p: muon_dimension_numbers(rule, p)`` where the tree is only
      known later.

    Raises:
      ImportError: if the installed optax has no
        ``optax.contrib.MuonDimensionNumbers`` (optax < 0.2.6); the message
        names the installed version.
      TypeError: if ``rule`` is not an :class:`InferredAxes`.
      ValueError: if ``params`` has a leaf the rule was not inferred from, or
        one whose shape differs from that leaf's; the message names its path.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax
      >>> import optax_gc
      >>> def model(p, x):  # three layers stacked and scanned, then a head
      ...     h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
      ...     return h @ p["head"] + p["b"]
      >>> params = {"w": jnp.zeros((3, 8, 8)), "head": jnp.zeros((8, 4)),
      ...           "b": jnp.zeros((1, 4))}
      >>> x = jnp.zeros((2, 8))
      >>> rule = optax_gc.infer_output_axes(model, params, x)
      >>> dims = optax_gc.muon_dimension_numbers(rule, params)
      >>> for path, d in dims.items():
      ...     print(path, d)
      b None
      head MuonDimensionNumbers(reduction_axis=(0,), output_axis=(1,))
      w MuonDimensionNumbers(reduction_axis=(1,), output_axis=(2,))
      >>> tx = optax.contrib.muon(1e-2, muon_weight_dimension_numbers=dims)
      >>> state = tx.init(params)

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.

      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024.
    """
    cls = _dimension_numbers_class()
    if not isinstance(rule, InferredAxes):
        raise TypeError(
            "optax_gc.muon_dimension_numbers takes the rule "
            "optax_gc.infer_output_axes returns, which knows which kept axes "
            f"stack layers; got {type(rule).__name__}. For hand-written axes, "
            "write optax.contrib.MuonDimensionNumbers by hand."
        )

    def leaf_fn(path: jax.tree_util.KeyPath, leaf: Any) -> Any:
        kept, _ = rule.decide(path, leaf)  # raises for a leaf it never saw
        return _leaf_numbers(cls, leaf, kept, rule.stacked.get(path_str(path), ()))

    return jax.tree_util.tree_map_with_path(leaf_fn, params)
