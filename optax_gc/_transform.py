"""Gradient Centralization (GC) as an optax gradient transformation."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from optax_gc._axes import (
    DEFAULT_OUTPUT_AXES,
    AxesLike,
    LeafRule,
    OutputAxes,
    check_axes_spec,
    fan_in_axes,
    fan_in_size,
    leaf_where,
    map_leaves,
    normalize_axes,
)


def centring_dtype(dtype: Any) -> Any:
    """The dtype GC computes means in: float32 for narrower floats, else ``dtype``."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else jnp.dtype(dtype)


def lowering_platform() -> str:
    """The platform the computation being traced is for, as trace time sees it.

    Under ``jit`` the arrays being traced carry no device, so this reads, in
    order: the default device (``jax.default_device(...)`` or the
    ``jax_default_device`` option), the platform of the mesh in context
    (``jax.sharding.use_mesh``/``jax.set_mesh``, on a jax that has them), and
    ``jax.default_backend()``. A computation can still run elsewhere: jitted
    on arrays committed to another platform's devices, or lowered for other
    platforms (``jax.export``, ``lowering_platforms``). What this decides is a
    formulation, never a result: every formulation gives the same values, to
    float rounding.
    """
    device = getattr(jax.config, "jax_default_device", None)
    if device is not None:
        return device if isinstance(device, str) else device.platform
    get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_mesh is not None:
        platform = getattr(
            getattr(get_mesh(), "abstract_device", None), "platform", None
        )
        if isinstance(platform, str):
            return platform
    return jax.default_backend()


def for_cpu() -> bool:
    """Whether the computation being traced is for CPU (:func:`lowering_platform`)."""
    return lowering_platform() == "cpu"


def subtract_fan_in_mean(
    g: jax.Array,
    output_axes: tuple[int, ...],
    sharded: tuple[tuple[str, ...], int] | None = None,
) -> jax.Array:
    """Φ(g) for validated, non-negative ``output_axes``; keeps ``g``'s dtype.

    bf16/f16 (and narrower) leaves are centred in float32 and rounded once.
    Inside ``shard_map``, ``sharded`` is ``(mesh axis names, global fan-in
    size)``: the local fan-in sums are added across the mesh axes that shard
    a fan-in axis and divided by the global fan-in size.
    """
    x = g.astype(centring_dtype(g.dtype))
    reduce = fan_in_axes(g.ndim, output_axes)
    if sharded:
        names, fan_in = sharded
        total = jax.lax.psum(jnp.sum(x, axis=reduce, keepdims=True), names)
        mean = total / fan_in
    else:
        mean = jnp.mean(x, axis=reduce, keepdims=True)
    return (x - mean).astype(g.dtype)


