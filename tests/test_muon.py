"""muon_dimension_numbers: Muon's per-leaf dimension numbers from inferred axes.

Every expected tree is written by hand from the layers' definitions: Flax
``Dense`` kernels are ``(in, out)``, ``DenseGeneral`` q/k/v ``(in, H, D)``
and the attention out-projection ``(H, D, out)``, ``Conv`` ``(kh, kw, in,
out)``, ``nn.scan`` puts the layer axis first, Equinox weights are ``(out,
in)`` and its convolutions ``(out, in, kh, kw)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc

MDN = getattr(optax.contrib, "MuonDimensionNumbers", None)
needs_muon_dims = pytest.mark.skipif(
    MDN is None, reason=f"optax {optax.__version__} has no MuonDimensionNumbers"
)


def is_dims(x):
    return MDN is not None and isinstance(x, MDN)


def dims(reduction, output):
    assert MDN is not None
    return MDN(reduction_axis=reduction, output_axis=output)


def assert_dims_equal(got, expected):
    """Same tree structure, and equal leaves (tuples, in the same order)."""
    got_leaves, got_def = jax.tree.flatten(
        got, is_leaf=lambda x: x is None or is_dims(x)
    )
    exp_leaves, exp_def = jax.tree.flatten(
        expected, is_leaf=lambda x: x is None or is_dims(x)
    )
    assert got_def == exp_def
    for g, e in zip(got_leaves, exp_leaves, strict=True):
        assert g == e
        if e is not None:
            assert type(g) is MDN
            assert type(g.reduction_axis) is tuple and type(g.output_axis) is tuple


# Flax linen models.


def tiny_lm():
    nn = pytest.importorskip("flax.linen")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = nn.LayerNorm()(x)
            return x + nn.Dense(32)(nn.gelu(nn.Dense(64)(h))), None

    class TinyLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(50, 32)(tokens)
            x = x + nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(x))
            stack = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=2,
            )
            x, _ = stack(name="layers")(x, None)
            return nn.Dense(50)(nn.LayerNorm()(x))

    return TinyLM()


def tiny_lm_dims():
    """By hand: Dense_0 is the head (32, 50); the MHA kernels are DenseGeneral
    (32, 4, 8) for q/k/v and (4, 8, 32) out; in the scan, Dense_0 = Dense(32)
    (2, 64, 32) and Dense_1 = Dense(64) (2, 32, 64), axis 0 the layer."""
    qkv = {"kernel": dims((0,), (1, 2)), "bias": None}
    norm = {"scale": None, "bias": None}
    return {
        "Embed_0": {"embedding": None},
        "LayerNorm_0": norm,
        "LayerNorm_1": norm,
        "MultiHeadDotProductAttention_0": {
            "query": qkv,
            "key": qkv,
            "value": qkv,
            "out": {"kernel": dims((0, 1), (2,)), "bias": None},
        },
        "layers": {
            "LayerNorm_0": norm,
            "Dense_0": {"kernel": dims((1,), (2,)), "bias": None},
            "Dense_1": {"kernel": dims((1,), (2,)), "bias": None},
        },
        "Dense_0": {"kernel": dims((0,), (1,)), "bias": None},
    }


def tiny_cnn():
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            x = nn.relu(nn.Conv(8, (1, 1), use_bias=False)(x))
            x = nn.BatchNorm(use_running_average=True)(x)
            return nn.Dense(10)(x.mean((1, 2)))

    return CNN()


def tiny_cnn_dims():
    """By hand: Conv_0 (3, 3, 3, 8), Conv_1 (1, 1, 8, 8): fan-in kh, kw, in."""
    return {
        "Conv_0": {"kernel": dims((0, 1, 2), (3,)), "bias": None},
        "Conv_1": {"kernel": dims((0, 1, 2), (3,))},
        "BatchNorm_0": {"scale": None, "bias": None},
        "Dense_0": {"kernel": dims((0,), (1,)), "bias": None},
    }


def flax_rule(model, x):
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def apply(p, x):
        return model.apply({"params": p, **rest}, x)

    return params, apply, optax_gc.infer_output_axes(apply, params, x)


def lm_tokens():
    return jax.random.randint(jax.random.key(1), (4, 8), 0, 50)


@needs_muon_dims
def test_flax_transformer():
    params, _, rule = flax_rule(tiny_lm(), lm_tokens())
    assert_dims_equal(optax_gc.muon_dimension_numbers(rule, params), tiny_lm_dims())


@needs_muon_dims
def test_flax_convolutions():
    params, _, rule = flax_rule(tiny_cnn(), jnp.zeros((2, 6, 6, 3)))
    assert_dims_equal(optax_gc.muon_dimension_numbers(rule, params), tiny_cnn_dims())


@needs_muon_dims
def test_equinox_output_first_layout():
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 2)
    model = {
        "conv": eqx.nn.Conv2d(3, 8, kernel_size=3, key=keys[0]),  # (8, 3, 3, 3)
        "linear": eqx.nn.Linear(8, 4, key=keys[1]),  # (4, 8)
    }
    params, static = eqx.partition(model, eqx.is_array)

    def apply(p, x):
        m = eqx.combine(p, static)
        h = jax.nn.relu(m["conv"](x))  # (8, 4, 4): no batch axis
        return m["linear"](h.mean((1, 2)))

    rule = optax_gc.infer_output_axes(apply, params, jnp.zeros((3, 6, 6)))
    got = optax_gc.muon_dimension_numbers(rule, params)
    expected = eqx.tree_at(
        lambda m: (
            m["conv"].weight,
            m["conv"].bias,
            m["linear"].weight,
            m["linear"].bias,
        ),
        params,
        (dims((1, 2, 3), (0,)), None, dims((1,), (0,)), None),  # conv bias (8, 1, 1)
        is_leaf=lambda x: x is None,
    )
    assert_dims_equal(got, expected)


# Pure JAX models: stacks, ensembles and the edge cases.


@needs_muon_dims
def test_scan_stacks_are_batch_axes():
    def model(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["scanned"])
        for i in range(p["looped"].shape[0]):  # a Python loop over a stack
            h = jnp.tanh(h @ p["looped"][i])
        return h @ p["w_t"].T  # PyTorch layout (out, in)

    params = {
        "scanned": jnp.zeros((3, 8, 8)),  # (L, in, out)
        "looped": jnp.zeros((2, 8, 8)),  # (L, in, out)
        "w_t": jnp.zeros((5, 8)),  # (out, in)
    }
    rule = optax_gc.infer_output_axes(model, params, jnp.zeros((2, 8)))
    expected = {
        "scanned": dims((1,), (2,)),
        "looped": dims((1,), (2,)),
        "w_t": dims((1,), (0,)),
    }
    assert_dims_equal(optax_gc.muon_dimension_numbers(rule, params), expected)


def ensemble_dims(data_axis):
    def member(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    def ensemble(p, x):
        return jax.vmap(member, in_axes=(0, data_axis))(p, x)

    params = {"w1": jnp.zeros((4, 8, 16)), "w2": jnp.zeros((4, 16, 3))}  # (E, in, out)
    x = jnp.zeros((2, 8) if data_axis is None else (4, 2, 8))
    rule = optax_gc.infer_output_axes(ensemble, params, x)
    return optax_gc.muon_dimension_numbers(rule, params)


# Four independent members: four (in, out) matrices per leaf, not one
# (in, 4 * out) matrix across the members.
ENSEMBLE_DIMS = {"w1": ((1,), (2,)), "w2": ((1,), (2,))}


@needs_muon_dims
def test_vmap_ensemble_members_are_batch_axes():
    expected = {k: dims(*v) for k, v in ENSEMBLE_DIMS.items()}
    assert_dims_equal(ensemble_dims(data_axis=0), expected)


@needs_muon_dims
@pytest.mark.xfail(
    strict=True,
    reason="a weight mapped by vmap against unmapped data reads as a DenseGeneral "
    "kernel with two output axes: infer_output_axes does not list w1's member axis "
    "in InferredAxes.stacked",
)
def test_vmap_ensemble_on_a_shared_input():
    expected = {k: dims(*v) for k, v in ENSEMBLE_DIMS.items()}
    assert_dims_equal(ensemble_dims(data_axis=None), expected)


@needs_muon_dims
def test_vectors_empty_leaves_and_non_floats_go_to_adam():
    def model(p, x):
        def body(h, v):  # one unit per layer: each slice is a vector
            return h * (h @ v)[:, None], None

        h, _ = jax.lax.scan(body, x, p["vectors"])
        h = (h @ p["one_out"]) @ p["one_in"]  # (4, 1) then (1, 6)
        h = h + (x @ p["empty"]).sum() + x[:, :1] @ p["ints"].astype(jnp.float32)
        return h @ p["unit_head"].reshape(6, 5) + p["b"]

    params = {
        "vectors": jnp.zeros((3, 4)),  # (L, in): no output axis left
        "one_out": jnp.zeros((4, 1)),  # a Dense(1) kernel: (in, 1)
        "one_in": jnp.zeros((1, 6)),  # one input feature: (1, out)
        "empty": jnp.zeros((4, 0)),  # zero-size
        "ints": jnp.zeros((1, 6), jnp.int32),  # not floating-point
        "unit_head": jnp.zeros((6, 1, 5)),  # a size-1 output axis, still a matrix
        "b": jnp.zeros((1, 5)),
        "name": "not an array",
    }
    rule = optax_gc.infer_output_axes(model, params, jnp.zeros((2, 4)))
    # GC keeps these leaves' output axes; Muon gets none of them but unit_head.
    assert rule.decisions["vectors"][0] == (0,) and rule.stacked["vectors"] == (0,)
    assert rule.decisions["one_out"][0] == (1,)
    expected = {k: None for k in params}
    expected["unit_head"] = dims((0,), (1, 2))
    assert_dims_equal(optax_gc.muon_dimension_numbers(rule, params), expected)


@needs_muon_dims
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_none_subtrees_and_shape_structs(dtype):
    def model(p, x):
        return x @ p["w"]

    params = {"w": jax.ShapeDtypeStruct((3, 4), dtype), "unused": None}
    rule = optax_gc.infer_output_axes(model, params, jnp.zeros((2, 3), dtype))
    expected = {"w": dims((0,), (1,)), "unused": None}
    assert_dims_equal(optax_gc.muon_dimension_numbers(rule, params), expected)


@needs_muon_dims
def test_a_rule_that_centres_nothing_warns_and_gives_adam_everywhere():
    def model(p, ids):
        return p["table"][ids] + p["bias"]

    params = {"table": jnp.zeros((10, 4)), "bias": jnp.zeros((1, 4))}
    with pytest.warns(optax_gc.InferenceWarning):
        rule = optax_gc.infer_output_axes(model, params, jnp.zeros((2,), jnp.int32))
    got = optax_gc.muon_dimension_numbers(rule, params)
    assert_dims_equal(got, {"table": None, "bias": None})


def linear_rule():
    params = {"w": jnp.zeros((3, 4))}
    rule = optax_gc.infer_output_axes(
        lambda p, x: x @ p["w"], params, jnp.zeros((2, 3))
    )
    return params, rule


@needs_muon_dims
def test_a_leaf_the_rule_never_saw_raises_naming_its_path():
    params, rule = linear_rule()
    with pytest.raises(ValueError, match='leaf "other" is not a leaf'):
        optax_gc.muon_dimension_numbers(rule, {**params, "other": jnp.zeros((3, 4))})
    with pytest.raises(ValueError, match='leaf "w" has shape'):
        optax_gc.muon_dimension_numbers(rule, {"w": jnp.zeros((4, 3))})


@needs_muon_dims
def test_hand_written_rules_are_refused():
    params, _ = linear_rule()
    with pytest.raises(TypeError, match="infer_output_axes"):
        optax_gc.muon_dimension_numbers(optax_gc.path_rules({"w": -1}), params)


@pytest.mark.parametrize("missing", ["MuonDimensionNumbers", "both"])
def test_an_optax_without_muon_dimension_numbers_is_named(monkeypatch, missing):
    monkeypatch.delattr(optax.contrib, "MuonDimensionNumbers", raising=False)
    if missing == "both":
        monkeypatch.delattr(optax.contrib, "muon", raising=False)
    monkeypatch.setattr(optax, "__version__", "0.2.5")
    params, rule = linear_rule()
    has = "no optax.contrib.muon" if missing == "both" else "optax.contrib.muon but"
    with pytest.raises(ImportError, match=rf"installed optax 0\.2\.5 has {has}") as e:
        optax_gc.muon_dimension_numbers(rule, params)
    assert "optax >= 0.2.6" in str(e.value)


# optax.contrib.muon with the inferred numbers.


def lm_problem():
    model, tokens = tiny_lm(), lm_tokens()
    params, apply, rule = flax_rule(model, tokens)

    def loss_fn(p):
        logits = apply(p, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    return params, rule, loss_fn


def train(tx, params, loss_fn, steps):
    @jax.jit
    def step(p, state):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, loss, updates

    state, losses, first = tx.init(params), [], None
    for _ in range(steps):
        params, state, loss, updates = step(params, state)
        first = updates if first is None else first
        losses.append(float(loss))
    return losses, first, params


def muon(weight_dims):
    return optax.contrib.muon(
        0.02, adam_learning_rate=3e-3, muon_weight_dimension_numbers=weight_dims
    )


@needs_muon_dims
def test_muon_with_inferred_numbers_trains_like_hand_written_ones():
    params, rule, loss_fn = lm_problem()
    inferred = optax_gc.muon_dimension_numbers(rule, params)
    losses, first, final = train(muon(inferred), params, loss_fn, 30)
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(losses))
    by_hand_losses, by_hand_first, by_hand_final = train(
        muon(tiny_lm_dims()), params, loss_fn, 30
    )
    np.testing.assert_allclose(losses, by_hand_losses, rtol=1e-6)
    for tree, by_hand in ((first, by_hand_first), (final, by_hand_final)):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            tree,
            by_hand,
        )
    # The callable form, resolved by muon on its own params.
    lazy = muon(lambda p: optax_gc.muon_dimension_numbers(rule, p))
    _, lazy_first, _ = train(lazy, params, loss_fn, 1)
    jax.tree.map(np.testing.assert_array_equal, lazy_first, first)


@needs_muon_dims
def test_on_plain_dense_layers_it_is_muons_default():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))

    x = jax.random.normal(jax.random.key(2), (8, 5))
    y = jax.random.normal(jax.random.key(3), (8, 3))
    params, apply, rule = flax_rule(MLP(), x)

    def loss_fn(p):
        return jnp.mean((apply(p, x) - y) ** 2)

    inferred = optax_gc.muon_dimension_numbers(rule, params)
    # Muon's default: every 2-D leaf (in, out) to Muon, the 1-D biases to Adam.
    _, first, _ = train(muon(inferred), params, loss_fn, 3)
    _, default_first, _ = train(muon(None), params, loss_fn, 3)
    jax.tree.map(np.testing.assert_array_equal, first, default_first)


def by_path(tree, is_leaf=None):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


@needs_muon_dims
def test_gc_before_muon_keeps_its_updates_centred():
    params, rule, loss_fn = lm_problem()
    inferred = optax_gc.muon_dimension_numbers(rule, params)
    tx = optax.chain(optax_gc.centralize(output_axes=rule), muon(inferred))
    losses, first, final = train(tx, params, loss_fn, 30)
    assert losses[-1] < 0.5 * losses[0]
    _, plain_first, _ = train(muon(inferred), params, loss_fn, 1)

    def fan_in_mean(u, d):  # relative to the update's size
        return float(
            jnp.abs(jnp.mean(u, axis=d.reduction_axis)).max() / jnp.abs(u).max()
        )

    numbers = by_path(inferred, is_leaf=is_dims)
    updates, plain = by_path(first), by_path(plain_first)
    muon_leaves = [path for path, d in numbers.items() if is_dims(d)]
    assert len(muon_leaves) == 7  # the Muon leaves of tiny_lm_dims
    before, after = by_path(params), by_path(final)
    for path in muon_leaves:
        assert fan_in_mean(updates[path], numbers[path]) < 1e-5, path
        # So every output unit's mean weight stays where it started.
        axis = numbers[path].reduction_axis
        np.testing.assert_allclose(
            jnp.mean(after[path], axis=axis),
            jnp.mean(before[path], axis=axis),
            atol=1e-6,
        )
    # Kernels reading a LayerNorm's output (bias 0 at init) have centred
    # gradients already; these two do not, and plain Muon does not centre them.
    for path in ("MultiHeadDotProductAttention_0/out/kernel", "layers/Dense_0/kernel"):
        assert fan_in_mean(plain[path], numbers[path]) > 1e-3, path
