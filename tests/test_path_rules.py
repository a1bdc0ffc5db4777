"""optax_gc.path_rules: per-leaf output axes from key-path patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc


def _apply(rule, grads):
    return optax_gc.centralize(output_axes=rule).update(grads, None)[0]


def test_first_match_wins_and_default_applies():
    rule = optax_gc.path_rules(
        [(r"stack/.*kernel$", (0, -1)), (r"kernel$", 0)], default=None
    )
    g = jnp.arange(24.0).reshape(2, 3, 4)
    out = _apply(rule, {"stack": {"kernel": g}, "k": {"kernel": g[0]}, "w": g[0]})
    np.testing.assert_allclose(out["stack"]["kernel"], g - g.mean(1, keepdims=True))
    np.testing.assert_allclose(out["k"]["kernel"], g[0] - g[0].mean(1, keepdims=True))
    np.testing.assert_array_equal(out["w"], g[0])  # default None: untouched


def test_rules_as_lists_of_pairs():
    rule = optax_gc.path_rules([["kernel$", 0]])  # e.g. read from a JSON config
    assert rule.decide((jax.tree_util.DictKey("kernel"),), None)[0] == 0


def test_nnx_value_suffix_is_dropped():
    nnx = pytest.importorskip("flax.nnx")

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    grads = nnx.state(model, nnx.Param)
    rule = optax_gc.path_rules({r"^kernel$": None, r"^bias$": None}, default=-1)
    out = _apply(rule, grads)
    np.testing.assert_array_equal(out["kernel"][...], grads["kernel"][...])


@pytest.mark.parametrize(
    ("rules", "kwargs", "match"),
    [
        ({"(": -1}, {}, "invalid pattern"),
        ({"kernel": "last"}, {}, "output_axes"),
        ({"kernel": (0, 0)}, {}, "repeats"),
        ([("kernel",)], {}, "pairs"),
        ([(b"kernel", 0)], {}, "must be a str"),
        ({}, {"default": 1.5}, "default"),
    ],
)
def test_bad_rules_rejected_at_construction(rules, kwargs, match):
    with pytest.raises(ValueError, match=match):
        optax_gc.path_rules(rules, **kwargs)


def test_rule_that_does_not_fit_names_the_leaf_in_pattern_form():
    rule = optax_gc.path_rules({"out/kernel$": (2,)})
    grads = {"out": {"kernel": jnp.ones((3, 4))}}
    with pytest.raises(ValueError, match='"out/kernel"') as info:
        _apply(rule, grads)
    # The quoted path, pasted into a rule, matches that leaf.
    quoted = str(info.value).split('"')[1]
    fixed = optax_gc.path_rules({f"^{quoted}$": None}, strict=True)
    np.testing.assert_array_equal(_apply(fixed, grads)["out"]["kernel"], 1.0)


def test_decide_gives_the_matching_pattern():
    rule = optax_gc.path_rules({r"embed": None, r"kernel$": 0})
    leaf = jnp.ones((2, 2))
    path = (jax.tree_util.DictKey("dense"), jax.tree_util.DictKey("kernel"))
    assert rule.decide(path, leaf) == (0, "path_rules 'kernel$'")
    assert rule(path, leaf) == 0
    other = (jax.tree_util.DictKey("w"),)
    assert rule.decide(other, leaf) == ((-1,), "path_rules default")


# --- patterns that match nothing --------------------------------------------------


def test_unmatched_pattern_warns_once_per_trace():
    rule = optax_gc.path_rules({r"kernal$": None, r"bias$": None})  # typo
    grads = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    tx = optax_gc.centralize(output_axes=rule)
    step = jax.jit(tx.update)
    with pytest.warns(optax_gc.UnmatchedPatternWarning, match="kernal") as record:
        step(grads, tx.init(grads))
        step(grads, tx.init(grads))  # cached: no second trace, no second warning
    assert len(record) == 1
    assert "['kernal$']" in str(record[0].message)  # bias$ matched a 1-D leaf


def test_strict_unmatched_pattern_is_an_error():
    rule = optax_gc.path_rules({r"kernal$": None}, strict=True)
    with pytest.raises(ValueError, match="kernal"):
        _apply(rule, {"kernel": jnp.ones((3, 2))})


def test_every_pattern_matching_is_silent(recwarn):
    rule = optax_gc.path_rules({r"kernel$": -1}, strict=True)
    _apply(rule, {"kernel": jnp.ones((3, 2))})
    assert not recwarn.list


def test_strict_must_be_a_bool():
    with pytest.raises(ValueError, match="strict"):
        optax_gc.path_rules({}, strict="yes")


# --- inject_hyperparams ---------------------------------------------------------


def test_inject_hyperparams_without_static_args_says_what_to_do():
    rule = optax_gc.path_rules({r"kernel$": -1})
    params = {"kernel": jnp.ones((3, 2))}
    tx = optax.inject_hyperparams(optax_gc.gc_adam)(1e-3, output_axes=rule)
    with pytest.raises(ValueError, match=r"static_args=\('output_axes',\)"):
        tx.init(params)
    tx = optax.inject_hyperparams(
        optax_gc.gc_adam, static_args=("output_axes", "location")
    )(1e-3, output_axes=rule, location="update")
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"].mean(0), 0.0, atol=1e-7)


def test_shadowed_pattern_is_reported():
    # Every attn kernel is decided by the earlier, broader pattern.
    rule = optax_gc.path_rules({r"kernel$": 0, r"attn/.*kernel$": (1, 2)})
    grads = {"attn": {"q": {"kernel": jnp.ones((4, 2, 3))}}}
    with pytest.warns(optax_gc.UnmatchedPatternWarning, match="earlier pattern"):
        _apply(rule, grads)
    strict = optax_gc.path_rules(
        {r"attn/.*kernel$": (1, 2), r"kernel$": 0}, strict=True
    )
    grads["dense"] = {"kernel": jnp.ones((4, 2))}
    out = _apply(strict, grads)  # the specific pattern first: both decide
    np.testing.assert_allclose(out["attn"]["q"]["kernel"], 0.0, atol=1e-7)


def test_error_on_a_bare_array_names_the_root():
    tx = optax_gc.centralize(output_axes=(5,))
    with pytest.raises(ValueError, match="at the root leaf"):
        tx.update(jnp.ones((3, 4)), None)


@pytest.mark.parametrize("rules", [{("kernel$", 0)}, frozenset({("kernel$", 0)})])
def test_unordered_rules_are_refused(rules):
    # The first match wins, so a set's order (PYTHONHASHSEED) would decide.
    with pytest.raises(ValueError, match="rules must be ordered"):
        optax_gc.path_rules(rules)


def test_a_callable_inside_path_rules_is_refused_with_the_right_advice():
    with pytest.raises(ValueError, match="not inside path_rules") as info:
        optax_gc.path_rules({"kernel$": lambda path, leaf: 0})
    assert "optax_gc.per_leaf" in str(info.value)
