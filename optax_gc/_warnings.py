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

    Raised when a tree centred with the default axes shows, by its module
    types or leaf names, output-first weights (Equinox layers), embedding
    tables, attention kernels ``(in, H, D)`` or layers stacked by ``nn.scan``.
    Passing ``output_axes`` explicitly (e.g. ``output_axes=0``, or the rule
    :func:`optax_gc.infer_output_axes` returns) silences it.
    """


class InferenceWarning(OptaxGCWarning):
    """:func:`optax_gc.infer_output_axes` returned a rule that looks unintended.

    Raised when the rule gives output axes to no leaf, or when a leaf is
    contracted with constants only, which is what inputs closed over by the
    traced function look like.
    """


class ScheduleFreeWarning(OptaxGCWarning):
    """:func:`optax_gc.with_gc` wraps a schedule-free optimizer.

    Schedule-free optimizers keep evaluation parameters in their state; GC
    centres the updates of the training parameters only.
    """
