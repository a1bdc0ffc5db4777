"""optax_gc.path_rules: per-leaf output axes from key-path patterns."""

import jax.numpy as jnp
import numpy as np
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


def test_nnx_value_suffix_is_dropped():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    grads = nnx.state(model, nnx.Param)
    rule = optax_gc.path_rules({r"^kernel$": None}, default=-1)
    out = _apply(rule, grads)
    np.testing.assert_array_equal(out["kernel"][...], grads["kernel"][...])


@pytest.mark.parametrize(
    ("rules", "kwargs", "match"),
    [
        ({"(": -1}, {}, "invalid pattern"),
        ({"kernel": "last"}, {}, "output_axes"),
        ({"kernel": (0, 0)}, {}, "repeats"),
        ([("kernel",)], {}, "pairs"),
        ({}, {"default": 1.5}, "default"),
    ],
)
def test_bad_rules_rejected_at_construction(rules, kwargs, match):
    with pytest.raises(ValueError, match=match):
        optax_gc.path_rules(rules, **kwargs)


def test_rule_that_does_not_fit_names_the_leaf():
    rule = optax_gc.path_rules({"out/kernel$": (2,)})
    with pytest.raises(ValueError, match=r"\['out'\]\['kernel'\]"):
        _apply(rule, {"out": {"kernel": jnp.ones((3, 4))}})
