"""Where GC sits in an optimizer: ``with_gc``."""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Literal, TypeAlias, get_args

import jax
import optax

from optax_gc._axes import DEFAULT_OUTPUT_AXES, LeafRule, OutputAxes
from optax_gc._recompute import centralized_update
from optax_gc._transform import centralize_tree, check_partition_specs
from optax_gc._warnings import ScheduleFreeWarning

Location: TypeAlias = Literal["gradient", "update"]
"""Where :func:`optax_gc.with_gc` applies GC: the gradient or the final update."""

LOCATIONS: tuple[str, ...] = get_args(Location)


def _line_search_states() -> tuple[type, ...]:
    names = ("ScaleByZoomLinesearchState", "ScaleByBacktrackingLinesearchState")
    return tuple(getattr(optax, n) for n in names if hasattr(optax, n))


def _check_no_line_search(state: Any, where: str) -> None:
    kinds = _line_search_states()
    found = [
        type(s).__name__
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kinds))
        if isinstance(s, kinds)
    ]
    if found:
        raise ValueError(
            f"{where}: the wrapped optimizer runs a line search ({found[0]}), "
            "which caches the objective's value and gradient for the step it "
            "proposes; GC on the final update would move the step away from "
            "what the line search checked. Use location='gradient' (GC on the "
            "gradient the optimizer sees)."
        )


def _with_extra_args(tx: Any) -> optax.GradientTransformationExtraArgs:
    """``tx`` as an ExtraArgs transformation, keeping the extra args it takes.

    ``optax.with_extra_args_support`` drops them for anything that is not a
    ``GradientTransformationExtraArgs``, such as ``optax.MultiSteps``, whose
    ``update`` takes and passes on ``**extra_args``.
    """
    if isinstance(tx, optax.GradientTransformationExtraArgs):
        return tx
    try:
        kinds = [p.kind for p in inspect.signature(tx.update).parameters.values()]
    except (TypeError, ValueError):
        kinds = []
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return optax.GradientTransformationExtraArgs(tx.init, tx.update)
    return optax.with_extra_args_support(tx)


def _warn_schedule_free(state: Any, where: str) -> None:
    kind = getattr(getattr(optax, "contrib", None), "ScheduleFreeState", None)
    if kind is None:
        return
    found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
    if any(isinstance(s, kind) for s in found):
        warnings.warn(
            f"{where}: the wrapped optimizer is schedule-free: it keeps a "
            "second sequence of parameters in its state, from which "
            "optax.contrib.schedule_free_eval_params computes the evaluation "
            "parameters. GC on the final update centres the training "
            "parameters' updates only, so the evaluation parameters' per-unit "
            "means are not held fixed. location='gradient' centres what every "
            "sequence is built from.",
            ScheduleFreeWarning,
            stacklevel=3,
        )


