"""Axes types, validation, key-path format and per-leaf decisions (``_axes``)."""

from typing import Any, NamedTuple

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
        {"output_axes": optax_gc.per_leaf(lambda p, x: None)},
        None,
        "per_leaf rule",
    ),
    (optax.MaskedNode(), {}, None, "not an array"),
]


@pytest.mark.parametrize(("leaf", "options", "axes", "reason"), DECISIONS)
def test_leaf_decisions_and_reasons(leaf, options, axes, reason):
    options = {"output_axes": (-1,), "conv_only": False, **options}
    rule = _axes.LeafRule(options["output_axes"], options["conv_only"], "t")
    assert rule((), leaf) == _axes.LeafDecision(axes, reason)


def test_global_shape_decides_fan_in_one():
    rule = _axes.LeafRule((-1,), False, "t")
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


# --- output_axes as a tree of axes, or as params -> tree -------------------------


def _flax_params():
    """A real Flax model's parameters: Conv, DenseGeneral (in, H, D), Dense."""
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x).reshape(x.shape[0], -1)
            x = nn.DenseGeneral((2, 3), name="heads")(x)
            return nn.Dense(5)(x.reshape(x.shape[0], -1))

    return Net().init(jax.random.key(0), jnp.ones((2, 4, 4, 1)))["params"]


# The same axes, by hand from Flax's layouts, in each accepted form.
AS_RULE = optax_gc.path_rules(
    {r"heads/kernel$": (1, 2), r"heads/bias$": None, r"kernel$": -1}, default=None
)
AS_TREE = {
    "Conv_0": {"kernel": -1, "bias": None},
    "heads": {"kernel": (1, 2), "bias": None},
    "Dense_0": {"kernel": (-1,), "bias": None},
}


def _as_fn(params):
    def axes(path, leaf):
        name = "/".join(str(k.key) for k in path)
        if not name.endswith("kernel"):
            return None
        return (1, 2) if name.startswith("heads") else -1

    return jax.tree_util.tree_map_with_path(axes, params)


