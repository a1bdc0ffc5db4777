"""gc_fraction (the share of each gradient GC removes) and explain (the table)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc


def test_values():
    grads = {
        "constant": jnp.ones((3, 2)),  # all of it is removed
        "centred": jnp.array([[1.0, 2.0], [-1.0, -2.0]]),  # nothing removed
        "half": jnp.array([[2.0], [0.0]]),  # mean [1]: ||[1,1]|| / ||[2,0]||
        "bias": jnp.ones(3),
        "zeros": jnp.zeros((2, 2)),
        "none": None,
    }
    out = jax.jit(optax_gc.gc_fraction)(grads)
    np.testing.assert_allclose(out["constant"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["centred"], 0.0, atol=1e-7)
    np.testing.assert_allclose(out["half"], np.sqrt(2) / 2, rtol=1e-6)
    assert out["bias"] == 0.0 and out["zeros"] == 0.0 and out["none"] is None
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))


def test_follows_the_same_rules_as_centralize():
    g = jax.random.normal(jax.random.key(3), (4, 6))
    flax = optax_gc.gc_fraction({"g": g})["g"]
    torch = optax_gc.gc_fraction({"g": g}, output_axes=0)["g"]
    gcc = optax_gc.gc_fraction({"g": g}, conv_only=True)["g"]
    phi = optax_gc.centralize_array(g)
    np.testing.assert_allclose(
        flax, np.linalg.norm(g - phi) / np.linalg.norm(g), rtol=1e-5
    )
    assert torch != flax and gcc == 0.0
    with pytest.raises(ValueError, match="output_axes"):
        optax_gc.gc_fraction({"g": g}, output_axes=(0, 1))


def _reference(g, axis=0):
    g = np.asarray(g, np.float64)
    removed = np.broadcast_to(g.mean(axis, keepdims=True), g.shape)
    return np.linalg.norm(removed) / np.linalg.norm(g)


def test_float16_is_finite_and_right():
    # Regression: the squared norms overflowed in float16 and gave NaN.
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal((1000, 10)) * 10 + 5, jnp.float16)
    got = jax.jit(optax_gc.gc_fraction)({"g": g})["g"]
    assert np.isfinite(got)
    np.testing.assert_allclose(got, _reference(g), rtol=1e-4)


@pytest.mark.parametrize("scale", [2e19, 1e30, 1e37, 1e-25, 1e-35])
def test_float32_extremes_are_finite_and_right(scale):
    # Regression: ||g||^2 overflows float32 near 2e19 (and underflows to 0/0
    # for tiny gradients).
    g = jax.random.normal(jax.random.key(0), (50, 4)) + 0.5
    expected = _reference(g)
    got = optax_gc.gc_fraction({"g": g * jnp.float32(scale)})["g"]
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_bfloat16_and_complex():
    g = jax.random.normal(jax.random.key(1), (64, 3)) + 1.0
    got = optax_gc.gc_fraction({"g": g.astype(jnp.bfloat16)})["g"]
    np.testing.assert_allclose(got, _reference(g.astype(jnp.bfloat16)), rtol=1e-3)
    c = (g + 1j * g[::-1]).astype(jnp.complex64)
    got = optax_gc.gc_fraction({"c": c})["c"]
    removed = np.broadcast_to(np.asarray(c).mean(0, keepdims=True), c.shape)
    np.testing.assert_allclose(
        got, np.linalg.norm(removed) / np.linalg.norm(np.asarray(c)), rtol=1e-5
    )
    assert got.dtype == jnp.float32


def test_top_of_the_float32_range():
    g = jnp.array([[9e37, -4.5e37], [2.25e37, 0.0]], jnp.float32)
    np.testing.assert_allclose(
        optax_gc.gc_fraction({"g": g})["g"], _reference(g), rtol=1e-5
    )
    top = jnp.full((2, 2), jnp.finfo(jnp.float32).max).at[0, 0].set(0.0)
    np.testing.assert_allclose(
        optax_gc.gc_fraction({"g": top})["g"], _reference(top), rtol=1e-5
    )


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_gradients_report_nan(bad):
    # Regression: a NaN gradient reported 0 ("GC removes nothing").
    g = jnp.array([[1.0, bad], [2.0, 3.0]])
    assert np.isnan(jax.jit(optax_gc.gc_fraction)({"g": g})["g"])
    c = g.astype(jnp.complex64) * 1j
    assert np.isnan(optax_gc.gc_fraction({"c": c})["c"])


# -- explain ------------------------------------------------------------------------


def _tree():
    return {
        "conv": jax.ShapeDtypeStruct((3, 3, 2, 8), jnp.bfloat16),
        "dense": {"kernel": jnp.zeros((4, 5)), "bias": jnp.zeros(5)},
        "steps": jnp.zeros((2, 2), jnp.int32),
        "one_in": jnp.zeros((1, 5)),
        "empty": jnp.zeros((0, 3)),
        "none": None,
        "masked": optax.MaskedNode(),
        "label": "frozen",
    }


def test_explain_rows():
    table = optax_gc.explain(_tree())
    rows = {r.path: r for r in table}
    # None and MaskedNode are empty subtrees: no row, like centralize.
    assert list(rows) == [
        "conv", "dense/bias", "dense/kernel", "empty", "label", "one_in", "steps"
    ]  # fmt: skip
    assert rows["conv"] == optax_gc.LeafReport(
        "conv", (3, 3, 2, 8), "bfloat16", (3,), 18, 8, "output_axes=(-1,)"
    )
    assert rows["dense/kernel"][3:] == ((1,), 4, 5, "output_axes=(-1,)")
    assert rows["dense/bias"].why == "ndim < 2"
    assert rows["steps"].why == "not floating (int32)"
    assert rows["one_in"].why == "fan-in 1"
    assert rows["empty"].why == "zero-size"
    assert rows["label"] == optax_gc.LeafReport(
        "label", None, None, None, None, None, "not an array"
    )
    assert table["dense/kernel"] is rows["dense/kernel"] and table[0] == rows["conv"]
    assert (table.touched_leaves, table.touched_params) == (2, 144 + 20)
    assert table.total_params == 144 + 20 + 5 + 4 + 5
    with pytest.raises(KeyError, match="no leaf with path 'dense'"):
        table["dense"]


def test_explain_agrees_with_centralize_on_every_leaf():
    grads = {
        "a": jnp.ones((3, 4)),
        "b": jnp.ones((2, 3, 4)),
        "c": jnp.ones((4,)),
        "d": jnp.ones((1, 4, 2)),
    }
    rule = optax_gc.path_rules({"^b$": (0, 2), "^d$": 1})
    out, _ = optax_gc.centralize(output_axes=rule).update(grads, None)
    for row in optax_gc.explain(grads, output_axes=rule):
        changed = not np.array_equal(out[row.path], grads[row.path])
        assert changed == (row.kept is not None), row


def test_explain_names_the_pattern_the_conv_only_rule_and_the_inference():
    tree = {"q": jnp.zeros((3, 2, 4)), "w": jnp.zeros((3, 4))}
    table = optax_gc.explain(tree, output_axes=optax_gc.path_rules({"q$": (1, 2)}))
    assert [r.why for r in table] == ["path_rules 'q$'", "path_rules default"]
    assert optax_gc.explain(tree, conv_only=True)["w"].why == "ndim < 4"

    def fn(p, x):
        return jnp.einsum("bi,ihd->bhd", x, p["q"]) @ p["w"].T

    rule = optax_gc.infer_output_axes(fn, tree, jnp.zeros((2, 3)))
    table = optax_gc.explain(tree, output_axes=rule)
    assert [(r.kept, r.fan_in, r.units, r.why) for r in table] == [
        ((1, 2), 3, 8, "dot_general contracts axis 0"),
        ((0,), 4, 3, "dot_general contracts axis 1"),
    ]


def test_explain_prints_a_table_and_a_summary():
    text = str(optax_gc.explain({"w": jnp.zeros((30, 4)), "b": jnp.zeros(4)}))
    assert text.splitlines() == [
        "path  shape    dtype    kept   M  N  why",
        "b     (4,)     float32  -      -  -  ndim < 2",
        "w     (30, 4)  float32  (1,)  30  4  output_axes=(-1,)",
        "GC touches 1 of 2 leaves: 120 of 124 parameters (96.8%).",
    ]
    assert repr(optax_gc.explain({})) == (
        "path  shape  dtype  kept  M  N  why\n"
        "GC touches 0 of 0 leaves: 0 of 0 parameters (0.0%)."
    )


def test_explain_reads_prng_key_leaves():
    table = optax_gc.explain({"key": jax.random.key(0), "w": jnp.zeros((3, 4))})
    assert table["key"] == optax_gc.LeafReport(
        "key", (), "key<fry>", None, None, None, "not floating (key<fry>)"
    )
    assert table.touched_leaves == 1


def test_explain_errors_name_the_option_and_the_leaf():
    with pytest.raises(ValueError, match="explain: conv_only must be a bool"):
        optax_gc.explain({}, conv_only=1)
    with pytest.raises(ValueError, match='explain at leaf "w": output_axes=\\(2,\\)'):
        optax_gc.explain({"w": jnp.zeros((3, 4))}, output_axes=2)
