"""GC inside optimizers: ``with_gc`` and the authors' optimizers as aliases."""

from __future__ import annotations

import optax

from optax_gc._transform import OutputAxes, centralize

_LOCATIONS = ("gradient", "update")

# The aliases default to the tuple (-1,) rather than -1: optax.inject_hyperparams
# turns every int/float argument into a traced array, but leaves tuples static.
_DEFAULT_AXES = (-1,)


def with_gc(
    tx: optax.GradientTransformation,
    *,
    location: str = "update",
    output_axes: OutputAxes = -1,
    conv_only: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds Gradient Centralization to any optax optimizer.

    Two placements, the two the paper's authors ship (``gc_loc``):

    * ``location="gradient"``: Φ is applied to the incoming gradient, before
      ``tx`` sees it (``optax.chain(centralize(), tx)``; the authors'
      ``gc_loc=True``). For SGD with or without momentum this is the paper's
      GC; for adaptive methods the per-element denominator undoes part of it.
    * ``location="update"`` (default): Φ is applied to ``tx``'s final update
      (``optax.chain(tx, centralize())``; the authors' ``gc_loc=False``, which
      they advise for Adam-type methods). Φ is linear, so it commutes with any
      scalar learning rate or schedule, and every step keeps each output
      unit's mean weight :math:`e^\top w_i` fixed: projected descent on that
      constraint, whatever ``tx`` is.

    The state is ``tx``'s own state, unchanged: a checkpoint of ``tx`` restores
    into ``with_gc(tx)`` and back.

    Args:
      tx: the optimizer to wrap.
      location: ``"update"`` or ``"gradient"``, see above.
      output_axes: see :func:`optax_gc.centralize`.
      conv_only: see :func:`optax_gc.centralize`.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs` with ``tx``'s state.

    Raises:
      ValueError: if ``tx``, ``location`` or a GC option is invalid.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_gc
      >>> params = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> grads = {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> tx = optax_gc.with_gc(optax.adam(0.1), location="update")
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))  # column means stay at zero
      [[-0.05  0.05]
       [ 0.05 -0.05]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise ValueError(
            f"with_gc: tx must be an optax.GradientTransformation, got {tx!r}."
        )
    if location not in _LOCATIONS:
        raise ValueError(
            f"with_gc: location must be one of {_LOCATIONS}, got {location!r}."
        )
    gc = centralize(output_axes=output_axes, conv_only=conv_only)
    inner = optax.with_extra_args_support(tx)
    before = location == "gradient"

    def update_fn(updates, state, params=None, **extra_args):
        if before:
            updates, _ = gc.update(updates, None)
        updates, state = inner.update(updates, state, params, **extra_args)
        if not before:
            updates, _ = gc.update(updates, None)
        return updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _check_weight_decay(weight_decay, where: str) -> None:
    if isinstance(weight_decay, (int, float)) and weight_decay < 0:
        raise ValueError(f"{where}: weight_decay must be >= 0, got {weight_decay}.")


def gc_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    output_axes: OutputAxes = _DEFAULT_AXES,
    conv_only: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with Gradient Centralization, as the authors' ``SGD(use_gc=True)``.

    Each step computes :math:`g \leftarrow \Phi(g + \lambda w)`: the L2 decay is
    added first, then the sum is centralized, then momentum (heavy-ball or
    Nesterov, optax's ``trace``, which is PyTorch's ``SGD`` with
    ``dampening=0``) and the learning rate. For SGD, centralizing the gradient
    or the final update gives the same step.

    Args:
      learning_rate: a float or an optax schedule.
      momentum: momentum decay, or ``None`` for plain SGD.
      nesterov: use Nesterov momentum.
      weight_decay: coupled L2 coefficient :math:`\lambda`, added to the gradient
        before GC (0 adds nothing).
      output_axes: see :func:`optax_gc.centralize`; ``(-1,)`` is ``-1``.
        Under ``optax.inject_hyperparams`` give a tuple (ints would be
        injected as arrays) or list a callable in ``static_args``.
      conv_only: see :func:`optax_gc.centralize` (the paper's GCC).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> params = {"kernel": jnp.zeros((2, 2))}
      >>> grads = {"kernel": jnp.array([[1.0, 2.0], [3.0, 2.0]])}
      >>> tx = optax_gc.gc_sgd(0.5, momentum=0.9, weight_decay=5e-4)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"])
      [[ 0.5 -0. ]
       [-0.5 -0. ]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    _check_weight_decay(weight_decay, "gc_sgd")
    tx = with_gc(
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
        location="gradient",
        output_axes=output_axes,
        conv_only=conv_only,
    )
    return _with_l2(tx, weight_decay)


def _with_l2(
    tx: optax.GradientTransformationExtraArgs, weight_decay: float
) -> optax.GradientTransformationExtraArgs:
    """Adds coupled L2 decay ahead of ``tx`` (nothing when it is literally 0)."""
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return tx
    return optax.chain(optax.add_decayed_weights(weight_decay), tx)


def gc_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    location: str = "update",
    output_axes: OutputAxes = _DEFAULT_AXES,
    conv_only: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with Gradient Centralization, as the authors' ``Adam(use_gc=True)``.

    Coupled L2 decay is added to the gradient first (:math:`g + \lambda w`, as
    ``torch.optim.Adam``'s ``weight_decay``). Then:

    * ``location="gradient"`` (authors' ``gc_loc=True``): Φ on that gradient,
      before the moments.
    * ``location="update"`` (authors' ``gc_loc=False``, default): Φ on the
      final direction :math:`\hat m / (\sqrt{\hat v} + \epsilon)`, which keeps
      each output unit's mean weight fixed.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the denominator, outside the square root.
      weight_decay: coupled L2 coefficient (0 adds nothing).
      location: ``"update"`` or ``"gradient"``, see above.
      output_axes: see :func:`optax_gc.centralize`; ``(-1,)`` is ``-1``.
        Under ``optax.inject_hyperparams`` give a tuple (ints would be
        injected as arrays) or list a callable in ``static_args``.
      conv_only: see :func:`optax_gc.centralize` (the paper's GCC).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> params = {"kernel": jnp.zeros((2, 2))}
      >>> grads = {"kernel": jnp.array([[1.0, 2.0], [-3.0, 2.0]])}
      >>> tx = optax_gc.gc_adam(0.5, location="update")
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))
      [[-0.5  0. ]
       [ 0.5  0. ]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.
    """
    _check_weight_decay(weight_decay, "gc_adam")
    tx = with_gc(
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
        location=location,
        output_axes=output_axes,
        conv_only=conv_only,
    )
    return _with_l2(tx, weight_decay)


def gc_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: optax.MaskOrFn = None,
    *,
    location: str = "update",
    output_axes: OutputAxes = _DEFAULT_AXES,
    conv_only: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW (decoupled weight decay) with Gradient Centralization.

    The decay is decoupled exactly as in ``optax.adamw``: the step is
    :math:`-\eta\,(\hat m / (\sqrt{\hat v} + \epsilon) + \lambda w)`.

    * ``location="gradient"``: Φ on the raw gradient, before the moments; the
      decay term is not centralized.
    * ``location="update"`` (default): Φ on the whole step, decay term
      included, as in the authors' AdamW with ``gc_loc=False``. Each output
      unit's mean weight stays fixed. One difference from the authors' code:
      they scale the decoupled decay by :math:`1/(1-\beta_1^t)`; this follows
      optax (and the AdamW paper) and does not.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: added to the denominator, outside the square root.
      weight_decay: decoupled decay coefficient :math:`\lambda`.
      mask: which leaves are decayed, as in ``optax.adamw``.
      location: ``"update"`` or ``"gradient"``, see above.
      output_axes: see :func:`optax_gc.centralize`; ``(-1,)`` is ``-1``.
        Under ``optax.inject_hyperparams`` give a tuple (ints would be
        injected as arrays) or list a callable in ``static_args``.
      conv_only: see :func:`optax_gc.centralize` (the paper's GCC).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_gc
      >>> params = {"kernel": jnp.array([[1.0, 0.0], [3.0, 0.0]])}
      >>> grads = {"kernel": jnp.array([[1.0, 1.0], [-1.0, 1.0]])}
      >>> tx = optax_gc.gc_adamw(0.1, weight_decay=0.5)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["kernel"].round(4))
      [[-0.05  0.  ]
       [ 0.05  0.  ]]

    References:
      Yong et al, `Gradient Centralization: A New Optimization Technique for
      Deep Neural Networks <https://arxiv.org/abs/2004.01461>`_, ECCV 2020.

      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
    """
    _check_weight_decay(weight_decay, "gc_adamw")
    return with_gc(
        optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask
        ),
        location=location,
        output_axes=output_axes,
        conv_only=conv_only,
    )