def with_gc(
    tx: optax.GradientTransformation,
    *,
    location: Location = "gradient",
    output_axes: OutputAxes = DEFAULT_OUTPUT_AXES,
    conv_only: bool = False,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds Gradient Centralization to an optax optimizer.

    Two placements, the two the paper's authors ship (``gc_loc``):

    * ``location="gradient"`` (default): Φ is applied to the incoming
      gradient, before ``tx`` sees it (``optax.chain(centralize(), tx)``; the
      authors' ``gc_loc=True``). For SGD with or without momentum this is the
      paper's GC.
    * ``location="update"``: Φ is applied to ``tx``'s final update
      (``optax.chain(tx, centralize())``; the authors' ``gc_loc=False``, which
      they advise for Adam-type methods). Φ is linear, so it commutes with any
      scalar learning rate or schedule, and every step keeps each output
      unit's mean weight :math:`e^\top w_i` fixed: projected descent on that
      constraint.

    The default is the gradient for every optimizer. In the project's own
    runs with Adam and AdamW (CNNs with BatchNorm and GroupNorm at two batch
    sizes, a learning-rate sweep, a transformer language model; the table is
    on the documentation's "Where GC goes" page), neither placement improved
    held-out metrics, GC on the update lost most at low learning rates, GC on
    the gradient lowered the CNNs' training loss more, and it is the cheaper
    of the two. Choose ``"update"`` to hold each unit's mean weight fixed, to
    reproduce the authors' ``gc_loc=False``, or for AdamW on a transformer,
    where it was the less harmful of the two.

    The state is ``tx``'s own state, unchanged: a checkpoint of ``tx`` restores
    into ``with_gc(tx)`` and back.

    Cost of ``location="update"`` under ``jit``: for CPU, ``tx.update`` is
    traced once to a jaxpr and each centred leaf's fan-in sums are
    recomputed, block by block, from the values its update is computed from
    entry by entry (e.g. Adam's new moments), so the update is never stored in
    full. Leaves where that cannot save memory (small ones, Adafactor's
    updates, an orthogonalized update) are summed whole. For GPUs and TPUs,
    which fuse the plain ``u - mean(u)`` themselves, the step is traced as
    ``optax.chain(tx, centralize())`` and nothing else. Which of the two a
    computation is for is decided at trace time: the platform of the default
    device (``jax.default_device``), else of the mesh in context, else
    ``jax.default_backend()``. A computation run elsewhere (jitted on arrays
    committed to another platform's devices, or exported for another platform)
    gets the other formulation: the same values, at another cost. The results
    equal ``optax.chain(tx, centralize())`` to float rounding (the sums are
    added in another order); called eagerly, they are identical.

    Exceptions to "any optimizer":

    * Line searches (``optax.lbfgs``, ``scale_by_zoom_linesearch``,
      ``scale_by_backtracking_linesearch``) check and cache the objective for
      the step they propose, so GC on the update would break them:
      ``location="update"`` raises ``ValueError`` at ``init`` (and at
      ``update``); use ``location="gradient"``. With L-BFGS that still
      keeps every output unit's mean weight fixed: its direction is a linear
      combination of centred gradients and centred steps.
    * Schedule-free optimizers (``optax.contrib.schedule_free_*``) keep a
      second set of evaluation parameters in their state; GC centralizes the
      updates of the training parameters only, so the per-unit means of the
      evaluation parameters are not held fixed by ``location="update"``, and
      its ``init`` warns (:class:`optax_gc.ScheduleFreeWarning`). With
      ``location="gradient"`` every sequence is built from centred gradients.

    Args:
      tx: the optimizer to wrap: what ``optax.chain`` takes, an
        ``optax.GradientTransformation`` or any object with its ``init`` and
        ``update`` (``optax.MultiSteps``).
      location: ``"gradient"`` (default) or ``"update"``, see above.
      output_axes: see :func:`optax_gc.centralize`.
      conv_only: see :func:`optax_gc.centralize`.
      partition_specs: see :func:`optax_gc.centralize` (inside ``shard_map``).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with ``tx``'s state.

    Raises:
      ValueError: if ``tx``, ``location`` or a GC option is invalid; at
        ``init``/``update`` if ``location="update"`` and ``tx`` runs a line
        search.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_gc
      >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> grads = {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> tx = optax_gc.with_gc(optax.sgd(0.1))  # GC on the gradient (default)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"])
      [[-0.05  0.05]
       [ 0.05 -0.05]]
      >>> tx = optax_gc.with_gc(optax.adam(0.1), location="update")
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))  # column means stay at zero
      [[-0.05  0.05]
       [ 0.05 -0.05]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    return place_gc(
        tx,
        location=location,
        output_axes=output_axes,
        conv_only=conv_only,
        partition_specs=partition_specs,
        where="with_gc",
    )


def place_gc(
    tx: optax.GradientTransformation,
    *,
    location: Location,
    output_axes: OutputAxes,
    conv_only: bool,
    partition_specs: Any,
    where: str,
) -> optax.GradientTransformationExtraArgs:
    """:func:`with_gc`, with errors that name ``where`` (the public caller)."""
    if not (
        callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))
    ):
        raise ValueError(
            f"{where}: tx must be an optax optimizer, an object with init and "
            f"update methods such as an optax.GradientTransformation or "
            f"optax.MultiSteps, got {tx!r}."
        )
    if location not in LOCATIONS:
        raise ValueError(
            f"{where}: location must be one of {LOCATIONS}, got {location!r}."
        )
    rule = LeafRule(output_axes, conv_only, where)
    check_partition_specs(partition_specs, where)
    inner = _with_extra_args(tx)
    before = location == "gradient"

    def gc(updates):
        return centralize_tree(updates, rule, partition_specs)

    def init_fn(params):
        state = inner.init(params)
        if not before:
            _check_no_line_search(state, where)
            _warn_schedule_free(state, where)
        return state

    def update_fn(updates, state, params=None, **extra_args):
        if before:
            return inner.update(gc(updates), state, params, **extra_args)
        _check_no_line_search(state, where)
        if partition_specs is not None:
            updates, state = inner.update(updates, state, params, **extra_args)
            return gc(updates), state

        def step(updates, state, params, extra_args):
            return inner.update(updates, state, params, **extra_args)

        args = (updates, state, params, extra_args)
        return centralized_update(step, args, rule)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
