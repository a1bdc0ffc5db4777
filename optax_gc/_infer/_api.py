"""The public API: ``infer_output_axes`` and the rule it returns."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from optax_gc._axes import AxesRule, path_str
from optax_gc._infer._interpreter import Interpreter
from optax_gc._infer._policy import (
    CONSTANTS,
    NO_DATA,
    decide,
    stacked_of,
)
from optax_gc._infer._values import DATA, Lineage, Weight
from optax_gc._warnings import InferenceWarning


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


class InferredAxes(AxesRule):
    """The rule :func:`optax_gc.infer_output_axes` returns; see there.

    Called as ``rule(key_path, leaf)`` it returns the leaf's output axes (or
    ``None``); pass it as ``output_axes``.

    Attributes:
      decisions: ``{path: (axes | None, reason)}`` for every leaf of the
        parameters it was inferred from, paths in the ``a/b/c`` form. Two
        leaves whose paths read the same and were decided differently are
        ``(None, "ambiguous path")`` here, and raise when the rule meets them.
      stacked: ``{path: axes}`` for the leaves whose kept axes include axes
        that stack layers or ensemble members (``nn.scan``, ``vmap``, a loop
        over a stack) rather than index output units: those of the leaf's
        output axes. Leaves without such axes are not listed.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> rule = optax_gc.infer_output_axes(
      ...     lambda p, x: x @ p["w"].T, {"w": jnp.zeros((4, 3))}, jnp.zeros((2, 3)))
      >>> rule
      InferredAxes(1 leaf, 1 with output axes)
      >>> rule.decisions["w"]
      ((0,), 'dot_general contracts axis 1')
    """

    def __init__(
        self,
        decisions: dict[str, tuple[Any, str]],
        shapes: dict,
        ambiguous: frozenset = frozenset(),
        stacked: dict[str, tuple[int, ...]] | None = None,
    ):
        self.decisions = decisions
        self.stacked = dict(stacked or {})
        self._shapes = shapes
        self._ambiguous = ambiguous

    def decide(self, path: Any, leaf: Any) -> tuple[Any, str]:
        name = path_str(path)
        if name not in self.decisions:
            known = list(self.decisions)
            raise ValueError(
                f'infer_output_axes: leaf "{name}" is not a leaf of the '
                f"parameters the axes were inferred from ({_leaves(len(known))}, "
                f"e.g. {known[:3]}). Infer from a tree with the structure of "
                "the gradients (for Flax linen, variables['params'])."
            )
        if name in self._ambiguous:
            raise ValueError(
                f'infer_output_axes: two leaves share the path "{name}" and were '
                "decided differently; rename one of them."
            )
        shape = self._shapes[name]
        leaf_shape = getattr(leaf, "shape", None)
        if shape is not None and leaf_shape is not None and tuple(leaf_shape) != shape:
            raise ValueError(
                f'infer_output_axes: leaf "{name}" has shape {tuple(leaf_shape)}, '
                f"but the parameter it was inferred from has shape {shape}."
            )
        return self.decisions[name]

    def __repr__(self) -> str:
        touched = sum(a is not None for a, _ in self.decisions.values())
        leaves = _leaves(len(self.decisions))
        return f"InferredAxes({leaves}, {touched} with output axes)"


def _leaves(n: int) -> str:
    return f"{n} leaf" if n == 1 else f"{n} leaves"


def infer_output_axes(
    fn: Callable[..., Any], params: Any, /, *args: Any, **kwargs: Any
) -> InferredAxes:
    r"""Reads every parameter's output axes from the computation that uses it.

    GC averages each output unit's gradient over its fan-in: the weights that
    are contracted with the layer's input to produce that unit. This traces
    ``fn(params, *args, **kwargs)`` once, abstractly (nothing runs on data),
    and reads the fan-in of every leaf of ``params`` from the jaxpr, so that
    GC is exact on any layout without rules written by hand: DenseGeneral and
    attention kernels, stacked (``nn.scan``, ``nnx.vmap``) layers, Equinox's
    ``(out, in)`` layout, weights applied transposed, locally connected and
    grouped convolutions alike.

    Semantics. A value is *weight-derived* when it is computed from
    parameters without data: casts, transposes, ``rev``, reshapes that split or
    merge axes, broadcasts, slices with data-independent indices, elementwise
    products with constants or other parameters (weight normalization). A
    *use* is where a weight-derived value meets data:

    * ``dot_general`` (matmul, einsum, DenseGeneral, attention, locally
      connected layers): the parameter's axes that map to contracted
      dimensions are its fan-in; batch and free dimensions are kept. When the
      output is contracted again with data that no other weight's use
      produced (a bilinear layer ``einsum("bi,oij,bj->bo", x, W, z)``,
      soft-merged experts, a hypernetwork), the axes that second contraction
      sums are fan-in too; a product of two layers' outputs (attention's
      ``q @ k.T``), a contraction batched over the units (keys from a cache)
      or with a one-hot keeps the units, and a loss is not a layer (the
      ``log_softmax`` or square in between is not linear).
    * ``conv_general_dilated`` (incl. transposed, grouped, depthwise, and
      ``vmap`` ensembles of them): the kernel's in-feature and spatial
      dimensions are the fan-in, its out-feature dimension is kept.
    * a gather or dynamic slice with data-dependent indices, or a matmul with
      a one-hot of data (``one_hot(ids) @ table``, ``eye(n)[ids] @ table``,
      ``where(ids == arange(n), 1, 0) @ table``, a scaled one-hot): a
      lookup; the leaf is left untouched (embedding tables).
    * only elementwise with data (biases, norm scales of any rank, position
      embeddings): untouched.

    Axes sliced off by ``scan`` (stacked layers), by a loop indexing a stack
    with its counter or by a static index, or mapped by ``vmap``, are kept:
    GC never averages across a stack or an ensemble. A stack whose slices'
    outputs are added (``+``, or a loop carry) into the same units, none
    depending on another's output, is not a stack of layers (a convolution
    written as shifted matmuls over a ``(taps, in, out)`` kernel): that leaf
    is left alone. Successive layers on a residual stream, and the same model
    applied twice, stay a stack. Such a sum written as a reduction
    (``jnp.stack(...).sum(0)``, ``vmap`` then ``sum``) is not recognised:
    the stacked axis is then kept. Uses that agree
    decide together; a lookup together with a matmul (tied embeddings), uses
    that disagree, a weight whose output units were mixed before its use
    (``cumsum`` or ``softmax`` across units, a global norm), a fan-in only
    partly used (a slice, a gather with constant indices that misses entries,
    negative padding; a concatenation that puts every part back, as
    ``jnp.roll`` does, is whole), a size-1 axis broadcast across the units
    (a gain shared by every unit), an op the analysis does not understand, or
    a parameter never used with data leave the leaf untouched. Axes summed,
    or contracted with other parameters, before the use are fan-in
    (``x @ (U @ V)``: ``V``'s fan-in is the rank axis); a leaf added to such a
    product (``b`` in ``probe @ w + b``) is its bias and is left alone. A use
    that reduces the whole leaf to a number (an L2 term when ``fn`` is the
    loss), or that meets data entry by entry after a reduction, defines no
    units and decides nothing; nor does a use under ``stop_gradient``. Calls (``jit``,
    ``custom_jvp``, ``custom_vjp``, ``checkpoint``, ``shard_map``) and control
    flow (``scan``, ``while``, ``cond``) are followed into their bodies;
    reshapes, transposes, concatenations and splits of parameters
    (``ravel_pytree``) are followed axis by axis. Inputs closed over by ``fn``
    count as constants: pass data as ``args``.

    Every decision carries its reason; print them with
    :func:`optax_gc.explain`. The decisions are made once, here: using the
    rule costs nothing per step.

    Args:
      fn: the model, called as ``fn(params, *args, **kwargs)``; for Flax linen
        e.g. ``lambda p, x: model.apply({"params": p}, x)``.
      params: the parameter tree, with the structure of the gradients the rule
        will be applied to. Leaves may be arrays or ``jax.ShapeDtypeStruct``.
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct``; any other
        leaf is passed as a static value).
      **kwargs: more inputs, likewise.

    Returns:
      A per-leaf rule for ``output_axes`` (:func:`centralize`,
      :func:`with_gc`, the aliases, :func:`gc_fraction`, :func:`explain`),
      keyed by each leaf's path. Applied to a leaf path it never saw, or a
      leaf whose shape differs, it raises ``ValueError`` naming the path.

    Raises:
      ValueError: if ``fn`` is not callable, ``params`` has no array leaf, or
        the call does not fit: inputs missing (``fn(params, *args)`` does not
        bind), the arguments swapped (``params`` a single array while an
        input is a tree of arrays, and ``fn`` fails), or a Flax module or its
        ``apply`` passed as ``fn`` without a variables dict.

    Warns:
      InferenceWarning: if the rule gives output axes to no leaf, or a leaf is
        contracted with constants only (what closed-over inputs look like).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import optax_gc
      >>> def mlp(p, x):  # PyTorch layout: w is (out, in), applied as x @ w.T
      ...     return jnp.tanh(x @ p["w"].T + p["b"]) @ p["head"]
      >>> params = {"w": jnp.zeros((8, 3)), "b": jnp.zeros((1, 8)),
      ...           "head": jnp.zeros((8, 2))}
      >>> x = jax.ShapeDtypeStruct((16, 3), jnp.float32)
      >>> rule = optax_gc.infer_output_axes(mlp, params, x)
      >>> for path, (axes, why) in rule.decisions.items():
      ...     print(path, axes, why)
      b None elementwise only (add)
      head (1,) dot_general contracts axis 0
      w (0,) dot_general contracts axis 1

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    _check_call(fn, params, args, kwargs)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)  # jax 0.4.35
    paths = [path_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    if not traced:
        raise ValueError(
            "infer_output_axes: params has no array leaf to infer axes for."
        )
    arg_leaves, arg_tree = jax.tree.flatten((args, kwargs))
    arg_traced = [i for i, leaf in enumerate(arg_leaves) if _is_array(leaf)]

    def spec(x: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)

    def traced_fn(param_specs: list[Any], arg_specs: list[Any]) -> Any:
        p_leaves = list(leaves)
        for i, v in zip(traced, param_specs, strict=True):
            p_leaves[i] = v
        a_leaves = list(arg_leaves)
        for i, v in zip(arg_traced, arg_specs, strict=True):
            a_leaves[i] = v
        a, kw = jax.tree.unflatten(arg_tree, a_leaves)
        out = fn(jax.tree.unflatten(treedef, p_leaves), *a, **kw)
        return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]

    # Tracing errors name the user's function, not this wrapper.
    traced_fn.__name__ = getattr(fn, "__name__", "fn")
    traced_fn.__qualname__ = getattr(fn, "__qualname__", traced_fn.__name__)
    try:
        closed = jax.make_jaxpr(traced_fn)(
            [spec(leaves[i]) for i in traced],
            [spec(arg_leaves[i]) for i in arg_traced],
        )
    except Exception as e:
        if _looks_swapped(params, args):
            raise ValueError(
                f"infer_output_axes: fn(params, *args) raised "
                f"{type(e).__name__}, and the arguments look swapped: params is "
                f"a single array while an input is a tree of "
                f"{max(len(jax.tree.leaves(a)) for a in args)} arrays. The "
                "parameters come first: infer_output_axes(fn, params, *inputs)."
            ) from e
        raise
    shapes = [tuple(np.shape(leaves[i])) for i in traced]
    interp = Interpreter(shapes)
    inputs: list[Any] = [
        Weight({k: Lineage(tuple(frozenset({a}) for a in range(len(s))))})
        for k, s in enumerate(shapes)
    ] + [DATA] * len(arg_traced)
    interp.run(closed, inputs)
    names = {k: paths[i] for k, i in enumerate(traced)}
    by_leaf = {
        k: decide(interp.uses.get(k, {}), shape, names)
        for k, shape in enumerate(shapes)
    }

    decisions: dict[str, tuple[Any, str]] = {}
    stacked: dict[str, tuple[int, ...]] = {}
    leaf_shapes: dict[str, Any] = {}
    ambiguous = set()
    position = {i: k for k, i in enumerate(traced)}
    for i, name in enumerate(paths):
        if i in position:
            k = position[i]
            decision = by_leaf[k]
            stacked[name] = stacked_of(interp.uses.get(k, {}), decision[0])
            shape = shapes[k]
        else:
            decision, shape = (None, "not an array"), None
        if name in decisions and decisions[name] != decision:
            ambiguous.add(name)
            decision = (None, "ambiguous path")
            stacked[name] = ()
        decisions[name] = decision
        leaf_shapes[name] = shape
    _warn_if_unintended(decisions, leaf_shapes)
    stacked = {n: a for n, a in stacked.items() if a and decisions[n][0] is not None}
    return InferredAxes(decisions, leaf_shapes, frozenset(ambiguous), stacked)


