"""``infer_output_axes``: output axes read from the computation.

The model is traced once to a jaxpr and interpreted abstractly, in four
modules, one pass each:

* ``_values``: the abstract values (a constant, data, or a weight-derived
  value with one :class:`~optax_gc._infer._values.Lineage` per parameter leaf
  it comes from), how they merge and join, and the
  :class:`~optax_gc._infer._values.Use` records a leaf's decision reads.
* ``_interpreter``: the :class:`~optax_gc._infer._interpreter.Interpreter` and
  its registry :data:`~optax_gc._infer._interpreter.RULES`, one rule per
  primitive, for equations with a weight-derived operand; data-only equations
  track one-hot indicators, stack-slice tokens and the footprints of uses.
* ``_policy``: the decision, from each leaf's uses, with its reason.
* ``_api``: :func:`infer_output_axes`, :class:`InferredAxes`, the checks of
  the call and the warnings.

Adding a primitive
------------------

The safety rule comes first: a primitive with no rule is *unsupported*, and
every leaf that reaches it is left alone with the reason ``unsupported op:
<name>``. A rule may only make a decision possible where it is sure of the
semantics; when in doubt, record a ``"conflict"`` use with a true reason.

A rule is a function ``rule(interp, eqn, ins) -> outputs`` registered with
``@rule("name")``: ``ins`` holds the abstract value of each operand (at least
one of them weight-derived), and it returns one abstract value per output.
Two kinds of rule exist:

* *structural* (``transpose``, ``reshape``, ``slice``...): map each leaf's
  lineage with ``interp.structural(x, fn)``, saying which parameter axes each
  output axis carries, which were sliced off (``stacked``), combined
  (``mixed``) or only partly kept (``partial``);
* *uses* (``dot_general``, ``conv_general_dilated``, a gather with data
  indices): where a weight-derived operand meets data, record the use with
  ``interp.contract(value, fan_dims, what, site)`` (its contracted axes are
  the fan-in) or ``interp.record_each(value, make_use)``, and return data
  (``interp.data_out``).

Worked example, ``x @ w.T`` with ``w`` of shape ``(out, in)``. The jaxpr is::

    b = transpose[permutation=(1, 0)] w
    c = dot_general[dimension_numbers=(((1,), (0,)), ((), ()))] x b

1. ``w`` enters as ``Weight({0: Lineage(axes=({0}, {1}))})``: value axis ``d``
   carries parameter axis ``d``.
2. ``transpose_rule`` permutes the lineage: ``axes=({1}, {0})``.
3. ``dot_general_rule`` sees data ``x`` on the left and the weight on the
   right, whose contracted dimension is 0: ``interp.contract`` reads its
   fan-in, ``axes[0] = {1}``, and keeps ``{0}``, recording
   ``Use("contract", "dot_general", fan_in={1})``; the output is data, with a
   footprint saying that its axis 1 carries ``w``'s axis 0.
4. ``_policy.decide`` reads the one use: kept ``(0,)``, reason
   ``dot_general contracts axis 1``.

Then add a test in ``tests/infer/`` whose expectation is derived by hand from
the primitive's definition (never from the library), and list the primitive
where ``docs/inference.md`` says what is followed.
"""

from optax_gc._infer._api import InferredAxes, infer_output_axes

__all__ = ["InferredAxes", "infer_output_axes"]
