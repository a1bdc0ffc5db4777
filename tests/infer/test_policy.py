"""Tests for the decision policy (``optax_gc._infer._policy``), on uses built
by hand: what each combination of uses decides, and why."""

from optax_gc._infer._policy import SCALAR, decide, stacked_of
from optax_gc._infer._values import Use

F = frozenset


def contract(fan_in, site=1, **kw):
    return Use("contract", "dot_general", F(fan_in), site=site, **kw)


def test_one_contraction_keeps_the_other_axes():
    assert decide({contract({0}): 1}, (3, 4)) == ((1,), "dot_general contracts axis 0")


def test_an_extension_adds_to_its_own_contraction_only():
    uses = {contract({1}, site=7): 1, Use("extend", "dot_general", F({2}), site=7): 1}
    axes, why = decide(uses, (4, 3, 6))
    assert axes == (0,) and why == "dot_general (bilinear) contracts axes (1, 2)"
    other_site = {contract({1}, site=7): 1, Use("extend", "x", F({2}), site=8): 1}
    assert decide(other_site, (4, 3, 6))[0] == (0, 2)


def test_an_extension_that_leaves_no_axis_leaves_the_leaf_alone():
    uses = {contract({0}, site=2): 1, Use("extend", "dot_general", F({1}), site=2): 1}
    axes, why = decide(uses, (3, 3))
    assert axes is None and why.endswith("every axis contracted, no output axis")


def test_whole_leaf_reductions_decide_nothing():
    assert decide({contract({0}): 1, Use("scalar", "add"): 2}, (3, 4))[0] == (1,)
    assert decide({Use("scalar", "add"): 1}, (3, 4)) == (None, SCALAR)


def test_disagreeing_uses_and_lookups():
    uses = {contract({0}, site=1): 1, contract({1}, site=2): 1}
    assert decide(uses, (3, 4))[1].startswith("uses disagree: ")
    assert decide({contract({0}): 1, Use("lookup", "gather"): 1}, (3, 4)) == (
        None,
        "tied lookup and matmul",
    )


def test_stacked_and_batched_axes_are_not_units():
    uses = {contract({1}, stacked=F({(0, "scan")}), batched=F({3})): 1}
    assert stacked_of(uses, (0, 2, 3)) == (0, 3)
    assert stacked_of(uses, None) == ()


def test_a_bias_of_a_product_names_the_product_s_leaves():
    uses = {Use("bias", "dot_general", partners=F({2, 0})): 1}
    assert decide(uses, (2, 4), {0: "probe", 2: "w"}) == (
        None,
        'added to a value built from other parameters ("probe", "w") before its '
        "use: a bias of that computation",
    )


def test_reductions_that_meet_data_decide_nothing():
    uses = {contract({0}): 1, Use("reduced", "add", F({0})): 1}
    assert decide(uses, (3, 4))[0] == (1,)
    assert decide({Use("reduced", "add", F({0})): 1}, (3, 4)) == (
        None,
        "elementwise only (add), after its entries along axis 0 were combined: "
        "no units",
    )
