"""The authors' optimizers as optax aliases: ``gc_sgd``, ``gc_adam``, ``gc_adamw``.

Each takes its optax counterpart's parameters in optax's order with optax's
defaults, then GC's options keyword-only, and delegates to the optax alias.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer

from optax_gc._axes import DEFAULT_OUTPUT_AXES, OutputAxes
from optax_gc._placement import Location, place_gc


@functools.cache
def _optax_decays_by_schedule() -> bool:
    """Whether the installed ``optax.add_decayed_weights`` takes a schedule."""
    with jax.ensure_compile_time_eval():  # also when first built under jit
        tx = optax.add_decayed_weights(lambda count: 0.5)
        p = {"p": jnp.ones(1)}
        try:
            out, _ = tx.update(p, tx.init(p), p)
        except TypeError:
            return False
        return bool(jax.tree.leaves(out)[0][0] == 1.5)


def _check_weight_decay(weight_decay: Any, where: str, schedule_ok: bool) -> None:
    """Rejects every concrete value that is not a finite real number >= 0.

    Traced values (``optax.inject_hyperparams`` under ``jit``) pass unchecked;
    so do schedules where the optimizer accepts them.
    """
    if isinstance(weight_decay, Tracer):
        return
    if schedule_ok and callable(weight_decay):
        if not _optax_decays_by_schedule():
            raise ValueError(
                f"{where}: weight_decay is a schedule, which the installed optax "
                f"({optax.__version__}) does not accept; pass a number."
            )
        return
    kind = "a real number >= 0" + (" or a schedule" if schedule_ok else "")
    ok_type = isinstance(weight_decay, (int, float, np.number, np.ndarray, jax.Array))
    if not ok_type or isinstance(weight_decay, (bool, np.bool_)):
        raise ValueError(f"{where}: weight_decay must be {kind}, got {weight_decay!r}.")
    dtype = jnp.result_type(weight_decay)
    real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    if np.ndim(weight_decay) != 0 or not real:
        raise ValueError(
            f"{where}: weight_decay must be {kind} (a scalar), got {weight_decay!r}."
        )
    value = float(weight_decay)  # type: ignore[arg-type]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: weight_decay must be {kind}, got {weight_decay!r}.")


def _injected_l2(
    weight_decay: jax.Array, where: str
) -> optax.GradientTransformationExtraArgs:
    """Coupled L2 whose coefficient is an array (``inject_hyperparams``).

    Its value may only be known at run time, so the transform is always in the
    chain. With ``params`` it is ``optax.add_decayed_weights``. Without
    ``params`` (as plain ``optax.adam`` allows) nothing can be decayed: a zero
    coefficient passes the updates through; a concrete non-zero one raises; a
    traced non-zero one turns the updates into NaN rather than silently
    dropping the decay.
    """
    decay = optax.add_decayed_weights(weight_decay)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is not None:
            return decay.update(updates, state, params)
        if not isinstance(weight_decay, Tracer):
            if float(weight_decay) != 0:
                raise ValueError(
                    f"{where}: weight_decay={float(weight_decay)} needs params: "
                    "call update(grads, state, params)."
                )
            return updates, state

        def guard(u):
            if not jnp.issubdtype(u.dtype, jnp.inexact):
                return u
            return jnp.where(weight_decay == 0, u, jnp.nan).astype(u.dtype)

        return jax.tree.map(guard, updates), state

    return optax.GradientTransformationExtraArgs(decay.init, update_fn)


def _with_l2(
    tx: optax.GradientTransformationExtraArgs, weight_decay: Any, where: str
) -> optax.GradientTransformationExtraArgs:
    """Adds coupled L2 decay ahead of ``tx``; nothing for a concrete 0."""
    _check_weight_decay(weight_decay, where, schedule_ok=False)
    if isinstance(weight_decay, jax.Array):
        return optax.chain(_injected_l2(weight_decay, where), tx)
    if float(weight_decay) == 0:
        return tx
    return optax.chain(optax.add_decayed_weights(weight_decay), tx)


def gc_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    *,
    weight_decay: jax.typing.ArrayLike = 0.0,
    output_axes: OutputAxes = DEFAULT_OUTPUT_AXES,
    conv_only: bool = False,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with Gradient Centralization, as the authors' ``SGD(use_gc=True)``.

    ``optax.sgd``'s parameters, in its order, then GC's options. Each step
    computes :math:`g \leftarrow \Phi(g + \lambda w)`: the L2 decay is added
    first, then the sum is centralized, then momentum (heavy-ball or Nesterov,
    optax's ``trace``, which is PyTorch's ``SGD`` with ``dampening=0``) and the
    learning rate. For SGD, centralizing the gradient or the final update gives
    the same step.

    Args:
      learning_rate: a float or an optax schedule.
      momentum: momentum decay, or ``None`` for plain SGD.
      nesterov: use Nesterov momentum.
      accumulator_dtype: dtype of the momentum buffer, as in ``optax.sgd``.
      weight_decay: coupled L2 coefficient :math:`\lambda`, added to the
        gradient before GC. A concrete 0 adds nothing (and ``update`` needs
        no ``params``). Under ``optax.inject_hyperparams`` the coefficient is
        an array that may change between steps: ``update`` without
        ``params`` passes the updates through while it is 0; if it is
        non-zero, an eager call raises ``ValueError`` and a traced one
        returns NaN updates, since the decay cannot be applied without
        ``params`` and is never dropped silently.
      output_axes: see :func:`optax_gc.centralize`. Under
        ``optax.inject_hyperparams`` give a tuple (ints would be injected as
        arrays) and list a callable in ``static_args``.
      conv_only: see :func:`optax_gc.centralize` (the paper's GCC).
      partition_specs: see :func:`optax_gc.centralize` (inside ``shard_map``).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: if ``weight_decay`` is not a real number >= 0 (any concrete
        value is checked), or a GC option is invalid.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> params = {"kernel": jnp.zeros((2, 2))}
      >>> grads = {"kernel": jnp.array([[1.0, 2.0], [3.0, 2.0]])}
      >>> tx = optax_gc.gc_sgd(0.5, 0.9, weight_decay=5e-4)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"])
      [[ 0.5 -0. ]
       [-0.5 -0. ]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    tx = place_gc(
        optax.sgd(learning_rate, momentum, nesterov, accumulator_dtype),
        location="gradient",
        output_axes=output_axes,
        conv_only=conv_only,
        partition_specs=partition_specs,
        where="gc_sgd",
    )
    return _with_l2(tx, weight_decay, "gc_sgd")


def gc_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    weight_decay: jax.typing.ArrayLike = 0.0,
    location: Location = "gradient",
    output_axes: OutputAxes = DEFAULT_OUTPUT_AXES,
    conv_only: bool = False,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with Gradient Centralization, as the authors' ``Adam(use_gc=True)``.

    ``optax.adam``'s parameters, in its order, then GC's options. Coupled L2
    decay is added to the gradient first (:math:`g + \lambda w`, as
    ``torch.optim.Adam``'s ``weight_decay``). Then:

    * ``location="gradient"`` (authors' ``gc_loc=True``, default): Φ on that
      gradient, before the moments.
    * ``location="update"`` (authors' ``gc_loc=False``): Φ on the final
      direction :math:`\hat m / (\sqrt{\hat v} + \epsilon)`, which keeps
      each output unit's mean weight fixed.

    Why the gradient is the default: see :func:`optax_gc.with_gc`.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the denominator, outside the square root.
      eps_root: added to the second moment, inside the square root.
      mu_dtype: dtype of the first moment, as in ``optax.adam``.
      nesterov: Nesterov momentum (NAdam), as in ``optax.adam``.
      weight_decay: coupled L2 coefficient, see :func:`optax_gc.gc_sgd`.
      location: ``"gradient"`` (default) or ``"update"``, see above.
      output_axes: see :func:`optax_gc.gc_sgd`.
      conv_only: see :func:`optax_gc.centralize` (the paper's GCC).
      partition_specs: see :func:`optax_gc.centralize` (inside ``shard_map``).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: if ``weight_decay``, ``location`` or a GC option is invalid.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> params = {"kernel": jnp.zeros((2, 2))}
      >>> grads = {"kernel": jnp.array([[1.0, 2.0], [-3.0, 2.0]])}
      >>> tx = optax_gc.gc_adam(0.5)  # GC on the gradient, before the moments
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))
      [[-0.5 -0. ]
       [ 0.5 -0. ]]
      >>> tx = optax_gc.gc_adam(0.5, location="update")
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))
      [[-0.5  0. ]
       [ 0.5  0. ]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    tx = place_gc(
        optax.adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
        location=location,
        output_axes=output_axes,
        conv_only=conv_only,
        partition_specs=partition_specs,
        where="gc_adam",
    )
    return _with_l2(tx, weight_decay, "gc_adam")


def gc_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    nesterov: bool = False,
    location: Location = "gradient",
    output_axes: OutputAxes = DEFAULT_OUTPUT_AXES,
    conv_only: bool = False,
    partition_specs: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW (decoupled weight decay) with Gradient Centralization.

    ``optax.adamw``'s parameters, in its order, then GC's options. The decay is
    decoupled exactly as in ``optax.adamw``: the step is
    :math:`-\eta\,(\hat m / (\sqrt{\hat v} + \epsilon) + \lambda w)`.

    * ``location="gradient"`` (default): Φ on the raw gradient, before the
      moments; the decay term is not centralized.
    * ``location="update"``: Φ on the whole step, decay term included, as in
      the authors' AdamW with ``gc_loc=False``. Each output
      unit's mean weight stays fixed. One difference from the authors' code:
      they scale the decoupled decay by :math:`1/(1-\beta_1^t)`; this follows
      optax (and the AdamW paper) and does not.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the denominator, outside the square root.
      eps_root: added to the second moment, inside the square root.
      mu_dtype: dtype of the first moment, as in ``optax.adamw``.
      weight_decay: decoupled decay coefficient :math:`\lambda` (or a
        schedule where the installed ``optax.adamw`` accepts one).
      mask: which leaves are decayed, as in ``optax.adamw``.
      nesterov: Nesterov momentum, as in ``optax.adamw``.
      location: ``"gradient"`` (default) or ``"update"``, see above.
      output_axes: see :func:`optax_gc.gc_sgd`.
      conv_only: see :func:`optax_gc.centralize` (the paper's GCC).
      partition_specs: see :func:`optax_gc.centralize` (inside ``shard_map``).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: if ``weight_decay``, ``location`` or a GC option is invalid.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> params = {"kernel": jnp.array([[1.0, 0.0], [3.0, 0.0]])}
      >>> grads = {"kernel": jnp.array([[1.0, 1.0], [-1.0, 1.0]])}
      >>> tx = optax_gc.gc_adamw(0.25, weight_decay=0.5)  # decay not centred
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))
      [[-0.375 -0.   ]
       [-0.125 -0.   ]]
      >>> tx = optax_gc.gc_adamw(0.1, weight_decay=0.5, location="update")
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))  # the decay term centred too
      [[-0.05  0.  ]
       [ 0.05  0.  ]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.

      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
    """
    _check_weight_decay(weight_decay, "gc_adamw", schedule_ok=True)
    return place_gc(
        optax.adamw(
            learning_rate,
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            weight_decay,
            mask,
            nesterov=nesterov,
        ),
        location=location,
        output_axes=output_axes,
        conv_only=conv_only,
        partition_specs=partition_specs,
        where="gc_adamw",
    )