def centralize_array(
    g: jax.Array, output_axes: AxesLike = DEFAULT_OUTPUT_AXES
) -> jax.Array:
    r"""Centralizes one gradient array over its fan-in (the GC operator Φ).

    The array is read as a matrix :math:`G \in \mathbb{R}^{M \times N}` whose
    ``N`` columns are the output units named by ``output_axes`` and whose ``M``
    rows are every other axis (the fan-in). Each column loses its mean:

    .. math::
        \Phi(G) = P G, \qquad P = I_M - e e^\top, \qquad e = 1_M / \sqrt{M}.

    The mean is accumulated in float32 for bf16/f16 inputs; the result keeps
    the input's dtype and shape. Complex inputs are centred as complex numbers.
    An array whose fan-in has a single element (``M == 1``) or no element is
    returned unchanged, since Φ would zero it.

    Args:
      g: a floating or complex array.
      output_axes: the axis or axes that index output units (kept). ``(-1,)``
        (the default, the last axis) for Flax/Haiku/Keras layouts
        ``(in, out)``, ``(kh, kw, in, out)``; ``0`` for Equinox/PyTorch
        layouts ``(out, in, ...)``.

    Returns:
      ``Φ(g)``, with the same shape and dtype as ``g``.

    Raises:
      ValueError: if ``output_axes`` is malformed, out of range, repeats an axis
        or keeps every axis, or if ``g`` is not floating or complex.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> kernel_grad = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # (in, out)
      >>> print(optax_gc.centralize_array(kernel_grad))
      [[ -1. -10.]
       [  1.  10.]]
      >>> print(optax_gc.centralize_array(kernel_grad, output_axes=0))
      [[ -4.5   4.5]
       [-13.5  13.5]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    where = "centralize_array"
    axes = check_axes_spec(output_axes, where)
    g = jnp.asarray(g)
    if not jnp.issubdtype(g.dtype, jnp.inexact):
        raise ValueError(
            f"{where}: expected a floating or complex array, got {g.dtype}."
        )
    axes = normalize_axes(axes, g.shape, where)
    if g.size == 0 or fan_in_size(g.shape, axes) == 1:
        return g
    return subtract_fan_in_mean(g, axes)


def centralize(
    *,
    output_axes: OutputAxes = DEFAULT_OUTPUT_AXES,
    conv_only: bool = False,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient Centralization: removes each output unit's fan-in mean.

    Every eligible leaf ``g`` of the updates is replaced by :math:`\Phi(g)`
    (see :func:`optax_gc.centralize_array`): the mean over all axes *except*
    ``output_axes`` is subtracted, so each output unit's incoming weights get a
    zero-mean gradient. Φ is the orthogonal projection :math:`I - ee^\top` on
    each column, so it is linear, idempotent and never increases the norm.

    Axis conventions:

    * Flax linen/NNX, Haiku, Keras: Dense ``(in, out)``, Conv ``(kh, kw, in,
      out)``: ``output_axes=(-1,)``, the last axis (default).
    * Equinox, PyTorch: ``(out, in)``, ``(out, in, kh, kw)``: ``output_axes=0``.
      ``optax.centralize`` always keeps axis 0; with ``output_axes=0`` this
      transform gives bit-identical results on float32/float64/complex leaves
      of ndim >= 2 whose fan-in has at least two elements. They differ on
      fan-in-1 leaves (``optax.centralize`` zeros them, this leaves them
      alone), on bf16/f16 leaves (centred here in float32 and rounded once),
      on integer leaves (left alone here) and with ``conv_only``.
    * Per leaf, as optax gives per-leaf options (``optax.masked``'s mask): a
      tree of axes that is a prefix of the parameters, with ``None`` for
      "leave alone" (e.g. ``{"Dense_0": {"kernel": (1,), "bias": None}}``),
      or a callable ``params -> such a tree``, called at trace time with the
      tree GC is applied to. Or a rule deciding one leaf at a time:
      :func:`optax_gc.infer_output_axes` reads the axes from the model's own
      computation (``(1, 2)`` for DenseGeneral q/k/v kernels ``(in, H, D)``,
      ``(0, -1)`` for scan-stacked kernels ``(L, in, out)``, ``None`` for
      embeddings), :func:`optax_gc.path_rules` from path patterns, and
      :func:`optax_gc.per_leaf` wraps a function ``(key_path, leaf) -> axes |
      None``. :func:`optax_gc.explain` shows what any of them decides. Rules
      are consulted only for leaves that pass the checks below.

    Leaves left untouched (returned as they are): ndim below 2 (below 4 with
    ``conv_only=True``, the paper's GCC, as in the authors' code), non-floating
    dtypes, ``None`` and ``optax.MaskedNode``, zero-size arrays, leaves
    ``output_axes`` maps to ``None``, and leaves whose fan-in has one element (e.g. a
    Dense layer with one input), which Φ would set to zero. bf16/f16 means are
    accumulated in float32; every leaf keeps its dtype, shape and sharding.

    Range: as in ``jnp.mean`` and ``optax.centralize``, a fan-in's values are
    summed before they are divided, in the centring dtype. A fan-in whose sum
    leaves that dtype's range (float32 entries near its largest value, about
    3.4e38, e.g. four of 2e38) gets infinite means, and its centred values are
    then infinite or NaN. Scaling each value before the sum keeps such means
    finite, but measured 12% slower on CPU for every leaf, so it is not done.

    Sharding: under ``jax.jit`` with sharded arrays (``NamedSharding``) the
    means are global and nothing needs to be said. Inside ``shard_map`` each
    device sees only its shard, so a leaf whose fan-in axis is sharded would
    get per-shard means; pass the ``PartitionSpec`` tree given to
    ``shard_map`` for the parameters as ``partition_specs``, and GC sums each
    shard's fan-in, ``psum``\ s over the mesh axes that shard a fan-in axis
    and divides by the global fan-in size. Leaves sharded only along output
    axes need no collective.

    Args:
      output_axes: the axes that index output units (kept): an int or a tuple
        of ints for every leaf, or per leaf (see above). With the default,
        ``(-1,)``, a tree that shows a layout the default gets wrong (Equinox
        weights, embedding tables, attention kernels ``(in, H, D)``, stacked
        layers) raises a :class:`optax_gc.LayoutWarning` at trace time, as
        do the leaves a ``path_rules`` keeping the library's default leaves to
        it; any other explicit value silences it.
      conv_only: if True, only leaves with ndim >= 4 are centralized (GCC).
      partition_specs: inside ``shard_map`` only: a ``PartitionSpec`` (for
        every leaf) or a tree of them with the structure of the updates (or a
        prefix of it), as given to ``shard_map``'s ``in_specs``. ``None``
        (default): no collectives. A per-leaf rule then sees a
        ``jax.ShapeDtypeStruct`` with the leaf's global shape.

    Returns:
      A stateless :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: at construction if an option is malformed; at trace time,
        naming the leaf's key path, if ``output_axes`` or ``partition_specs``
        does not fit a leaf (out of range, a repeated axis, every axis kept, a
        tree structure that does not match).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_gc
      >>> params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}
      >>> grads = {"kernel": jnp.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]]),
      ...          "bias": jnp.array([1.0, 2.0, 3.0])}
      >>> tx = optax.chain(optax_gc.centralize(), optax.sgd(1.0))
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"])
      [[ 1.  2.  3.]
       [-1. -2. -3.]]
      >>> print(updates["bias"])
      [-1. -2. -3.]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    where = "centralize"
    rule = LeafRule(output_axes, conv_only, where)
    check_partition_specs(partition_specs, where)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        updates = centralize_tree(updates, rule, partition_specs)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def check_partition_specs(partition_specs: Any, where: str) -> None:
    """Construction-time check: ``None``, a PartitionSpec, or a tree of them."""
    if partition_specs is None or isinstance(partition_specs, PartitionSpec):
        return
    for leaf in jax.tree.leaves(partition_specs, is_leaf=_is_spec):
        if not _is_spec(leaf):
            raise ValueError(
                f"{where}: partition_specs must be a jax.sharding.PartitionSpec "
                f"or a tree of them, got a leaf {leaf!r}."
            )


def _broadcast_specs(partition_specs: Any, updates: Any, where: str) -> Any:
    """A PartitionSpec per leaf of ``updates`` from a (prefix) spec tree."""

    def fill(spec, subtree):
        spec = PartitionSpec() if spec is None else spec
        return jax.tree.map(lambda _: spec, subtree)

    try:
        return jax.tree.map(fill, partition_specs, updates, is_leaf=_is_spec)
    except ValueError as e:
        raise ValueError(
            f"{where}: partition_specs must have the tree structure of the "
            f"updates (or a prefix of it): {e}"
        ) from None


def _sharded_fan_in(
    g: jax.Array, spec: PartitionSpec, path: Any, where: str
) -> tuple[tuple[int, ...], dict[int, tuple[str, ...]]]:
    """The global shape of a shard, and the mesh axes sharding each dim."""
    if len(spec) > g.ndim:
        raise ValueError(
            f"{leaf_where(where, path)}: partition spec {spec} has more entries "
            f"than the leaf has dimensions (shape {tuple(g.shape)})."
        )
    names: dict[int, tuple[str, ...]] = {}
    shape = list(g.shape)
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        axes = tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)
        try:
            sizes = [jax.lax.psum(1, name) for name in axes]
        except NameError as e:
            raise ValueError(
                f"{leaf_where(where, path)}: partition spec {spec} names a mesh "
                f"axis that is not bound here ({e}); partition_specs is only "
                f"for code inside shard_map."
            ) from None
        names[dim] = axes
        shape[dim] *= math.prod(sizes)
    return tuple(shape), names


def centralize_tree(
    updates: Any,
    rule: LeafRule,
    partition_specs: Any,
) -> Any:
    """Φ on every eligible leaf of ``updates`` (the body of ``centralize``)."""
    where = rule.where
    if partition_specs is None:

        def leaf_fn(path, g):
            axes = rule(path, g).axes
            return g if axes is None else subtract_fan_in_mean(g, axes)

        return map_leaves(leaf_fn, rule, updates)

    def sharded_leaf_fn(path, g, spec):
        if not hasattr(g, "ndim"):
            return g
        shape, names = _sharded_fan_in(g, spec, path, where)
        axes = rule(path, g, shape=shape).axes
        if axes is None:
            return g
        sharded = tuple(n for d, ns in names.items() if d not in axes for n in ns)
        if not sharded:
            return subtract_fan_in_mean(g, axes)
        return subtract_fan_in_mean(g, axes, (sharded, fan_in_size(shape, axes)))

    specs = _broadcast_specs(partition_specs, updates, where)

    def global_leaf(path, g, spec):
        if not hasattr(g, "ndim"):
            return g
        return jax.ShapeDtypeStruct(_sharded_fan_in(g, spec, path, where)[0], g.dtype)

    seen = jax.tree_util.tree_map_with_path(global_leaf, updates, specs)
    return map_leaves(sharded_leaf_fn, rule, updates, specs, seen=seen)
