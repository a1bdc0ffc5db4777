"""Axes types, validation, key-path format and per-leaf decisions (``_axes``)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from optax_gc import _axes


class Pair(NamedTuple):
    first: jax.Array
    second: list


def _paths(tree):
    return [_axes.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_path_str_for_dicts_attributes_and_sequences():
    tree = {"params": {"Dense_0": {"kernel": 1}}, "pair": Pair(2, [3, 4])}
    assert _paths(tree) == [
        "pair/first",
        "pair/second/0",
        "pair/second/1",
        "params/Dense_0/kernel",
    ]
    assert _axes.path_str(()) == ""


def test_path_str_drops_the_nnx_value_suffix():
    nnx = pytest.importorskip("flax.nnx")

    state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
    assert sorted(_paths(state)) == ["bias", "kernel"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(0, (0,)), (-1, (-1,)), ((1, 2), (1, 2)), ([0, -1], (0, -1)), (np.int64(2), (2,))],
)
def test_check_axes_spec_accepts(spec, expected):
    assert _axes.check_axes_spec(spec, "here") == expected


@pytest.mark.parametrize(
    "bad", [True, 1.0, (), "0", (0, 0), jnp.asarray(0), np.asarray([0]), None]
)
def test_check_axes_spec_rejects_with_where(bad):
    with pytest.raises(ValueError, match="^here: output_axes"):
        _axes.check_axes_spec(bad, "here")


DECISIONS = [
    (jnp.ones((3, 4)), {}, (1,), "output_axes=(-1,)"),
    (jnp.ones(4), {}, None, "ndim < 2"),
    (jnp.ones((3, 3, 4)), {"conv_only": True}, None, "ndim < 4"),
    (jnp.ones((3, 4), jnp.int32), {}, None, "not floating (int32)"),
    (jnp.ones((0, 4)), {}, None, "zero-size"),
    (jnp.ones((1, 4)), {}, None, "fan-in 1"),
    (
        jnp.ones((3, 4)),
        {"output_axes": lambda p, x: None},
        None,
        "output_axes callable",
    ),
    (optax.MaskedNode(), {}, None, "not an array"),
]


@pytest.mark.parametrize(("leaf", "options", "axes", "reason"), DECISIONS)
def test_leaf_decisions_and_reasons(leaf, options, axes, reason):
    options = {"output_axes": (-1,), "conv_only": False, **options}
    rule = _axes.make_leaf_rule(options["output_axes"], options["conv_only"], "t")
    assert rule((), leaf) == _axes.LeafDecision(axes, reason)


def test_global_shape_decides_fan_in_one():
    rule = _axes.make_leaf_rule((-1,), False, "t")
    shard = jnp.ones((1, 4))  # one row of a (4, 4) kernel sharded 4 ways
    assert rule((), shard).axes is None
    assert rule((), shard, shape=(4, 4)).axes == (1,)


def test_one_default_across_the_api():
    import inspect

    for name in optax_gc.__all__:
        obj = getattr(optax_gc, name)
        if callable(obj) and not isinstance(obj, type):
            try:
                params = inspect.signature(obj).parameters
            except (TypeError, ValueError):
                continue
            if "output_axes" in params:
                assert params["output_axes"].default == (-1,), name
    assert inspect.signature(optax_gc.path_rules).parameters["default"].default == (-1,)
