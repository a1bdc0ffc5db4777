"""Tests for the abstract values of the analysis (``optax_gc._infer._values``)."""

import numpy as np
import pytest

from optax_gc._infer import _values
from optax_gc._infer._values import CONST, DATA, Const, Data, Lineage, Weight

# -- reshapes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, groups",
    [
        ((2, 3, 4), (6, 4), [[0, 1], [2]]),
        ((6, 4), (2, 3, 4), [[0], [0], [1]]),
        ((2, 3, 4), (2, 12), [[0], [1, 2]]),
        ((1, 5, 4), (5, 4), [[1], [2]]),
        ((5, 4), (5, 1, 4), [[0], [], [1]]),
        ((4, 6), (2, 12), [[0, 1], [0, 1]]),  # axes straddle: one group
        ((3, 0), (0,), None),
    ],
)
def test_reshape_groups(old, new, groups):
    assert _values.reshape_groups(old, new) == groups


def test_reshape_axes_follows_merges_and_splits():
    axes = (frozenset({0}), frozenset({1}), frozenset({2}))
    merged = _values.reshape_axes(axes, (2, 3, 4), (6, 4))
    assert merged == (frozenset({0, 1}), frozenset({2}))
    assert _values.reshape_axes(axes, (2, 3, 4), (5, 5)) is None


def test_constants_compare_equal_and_compute_once():
    calls = []

    def compute():
        calls.append(1)
        return np.arange(3)

    c = Const(compute)
    assert c == CONST and hash(c) == hash(CONST)
    assert c != DATA and DATA != c
    np.testing.assert_array_equal(c.value(), np.arange(3))
    c.value()
    assert calls == [1]
    assert CONST.value() is None


def test_a_constant_that_fails_to_compute_is_unknown():
    def broken():
        raise ValueError("no")

    assert Const(broken).value() is None


def test_join_keeps_data_and_its_dependences():
    w = Weight({3: Lineage((frozenset({0}),))})
    joined = _values.join(Data(depends=0b1010), w)
    assert isinstance(joined, Data) and joined.depends == 0b1010
    assert _values.join(CONST, w) is w
    assert _values.join(w, CONST) is w


def test_merge_right_aligns_and_unions():
    a = Weight({0: Lineage((frozenset({1}),), mixed=frozenset({0}))})
    b = Weight({0: Lineage((frozenset({0}), frozenset({1})), partial=frozenset({0}))})
    (lineage,) = _values.merge([a, b], 2).lineages.values()
    assert lineage.axes == (frozenset({0}), frozenset({1}))
    assert lineage.mixed == frozenset({0}) and lineage.partial == frozenset({0})


@pytest.mark.parametrize(
    "axes, text", [(frozenset({1}), "axis 1"), (frozenset({2, 0}), "axes (0, 2)")]
)
def test_describe(axes, text):
    assert _values.describe(axes) == text
