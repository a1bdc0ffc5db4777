"""infer_output_axes: the analysis rule by rule, its contract as a rule, errors.

Whole models built from Flax, Equinox and Haiku layers are in
``tests/infer/test_<framework>.py``; raw-JAX models in
``tests/infer/test_jax_models.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc

X = jax.ShapeDtypeStruct((5, 3), jnp.float32)

# Models in which no leaf should be centred: infer_output_axes says so with an
# InferenceWarning (tested at the end of this file); these tests check the
# decisions themselves.
CENTRES_NOTHING = pytest.mark.filterwarnings("ignore::optax_gc.InferenceWarning")


def axes_of(rule):
    return {path: axes for path, (axes, _) in rule.decisions.items()}


def why(rule, path):
    return rule.decisions[path][1]


# -- uses ---------------------------------------------------------------------------


def test_matmul_either_side_and_transposed():
    def fn(p, x):
        h = x @ p["in_out"]  # (3, 4): fan-in 0
        h = h @ p["out_in"].T  # (6, 4): fan-in 1
        return p["left"] @ h.T  # (2, 6): weight on the left, fan-in 1

    params = {
        "in_out": jnp.zeros((3, 4)),
        "out_in": jnp.zeros((6, 4)),
        "left": jnp.zeros((2, 6)),
    }
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert axes_of(rule) == {"in_out": (1,), "out_in": (0,), "left": (0,)}
    assert why(rule, "out_in") == "dot_general contracts axis 1"


def test_reshape_merging_and_splitting_axes():
    def fn(p, x):
        # (in, H, D) merged to (in, H*D): the fan-in stays axis 0.
        h = x @ p["qkv"].reshape(3, 8)
        # (H*D, out) split to (H, D, out) and contracted over both.
        h = jnp.einsum("bhd,hdo->bo", h.reshape(5, 2, 4), p["out"].reshape(2, 4, 3))
        # PyTorch conv layout (out, in, kh, kw) flattened to (out, in*kh*kw).
        return h @ p["torch_conv"].reshape(6, 3).T

    params = {
        "qkv": jnp.zeros((3, 2, 4)),
        "out": jnp.zeros((8, 3)),
        "torch_conv": jnp.zeros((6, 3, 1, 1)),
    }
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert axes_of(rule) == {"qkv": (1, 2), "out": (1,), "torch_conv": (0, 2, 3)}


def test_conv_dimension_numbers():
    def fn(p, x):
        y = jax.lax.conv_general_dilated(
            x, p["hwio"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.lax.conv_general_dilated(
            y, p["oihw"], (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC")
        )

    params = {"hwio": jnp.zeros((3, 3, 2, 4)), "oihw": jnp.zeros((5, 4, 3, 3))}
    x = jax.ShapeDtypeStruct((1, 6, 6, 2), jnp.float32)
    rule = optax_gc.infer_output_axes(fn, params, x)
    assert axes_of(rule) == {"hwio": (3,), "oihw": (0,)}
    assert why(rule, "oihw") == "conv: in-feature and spatial axes (1, 2, 3)"


@CENTRES_NOTHING
def test_lookup_elementwise_and_tied():
    def fn(p, tokens):
        h = p["tied"][tokens] + p["lookup"][tokens] + p["pos"][0]
        return h @ p["tied"].T

    params = {
        "tied": jnp.zeros((10, 4)),
        "lookup": jnp.zeros((10, 4)),
        "pos": jnp.zeros((1, 6, 4)),
    }
    tokens = jax.ShapeDtypeStruct((6,), jnp.int32)
    rule = optax_gc.infer_output_axes(fn, params, tokens)
    assert rule.decisions == {
        "tied": (None, "tied lookup and matmul"),
        "lookup": (None, "lookup"),
        "pos": (None, "elementwise only (add)"),
    }


def test_one_hot_matmul_is_a_lookup():
    def fn(p, tokens):
        h = jax.nn.one_hot(tokens, 10) @ p["one_hot"]
        manual = (tokens[:, None] == jnp.arange(10)[None]).astype(jnp.float32)
        h = h + manual @ p["tied"]
        pad = (tokens == 0).astype(jnp.float32)[:, None]  # a mask, not a one-hot
        return (h * pad) @ p["tied"].T, jnp.outer(pad[:, 0], 1.0) @ p["dense"]

    params = {
        "one_hot": jnp.zeros((10, 4)),
        "tied": jnp.zeros((10, 4)),
        "dense": jnp.zeros((1, 4)),
    }
    rule = optax_gc.infer_output_axes(fn, params, jax.ShapeDtypeStruct((6,), jnp.int32))
    assert rule.decisions == {
        "one_hot": (None, "lookup"),
        "tied": (None, "tied lookup and matmul"),
        "dense": ((1,), "dot_general contracts axis 0"),
    }


@CENTRES_NOTHING
def test_dynamic_index_with_data_is_a_lookup():
    def fn(p, i, x):
        return x @ jax.lax.dynamic_index_in_dim(p["stack"], i, keepdims=False)

    rule = optax_gc.infer_output_axes(
        fn, {"stack": jnp.zeros((2, 3, 3))}, jnp.int32(0), X
    )
    assert rule.decisions["stack"] == (None, "lookup")


def test_stacks_are_kept_scan_loop_and_vmap():
    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (h @ w, None), x @ p["w"], p["scan"])
        h = jax.lax.fori_loop(0, 2, lambda i, h: h @ p["loop"][i], h)
        return jax.vmap(lambda w, h: h @ w, in_axes=(0, None))(p["ensemble"], h)

    params = {
        "w": jnp.zeros((3, 4)),
        "scan": jnp.zeros((2, 4, 4)),
        "loop": jnp.zeros((2, 4, 4)),
        "ensemble": jnp.zeros((3, 4, 2)),
    }
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert axes_of(rule) == {
        "w": (1,),
        "scan": (0, 2),
        "loop": (0, 2),
        "ensemble": (0, 2),
    }
    assert why(rule, "scan").endswith("; stacked axis 0 kept")


def test_weight_normalization():
    def fn(p, x):
        v = p["v"]
        w = p["g"] * v / jnp.linalg.norm(v, axis=0, keepdims=True)
        return x @ w

    rule = optax_gc.infer_output_axes(
        fn, {"v": jnp.ones((3, 4)), "g": jnp.ones((1, 4))}, X
    )
    # v carries axis 0 into the contraction. g (1, 4) is broadcast along it: its
    # fan-in is its size-1 axis 0, so GC leaves it alone ("fan-in 1").
    assert rule.decisions["v"] == ((1,), "dot_general contracts axis 0")
    assert rule.decisions["g"] == ((1,), "dot_general contracts axis 0")
    params = {"v": jnp.ones((3, 4)), "g": jnp.ones((1, 4))}
    assert optax_gc.explain(params, output_axes=rule)["g"].why == "fan-in 1"


@CENTRES_NOTHING
def test_untouched_reasons():
    def fn(p, x):
        h = x @ (p["sym"] + p["sym"].T)  # axis 0 and 1 both contracted and kept
        h = h + x @ jnp.broadcast_to(p["summed"].sum(0), (3, 3))  # reduced first
        h = h @ p["twice"] + h @ p["twice"].T  # two uses that disagree
        h = h + x @ p["mixed"] * p["mixed"][:1]  # matmul and elementwise
        return jnp.linalg.qr(p["qr"])[0] @ h.T  # an op the analysis does not know

    params = {
        "sym": jnp.zeros((3, 3)),
        "summed": jnp.zeros((2, 3)),
        "twice": jnp.zeros((3, 3)),
        "mixed": jnp.zeros((3, 3)),
        "qr": jnp.zeros((3, 3)),
        "unused": jnp.zeros((3, 3)),
    }
    rule = optax_gc.infer_output_axes(fn, params, X)
    # Summed before the matmul, summed's axis 0 feeds every unit of column o:
    # fan-in. mixed's row 0, copied across rows, scales column o: same unit.
    assert {k: a for k, a in axes_of(rule).items() if a is not None} == {
        "summed": (1,),
        "mixed": (1,),
    }
    assert why(rule, "sym") == "axes (0, 1) both contracted and kept by dot_general"
    assert why(rule, "twice").startswith("uses disagree: dot_general contracts")
    assert why(rule, "qr").startswith("unsupported op: ")
    assert why(rule, "unused") == "not used with data"


def test_loop_carry_mixed_with_data():
    def fn(p, x):
        def body(h, xt):
            return jnp.tanh(h @ p["rec"] + xt @ p["inp"]), None

        h, _ = jax.lax.scan(body, p["h0"], x)
        return h

    params = {
        "h0": jnp.zeros((4,)),
        "rec": jnp.zeros((4, 4)),
        "inp": jnp.zeros((3, 4)),
    }
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert axes_of(rule) == {"h0": None, "rec": (1,), "inp": (1,)}
    assert why(rule, "h0") == "elementwise only (loop carry)"


def test_calls_are_followed():
    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    @jax.custom_jvp
    def act(h):
        return jnp.tanh(h)

    act.defjvp(lambda primals, tangents: (act(primals[0]), tangents[0]))

    def fn(p, x):
        h = jax.jit(lambda x, w: x @ w)(x, p["jit"])
        h = jax.checkpoint(lambda h: act(h @ p["remat"]))(h)
        h = matmul(h, p["vjp"])
        return jax.lax.cond(h.sum() > 0, lambda h: h @ p["cond"], jnp.sin, h)

    params = {k: jnp.zeros((3, 3)) for k in ("jit", "remat", "vjp", "cond")}
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert axes_of(rule) == dict.fromkeys(params, (1,))


def test_debug_print_of_a_weight_is_not_a_use():
    def fn(p, x):
        jax.debug.print("{}", p["w"].sum())
        return x @ p["w"]

    rule = optax_gc.infer_output_axes(fn, {"w": jnp.zeros((3, 2))}, X)
    assert axes_of(rule) == {"w": (1,)}


def test_size_one_axes_follow_the_use_and_never_conflict():
    def fn(p, x):
        h = x[:, :1] @ p["one_in"] + x @ p["one_out"]
        return jax.lax.conv_general_dilated(
            h[None, :, :, None], p["depthwise"], (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip

    params = {
        "one_in": jnp.zeros((1, 4)),
        "one_out": jnp.zeros((3, 1)),
        "depthwise": jnp.zeros((3, 3, 1, 8)),
    }
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert axes_of(rule) == {"one_in": (1,), "one_out": (1,), "depthwise": (3,)}
    assert why(rule, "depthwise") == "conv: in-feature and spatial axes (0, 1, 2)"
    # GC leaves a fan-in of one element alone, whoever decided the axes.
    assert optax_gc.explain(params, output_axes=rule)["one_in"].why == "fan-in 1"


# -- inputs ---------------------------------------------------------------------------


def test_static_arguments_keys_and_abstract_params():
    def fn(p, x, key, *, train, scale=2.0):
        if train:
            x = x * jax.random.bernoulli(key, 0.5, x.shape)
        return scale * (x @ p["w"])

    params = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32), "name": "dense"}
    rule = optax_gc.infer_output_axes(fn, params, X, jax.random.key(0), train=True)
    assert rule.decisions == {
        "w": ((1,), "dot_general contracts axis 0"),
        "name": (None, "not an array"),
    }


def test_closed_over_data_is_a_constant():
    x = jnp.ones((5, 3))
    with pytest.warns(optax_gc.InferenceWarning, match='"w"'):
        rule = optax_gc.infer_output_axes(lambda p: x @ p["w"], {"w": jnp.ones((3, 2))})
    assert rule.decisions["w"] == (
        None,
        "contracted with constants only (closed-over inputs? pass them as arguments)",
    )


def test_nothing_runs_on_data():
    def fn(p, x):
        if not isinstance(x, jax.core.Tracer):
            raise AssertionError("fn ran on a concrete value")
        return x @ p["w"]

    optax_gc.infer_output_axes(fn, {"w": jnp.ones((3, 2))}, jnp.ones((5, 3)))


# -- the rule ---------------------------------------------------------------------


def _model(p, x):
    return jnp.einsum("bi,ihd->bhd", x, p["q"]) @ p["w"].T


PARAMS = {"q": jnp.zeros((3, 2, 4)), "w": jnp.zeros((5, 4)), "b": jnp.zeros(5)}


def _grads():
    keys = jax.random.split(jax.random.key(1), 3)
    return {
        k: jax.random.normal(key, v.shape)
        for key, (k, v) in zip(keys, PARAMS.items(), strict=True)
    }


def test_centralize_with_the_rule_equals_explicit_axes():
    rule = optax_gc.infer_output_axes(_model, PARAMS, X)
    grads = _grads()
    got, _ = jax.jit(optax_gc.centralize(output_axes=rule).update)(grads, None)
    want = {
        "q": optax_gc.centralize_array(grads["q"], output_axes=(1, 2)),
        "w": optax_gc.centralize_array(grads["w"], output_axes=0),
        "b": grads["b"],
    }
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_decisions_are_static():
    """The rule adds nothing to the step: same jaxpr as explicit per-leaf axes."""
    rule = optax_gc.infer_output_axes(_model, PARAMS, X)
    explicit = optax_gc.path_rules({"q": (1, 2), "w": 0, "b": None})
    jaxprs = [
        str(jax.make_jaxpr(optax_gc.centralize(output_axes=r).update)(_grads(), None))
        for r in (rule, explicit)
    ]
    assert jaxprs[0] == jaxprs[1]


def test_rule_in_the_aliases_gc_fraction_and_inject_hyperparams():
    rule = optax_gc.infer_output_axes(_model, PARAMS, X)
    fractions = optax_gc.gc_fraction(_grads(), output_axes=rule)
    assert float(fractions["b"]) == 0.0 and float(fractions["w"]) > 0.0
    tx = optax.inject_hyperparams(
        optax_gc.gc_adamw, static_args=("output_axes", "location")
    )(learning_rate=1e-2, output_axes=rule, location="update")
    updates, _ = tx.update(_grads(), tx.init(PARAMS), PARAMS)
    # update placement: each unit's update has zero mean over its fan-in.
    np.testing.assert_allclose(updates["w"].mean(1), 0.0, atol=1e-7)
    np.testing.assert_allclose(updates["q"].mean(0), 0.0, atol=1e-7)


def test_unknown_path_names_it():
    rule = optax_gc.infer_output_axes(_model, PARAMS, X)
    grads = {"params": _grads()}
    with pytest.raises(ValueError, match=r'leaf "params/q" is not a leaf'):
        optax_gc.centralize(output_axes=rule).update(grads, None)


def test_shape_mismatch_names_the_leaf():
    rule = optax_gc.infer_output_axes(_model, PARAMS, X)
    grads = {**_grads(), "w": jnp.ones((4, 5))}
    with pytest.raises(ValueError, match=r'leaf "w" has shape \(4, 5\)'):
        optax_gc.centralize(output_axes=rule).update(grads, None)


@CENTRES_NOTHING
def test_paths_that_collide_and_disagree_raise_when_used():
    def fn(p, x):
        return x @ p["a"]["b"] @ p["a/b"].T

    params = {"a": {"b": jnp.zeros((3, 3))}, "a/b": jnp.zeros((3, 3))}
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert rule.decisions["a/b"] == (None, "ambiguous path")
    with pytest.raises(ValueError, match='two leaves share the path "a/b"'):
        optax_gc.centralize(output_axes=rule).update(params, None)


@pytest.mark.parametrize(
    "fn, params, match",
    [
        (None, PARAMS, "fn must be callable"),
        (_model, {"step": 3}, "params has no array leaf"),
    ],
)
def test_bad_input(fn, params, match):
    with pytest.raises(ValueError, match=match):
        optax_gc.infer_output_axes(fn, params, X)


def test_repr():
    rule = optax_gc.infer_output_axes(_model, PARAMS, X)
    assert repr(rule) == "InferredAxes(3 leaves, 2 with output axes)"
    with pytest.raises(ValueError, match=r"\(3 leaves, e\.g\. \['b', 'q', 'w'\]\)"):
        rule((jax.tree_util.DictKey("x"),), jnp.zeros(3))


# -- found by an adversarial pass ---------------------------------------------------


def _taps_conv(w, x):  # the oracle: a VALID 1-D convolution, kernel (K, in, out)
    return jax.lax.conv_general_dilated(
        x, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
    )


def _taps_loop(w, x):  # the same convolution as shifted matmuls, summed
    t = x.shape[1] - w.shape[0] + 1
    return sum(x[:, k : k + t] @ w[k] for k in range(w.shape[0]))


def _taps_scan(w, x):  # ... and as a scan that accumulates into its carry
    t = x.shape[1] - w.shape[0] + 1
    shifted = jnp.stack([x[:, k : k + t] for k in range(w.shape[0])])
    init = jnp.zeros((x.shape[0], t, w.shape[2]))
    y, _ = jax.lax.scan(lambda y, xw: (y + xw[0] @ xw[1], None), init, (shifted, w))
    return y


@pytest.mark.parametrize("taps", [_taps_conv, _taps_loop, _taps_scan])
@CENTRES_NOTHING
def test_slices_whose_outputs_are_summed_are_not_a_stack(taps):
    w = jax.random.normal(jax.random.key(0), (3, 4, 5))
    x = jax.random.normal(jax.random.key(1), (2, 9, 4))
    np.testing.assert_allclose(taps(w, x), _taps_conv(w, x), rtol=1e-5, atol=1e-5)
    rule = optax_gc.infer_output_axes(lambda p, x: taps(p["w"], x), {"w": w}, x)
    if taps is _taps_conv:
        assert rule.decisions["w"][0] == (2,)  # fan-in: taps and in
        return
    # The same convolution as a sum over the slices of a stack: not a stack of
    # independent layers, and too easy to misread: left alone, with the reason.
    assert rule.decisions["w"] == (
        None,
        "the outputs of its slices along axis 0 are summed into the same units "
        "(a convolution over a stack?), not a stack of layers",
    )


def _twice_scan(p, x):  # the same stacked model applied twice, e.g. siamese
    return _residual_scan(p, x) - _residual_scan(p, -x)


def _twice_loop(p, x):  # ... or classifier-free guidance
    return 2.0 * _residual_loop(p, x) - _residual_loop(p, 0.0 * x)


def _residual_loop(p, x):  # successive layers on a residual stream: a stack
    for i in range(3):
        x = x + jnp.tanh(x @ p["w"][i]) @ p["v"][i]
    return x


def _residual_scan(p, x):
    def layer(x, wv):
        return x + jnp.tanh(x @ wv[0]) @ wv[1], None

    return jax.lax.scan(layer, x, (p["w"], p["v"]))[0]


@pytest.mark.parametrize(
    "model", [_residual_loop, _residual_scan, _twice_scan, _twice_loop]
)
def test_a_residual_stream_is_not_a_sum_over_one_unit(model):
    params = {"w": jnp.zeros((3, 3, 6)), "v": jnp.zeros((3, 6, 3))}
    rule = optax_gc.infer_output_axes(model, params, X)
    assert axes_of(rule) == {"w": (0, 2), "v": (0, 2)}
    assert why(rule, "v").endswith("; stacked axis 0 kept")


def test_a_gather_of_several_entries_carries_the_gathered_axis():
    index = np.array([0, 2, 2, 1])

    def fn(p, x3, x):
        y = jnp.einsum("bni,nio->bo", x3, p["w"][index])  # (4, 4, 5) from (3, 4, 5)
        return y, x @ p["v"][np.array([2, 0, 1])]  # rows permuted, then contracted

    params = {"w": jnp.zeros((3, 4, 5)), "v": jnp.zeros((3, 4))}
    rule = optax_gc.infer_output_axes(fn, params, jnp.zeros((2, 4, 4)), X)
    assert axes_of(rule) == {"w": (2,), "v": (1,)}


def test_lax_map_and_vmap_over_a_stack_agree():
    def fn(p, x, mapper):
        wo = mapper(lambda w: 2.0 * w, p["wo"])  # per-head, (H, D, O)
        return jnp.einsum("bhd,hdo->bo", x, wo)

    mappers = {"vmap": lambda f, w: jax.vmap(f)(w), "map": jax.lax.map}
    for name, mapper in mappers.items():
        rule = optax_gc.infer_output_axes(
            lambda p, x, m=mapper: fn(p, x, m),
            {"wo": jnp.zeros((3, 4, 5))},
            jnp.zeros((2, 3, 4)),
        )
        assert axes_of(rule) == {"wo": (2,)}, name


@pytest.mark.parametrize(
    "mixing",
    [
        lambda w: jnp.cumsum(w, axis=1),
        lambda w: jax.nn.softmax(w, axis=1),
        lambda w: w - w[:, :1],
        lambda w: w - w.mean(1, keepdims=True),
        lambda w: w / jnp.linalg.norm(w),
    ],
    ids=["cumsum", "softmax", "minus-unit-0", "minus-mean-over-units", "global-norm"],
)
@CENTRES_NOTHING
def test_mixing_output_units_leaves_the_leaf_alone(mixing):
    # Each output unit then depends on every unit's weights: no per-unit fan-in.
    rule = optax_gc.infer_output_axes(
        lambda p, x: x @ mixing(p["w"]), {"w": jnp.ones((3, 6))}, X
    )
    assert rule.decisions["w"] == (
        None,
        "axis 1 mixed across its entries before dot_general",
    )


def test_per_unit_mixing_of_the_fan_in_is_fine():
    def fn(p, x):  # weight standardization per output unit, over the fan-in
        w = p["w"]
        w = (w - w.mean(0, keepdims=True)) / w.std(0, keepdims=True)
        return x @ w

    rule = optax_gc.infer_output_axes(fn, {"w": jnp.ones((3, 6))}, X)
    assert rule.decisions["w"] == ((1,), "dot_general contracts axis 0")


def test_concatenated_and_raveled_parameters_keep_their_own_axes():
    from jax.flatten_util import ravel_pytree

    params = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4, 2)), "c": jnp.zeros((2, 5))}
    _, unravel = ravel_pytree(params)

    def raveled(p, x):
        q = unravel(ravel_pytree(p)[0])
        return x @ q["a"] @ q["b"]

    def concatenated(p, x):
        ab = jnp.concatenate([p["a"].T, p["b"]], axis=0)  # (8, 3) then (8, 2)...
        return (x @ ab[:4].T) @ p["b"], ab[4:]

    rule = optax_gc.infer_output_axes(raveled, params, X)
    assert axes_of(rule) == {"a": (1,), "b": (1,), "c": None}
    params2 = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4, 3))}
    rule = optax_gc.infer_output_axes(concatenated, params2, X)
    assert axes_of(rule) == {"a": (1,), "b": (1,)}


def test_a_partly_used_fan_in_leaves_the_leaf_alone():
    # Only rows :3 feed the units: averaging over all 6 would move the others.
    def fn(p, x):
        return x @ p["w"][:3], x @ p["fused"][:, :2] + x @ p["fused"][:, 2:]

    params = {"w": jnp.zeros((6, 2)), "fused": jnp.zeros((3, 4))}
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert rule.decisions["w"] == (None, "axis 0 only partly used by dot_general")
    # Splitting the output axis (fused q/k/v) is fine.
    assert rule.decisions["fused"] == ((1,), "dot_general contracts axis 0 (2 uses)")


def test_a_slice_of_only_constants_is_a_constant():
    def fn(p, x):  # the slice keeps only the constant part of the concatenation
        w0 = jnp.concatenate([p["a"], jnp.ones((3, 3))])[3:]
        w = jax.lax.fori_loop(0, 2, lambda i, w: p["b"] * 1.0, w0)
        return x @ w

    params = {"a": jnp.zeros((3, 3)), "b": jnp.zeros((3, 3))}
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert axes_of(rule) == {"a": None, "b": (1,)}


def test_stacked_parameters_and_a_one_hot_built_in_a_cond():
    def fn(p, tokens, flag):
        w = jnp.stack([p["w0"], p["w1"]])  # (2, in, out), then scanned over
        h, _ = jax.lax.scan(lambda h, w: (h @ w, None), tokens[:, :3] * 1.0, w)
        one_hot = jax.lax.cond(
            flag,
            lambda t: (t[:, :, None] == jnp.arange(10)[None, None]).astype(jnp.float32),
            lambda t: (t[:, :, None] == jnp.arange(10)[None, None]).astype(jnp.float32),
            tokens,
        )
        return h, one_hot @ p["table"]

    params = {
        "w0": jnp.zeros((3, 3)),
        "w1": jnp.zeros((3, 3)),
        "table": jnp.zeros((10, 4)),
    }
    tokens = jax.ShapeDtypeStruct((5, 3), jnp.int32)
    rule = optax_gc.infer_output_axes(fn, params, tokens, True)
    assert axes_of(rule) == {"w0": (1,), "w1": (1,), "table": None}
    assert why(rule, "table") == "lookup"


def test_fn_and_params_are_positional_only():
    def fn(p, x, *, params):  # a model keyword that clashes with the API's name
        return x @ p["w"] * params

    rule = optax_gc.infer_output_axes(fn, {"w": jnp.zeros((3, 2))}, X, params=2.0)
    assert axes_of(rule) == {"w": (1,)}


# -- likely mistakes: warnings and wrong calls -------------------------------------


def _flax_mlp():
    nn = pytest.importorskip("flax.linen")
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    x = jnp.ones((4, 5))
    return model, model.init(jax.random.key(0), x)["params"], x


def test_closed_over_inputs_warn_naming_the_leaves_and_the_fix():
    model, params, x = _flax_mlp()
    with pytest.warns(optax_gc.InferenceWarning) as record:
        rule = optax_gc.infer_output_axes(
            lambda p: model.apply({"params": p}, x), params
        )
    message = str(record[0].message)
    assert '"layers_0/kernel"' in message and '"layers_2/kernel"' in message
    assert "pass them as array arguments" in message
    assert repr(rule) == "InferredAxes(4 leaves, 0 with output axes)"


def test_inputs_passed_as_arguments_do_not_warn():
    model, params, x = _flax_mlp()
    rule = optax_gc.infer_output_axes(
        lambda p, x: model.apply({"params": p}, x), params, x
    )
    assert repr(rule) == "InferredAxes(4 leaves, 2 with output axes)"


def test_a_rule_that_centres_nothing_warns():
    def embed_only(p, ids):
        return p["table"][ids] * p["scale"]

    params = {"table": jnp.ones((10, 4)), "scale": jnp.ones((1, 4))}
    ids = jnp.zeros(3, jnp.int32)
    with pytest.warns(optax_gc.InferenceWarning, match="none of the 2 leaves"):
        optax_gc.infer_output_axes(embed_only, params, ids)


def test_forgotten_inputs_are_named():
    model, params, _ = _flax_mlp()
    with pytest.raises(ValueError, match="No inputs were given") as info:
        optax_gc.infer_output_axes(lambda p, x: model.apply({"params": p}, x), params)
    assert "infer_output_axes(fn, params, x)" in str(info.value)


def test_swapped_arguments_are_named():
    model, params, x = _flax_mlp()
    with pytest.raises(ValueError, match="look swapped") as info:
        optax_gc.infer_output_axes(
            lambda p, x: model.apply({"params": p}, x), x, params
        )
    assert "infer_output_axes(fn, params, *inputs)" in str(info.value)
    assert "Dense" not in str(info.value)  # no dump of the tree


def test_model_apply_and_the_module_itself_are_named():
    model, params, x = _flax_mlp()
    with pytest.raises(ValueError, match="fn is model.apply"):
        optax_gc.infer_output_axes(model.apply, params, x)
    with pytest.raises(ValueError, match="is a Flax linen module"):
        optax_gc.infer_output_axes(model, params, x)
    with pytest.raises(ValueError, match="fn is model.apply"):
        optax_gc.infer_output_axes(functools.partial(model.apply), params, x)
    with pytest.raises(ValueError, match="fn is model.apply"):
        optax_gc.infer_output_axes(jax.jit(model.apply), params, x)
    # model.apply with the variables dict is a correct call.
    rule = optax_gc.infer_output_axes(model.apply, {"params": params}, x)
    assert rule.decisions["params/layers_0/kernel"][0] == (1,)


def test_an_error_inside_fn_is_the_users_own():
    def broken(p, x):
        raise KeyError("no such layer")

    with pytest.raises(KeyError, match="no such layer"):
        optax_gc.infer_output_axes(broken, {"w": jnp.ones((2, 2))}, X)


# -- the rule registry ----------------------------------------------------------------


def _primitive_names() -> set[str]:
    import sys

    names = set()
    for name, module in list(sys.modules.items()):
        if not name.startswith("jax"):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, jax.extend.core.Primitive):
                names.add(value.name)
    return names


# Primitives of other supported jax versions (0.4.35 to the newest).
_OTHER_VERSIONS = frozenset(
    {"psum_scatter", "stack", "tile", "split", "reduce_scatter"}
)


def test_every_rule_names_a_primitive_and_no_table_shadows_one():
    from optax_gc._infer import _interpreter

    rules = set(_interpreter.RULES)
    unknown = rules - _primitive_names() - _OTHER_VERSIONS
    assert not unknown, f"rules for primitives this jax does not have: {unknown}"
    assert not rules & (_interpreter.ELEMENTWISE | _interpreter.IGNORED)
    assert not any(n.startswith("p_") for n in dir(_interpreter.Interpreter))


def test_a_primitive_without_a_rule_leaves_the_leaf_alone_naming_it():
    from jax.interpreters import mlir

    twice = jax.extend.core.Primitive("twice_for_test")
    twice.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
    twice.def_impl(lambda x: 2 * x)
    mlir.register_lowering(twice, mlir.lower_fun(lambda x: 2 * x, False))

    def fn(p, x):
        return x @ twice.bind(p["w"]) + x @ p["v"]

    params = {"w": jnp.zeros((3, 4)), "v": jnp.zeros((3, 4))}
    rule = optax_gc.infer_output_axes(fn, params, X)
    assert rule.decisions["w"] == (None, "unsupported op: twice_for_test")
    assert rule.decisions["v"][0] == (1,)
