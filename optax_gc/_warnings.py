"""The warning classes optax_gc emits, so that each can be filtered by name."""

from __future__ import annotations


class OptaxGCWarning(UserWarning):
    """Base class of every warning optax_gc emits.

    Each names a likely mistake that the library can see but cannot rule out,
    with the leaves concerned and the fix. Filter them as a group with
    ``warnings.filterwarnings("ignore", category=optax_gc.OptaxGCWarning)``,
    or one subclass at a time.
    """


class UnmatchedPatternWarning(OptaxGCWarning):
    """A ``path_rules`` pattern decided no leaf of the tree it was applied to.

    Either it matched no leaf path, or every path it matched was already
    decided by an earlier pattern.
    """


class LayoutWarning(OptaxGCWarning):
    """The default ``output_axes=(-1,)`` met leaves whose layout it gets wrong.

    Raised at trace time when leaves decided by the default axes (all of
    them, or those no pattern of a ``path_rules`` with the library's default
    matches) show, by their names, ranks or Equinox module types, a layout
    the default gets wrong: output-first weights (Equinox, PyTorch state
    dicts), embedding tables, attention projections ``(in, H, D)``, Haiku
    transposed convolutions, layers stacked by ``nn.scan`` or
    ``hk.layer_stack``, biases and norm parameters of several axes. Passing
    ``output_axes`` explicitly (e.g. ``output_axes=0``, or the rule
    :func:`optax_gc.infer_output_axes` returns) silences it.
    """


class InferenceWarning(OptaxGCWarning):
    """:func:`optax_gc.infer_output_axes` returned a rule that looks unintended.

    Raised when the rule gives output axes to no leaf, or when a leaf is
    contracted with constants only, which is what inputs closed over by the
    traced function look like.
    """


class ScheduleFreeWarning(OptaxGCWarning):
    """:func:`optax_gc.with_gc` puts GC on the update of a schedule-free optimizer.

    Schedule-free optimizers keep a second sequence of parameters in their
    state, from which the evaluation parameters are computed; GC on the final
    update centres the training parameters' updates only.
    """