def _grads(params, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [
        jax.random.normal(k, x.shape) + 1.0 for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


def _hand_oracle(grads):
    """Φ by numpy over the fan-in read from Flax's layouts."""
    out = jax.tree.map(np.asarray, grads)
    for name, axes in (("Conv_0", (0, 1, 2)), ("heads", (0,)), ("Dense_0", (0,))):
        g = out[name]["kernel"]
        out[name]["kernel"] = g - g.mean(axis=axes, keepdims=True)
    return out


@pytest.mark.parametrize("form", ["tree", "fn"])
def test_axes_tree_and_fn_equal_the_rule_leaf_for_leaf(form):
    params = _flax_params()
    grads = _grads(params)
    given = AS_TREE if form == "tree" else _as_fn
    expected = _hand_oracle(grads)
    for output_axes in (AS_RULE, given):
        got = jax.jit(optax_gc.centralize(output_axes=output_axes).update)(grads, None)
        for (path, g), want in zip(
            jax.tree_util.tree_leaves_with_path(got[0]),
            jax.tree.leaves(expected),
            strict=True,
        ):
            np.testing.assert_allclose(g, want, atol=1e-6, err_msg=str(path))
    ours = optax_gc.explain(params, output_axes=given)
    theirs = optax_gc.explain(params, output_axes=AS_RULE)
    assert [r.kept for r in ours] == [r.kept for r in theirs]
    assert [r.path for r in ours if r.kept] == [
        "Conv_0/kernel",
        "Dense_0/kernel",
        "heads/kernel",
    ]


def test_a_prefix_tree_applies_to_whole_subtrees():
    params = _flax_params()
    prefix = {"Conv_0": -1, "heads": {"kernel": (1, 2), "bias": None}, "Dense_0": None}
    table = optax_gc.explain(params, output_axes=prefix)
    assert {r.path: (r.kept, r.why) for r in table} == {
        "Conv_0/bias": (None, "ndim < 2"),
        "Conv_0/kernel": ((3,), "output_axes tree"),
        "Dense_0/bias": (None, "ndim < 2"),
        "Dense_0/kernel": (None, "None in output_axes tree"),
        "heads/bias": (None, "None in output_axes tree"),
        "heads/kernel": ((1, 2), "output_axes tree"),
    }


@pytest.mark.parametrize(
    "name, make",
    [
        ("gc_sgd", lambda axes: optax_gc.gc_sgd(0.1, momentum=0.9, output_axes=axes)),
        ("gc_adam", lambda axes: optax_gc.gc_adam(1e-2, output_axes=axes)),
        (
            "gc_adam-update",
            lambda axes: optax_gc.gc_adam(1e-2, location="update", output_axes=axes),
        ),
        ("gc_adamw", lambda axes: optax_gc.gc_adamw(1e-2, output_axes=axes)),
        (
            "with_gc-update",
            lambda axes: optax_gc.with_gc(
                optax.lion(1e-3), location="update", output_axes=axes
            ),
        ),
        (
            "inject_hyperparams",
            lambda axes: optax.inject_hyperparams(
                optax_gc.gc_adam, static_args=("output_axes",)
            )(learning_rate=1e-2, output_axes=axes),
        ),
    ],
)
def test_every_alias_takes_the_tree_and_fn_forms(name, make):
    params = _flax_params()
    grads = _grads(params)

    def run(axes):
        tx = make(axes)

        @jax.jit
        def step(p, s):
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        p, s = params, tx.init(params)
        for _ in range(3):
            p, s = step(p, s)
        return p

    want = run(AS_RULE)
    for axes in (AS_TREE, _as_fn):
        got = run(axes)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=name)


def test_gc_fraction_takes_the_tree_form():
    params = _flax_params()
    grads = _grads(params)
    ours = optax_gc.gc_fraction(grads, output_axes=AS_TREE)
    theirs = optax_gc.gc_fraction(grads, output_axes=AS_RULE)
    assert jax.tree.map(float, ours) == jax.tree.map(float, theirs)
    assert float(ours["heads"]["kernel"]) > 0 and float(ours["heads"]["bias"]) == 0


def test_a_tree_that_is_not_a_prefix_names_output_axes_and_the_path():
    tx = optax_gc.centralize(output_axes={"a": 0, "b": 0})
    with pytest.raises(ValueError, match='output_axes: the axes at "b" match no'):
        tx.update({"a": jnp.ones((2, 3))}, None)
    tx = optax_gc.centralize(output_axes={"a": 0})
    with pytest.raises(ValueError, match='output_axes: no axes for leaf "c/w"'):
        tx.update({"a": jnp.ones((2, 3)), "c": {"w": jnp.ones((2, 3))}}, None)


@pytest.mark.parametrize("combinator", ["masked", "multi_transform"])
def test_a_params_axes_tree_fits_under_a_prefix_mask(combinator):
    params = {"enc": {"w": jnp.ones((4, 3))}, "dec": {"w": jnp.ones((4, 3))}}
    grads = {
        "enc": {"w": jnp.arange(12.0).reshape(4, 3)},
        "dec": {"w": jnp.ones((4, 3))},
    }
    gc = optax_gc.centralize(output_axes={"enc": {"w": 0}, "dec": {"w": 0}})
    if combinator == "masked":
        tx = optax.masked(gc, {"enc": True, "dec": False})
    else:
        tx = optax.multi_transform(
            {"gc": gc, "none": optax.identity()}, {"enc": "gc", "dec": "none"}
        )
    out, _ = tx.update(grads, tx.init(params), params)
    g = np.arange(12.0).reshape(4, 3)
    np.testing.assert_allclose(out["enc"]["w"], g - g.mean(1, keepdims=True))
    np.testing.assert_array_equal(out["dec"]["w"], grads["dec"]["w"])


def test_bad_axes_inside_a_tree_name_their_path():
    with pytest.raises(ValueError, match='output_axes at "heads/kernel"'):
        optax_gc.centralize(output_axes={"heads": {"kernel": (1, 1)}})
    tx = optax_gc.centralize(output_axes=lambda params: {"w": "x"})
    with pytest.raises(ValueError, match='output_axes\\(params\\) returned.*"w"'):
        tx.update({"w": jnp.ones((2, 3))}, None)


def test_a_per_leaf_function_needs_the_wrapper_and_says_so():
    with pytest.raises(ValueError, match=r"optax_gc\.per_leaf\(fn\)"):
        optax_gc.gc_adam(1e-3, output_axes=lambda path, leaf: -1)
    with pytest.raises(ValueError, match="cannot take one argument"):
        optax_gc.centralize(output_axes=lambda: -1)
    with pytest.raises(ValueError, match="per_leaf: fn must be"):
        optax_gc.per_leaf(lambda params: -1)


def test_a_fn_under_inject_hyperparams_without_static_args_says_so():
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(
        learning_rate=1e-2, output_axes=_as_fn
    )
    params = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="static_args"):
        tx.update(params, tx.init(params), params)


class _Pair(NamedTuple):
    torch: Any
    flax: Any


def test_a_namedtuple_of_ints_is_a_container_not_axes():
    grads = _Pair(torch=jnp.ones((8, 3, 5)), flax=jnp.ones((5, 3, 8)))
    table = optax_gc.explain(grads, output_axes=_Pair(torch=0, flax=2))
    assert [r.kept for r in table] == [(0,), (2,)]


def test_a_list_of_ints_over_a_list_of_subtrees_is_refused_as_ambiguous():
    grads = {"layers": [jnp.ones((4, 3, 5)), jnp.ones((4, 3, 5))]}
    with pytest.raises(ValueError, match="reads two ways"):
        optax_gc.explain(grads, output_axes={"layers": [0, 2]})
    table = optax_gc.explain(grads, output_axes={"layers": [(0,), (2,)]})
    assert [r.kept for r in table] == [(0,), (2,)]


def test_a_fn_that_returns_none_is_an_error():
    def forgot_to_return(params):
        jax.tree.map(lambda x: -1, params)

    tx = optax_gc.centralize(output_axes=forgot_to_return)
    with pytest.raises(ValueError, match="returned None"):
        tx.update({"w": jnp.ones((2, 3))}, None)


def test_an_equinox_module_of_axes_is_a_tree_not_a_fn():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_array)
    axes = jax.tree.map(lambda a: 0 if a.ndim >= 2 else None, params)
    assert callable(axes)  # an eqx.Module is callable: still a tree of axes
    table = optax_gc.explain(params, output_axes=axes)
    assert [r.kept for r in table if r.kept] == [(0,), (0,)]


def test_a_bad_root_value_names_no_empty_path():
    tx = optax_gc.centralize(output_axes=lambda params: "x")
    with pytest.raises(ValueError) as info:
        tx.update({"w": jnp.ones((2, 3))}, None)
    assert 'at ""' not in str(info.value)