_SHOWN = 6


def _shown(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(f'"{n}"' for n in names[:_SHOWN]) + more


def _warn_if_unintended(decisions: dict[str, tuple[Any, str]], shapes: dict) -> None:
    """Warns when the rule centres nothing, or a leaf met constants only."""
    constants = [n for n, (_, why) in decisions.items() if CONSTANTS in why]
    if constants:  # with constants for inputs, later layers meet no data at all
        constants += [n for n, (_, why) in decisions.items() if why == NO_DATA]
    fix = (
        "Inputs closed over by fn, or passed as anything but arrays or "
        "jax.ShapeDtypeStruct, are constants to the analysis: pass them as "
        "array arguments, infer_output_axes(lambda p, x: model.apply({'params': "
        "p}, x), params, x). If the constant is part of the model (a fixed "
        "matrix), leaving the leaf alone is the intended decision: filter "
        "optax_gc.InferenceWarning."
    )
    if constants:
        one = len(constants) == 1
        message = (
            f"infer_output_axes: {_leaves(len(constants))} ({_shown(constants)}) "
            f"{'is' if one else 'are'} contracted with constants only or not "
            f"used with data, so GC leaves {'it' if one else 'them'} alone. {fix}"
        )
    elif all(axes is None for axes, _ in decisions.values()) and any(
        shape is not None and len(shape) >= 2 for shape in shapes.values()
    ):
        reasons = sorted({why for _, why in decisions.values()})
        message = (
            f"infer_output_axes: the rule gives output axes to none of the "
            f"{_leaves(len(decisions))}, so GC with it changes nothing (reasons: "
            f"{'; '.join(reasons[:_SHOWN])}). Check with optax_gc.explain; if "
            "the model's inputs are closed over by fn, pass them as arguments; "
            "if it is intended, filter optax_gc.InferenceWarning."
        )
    else:
        return
    warnings.warn(message, InferenceWarning, stacklevel=3)


def _flax_linen_module() -> type | None:
    linen = sys.modules.get("flax.linen")
    return getattr(linen, "Module", None)


def _check_call(fn: Any, params: Any, args: tuple, kwargs: dict) -> None:
    """Clear errors for the usual wrong calls, before anything is traced."""
    if not callable(fn):
        raise ValueError(f"infer_output_axes: fn must be callable, got {fn!r}.")
    module = _flax_linen_module()
    fix = (
        "infer_output_axes(lambda p, x: model.apply({'params': p}, x), "
        "variables['params'], x)"
    )
    if module is not None and isinstance(fn, module):
        raise ValueError(
            f"infer_output_axes: fn is a Flax linen module, which is called "
            f"through model.apply; pass a function of the parameters: {fix}."
        )
    inner: Any = fn  # through functools.partial and jax.jit, to a bound method
    while getattr(inner, "__self__", None) is None:
        if isinstance(inner, functools.partial):
            inner = inner.func
        elif hasattr(inner, "__wrapped__"):
            inner = getattr(inner, "__wrapped__")  # noqa: B009
        else:
            break
    owner = getattr(inner, "__self__", None)
    is_apply = getattr(inner, "__name__", None) == "apply"
    if module is not None and isinstance(owner, module) and is_apply:
        if not (isinstance(params, Mapping) and "params" in params):
            raise ValueError(
                "infer_output_axes: fn is model.apply, which takes a variables "
                "dict {'params': ...} first, but params has no 'params' "
                "collection. Pass a function of the parameters and the "
                f"parameters themselves: {fix}."
            )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(params, *args, **kwargs)
    except TypeError as e:
        given = f"{len(args)} input(s)" + (f" and {sorted(kwargs)}" if kwargs else "")
        hint = (
            " No inputs were given: pass example inputs (arrays or "
            "jax.ShapeDtypeStruct) after params, infer_output_axes(fn, params, x)."
            if not args and not kwargs
            else ""
        )
        raise ValueError(
            f"infer_output_axes: fn is called as fn(params, *args, **kwargs), "
            f"here with params and {given}, and that call does not fit its "
            f"signature {signature}: {e}.{hint}"
        ) from None


def _looks_swapped(params: Any, args: tuple) -> bool:
    """``params`` a single array while an input is a tree of several arrays."""
    if not _is_array(params):
        return False
    return any(
        not _is_array(a) and sum(map(_is_array, jax.tree.leaves(a))) >= 2 for a in args
    )
