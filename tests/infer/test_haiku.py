"""`infer_output_axes` on Haiku models: every leaf against a hand-derived oracle.

The oracle for each layer is read from the installed Haiku source
(haiku/_src/basic.py, conv.py, depthwise_conv.py, batch_norm.py, attention.py,
embed.py, layer_stack.py, nets/resnet.py):

* ``hk.Linear``: ``w`` is ``(in, out)``, applied as ``jnp.dot(x, w)``: fan-in
  axis 0, output axes ``(1,)``; ``b`` is ``(out,)``, added.
* ``hk.ConvND``: ``w`` is ``spatial + (in // groups, out)`` with kernel
  dimension numbers ``(O=n-1, I=n-2, spatial...)`` in both data formats:
  output axes ``(n - 1,)``; size-1 axes (1x1 kernels, depthwise ``I=1``)
  follow the use like any other axis: they are fan-in too.
* ``hk.ConvNDTranspose``: ``w`` is ``spatial + (out, in)``, kernel dimension
  numbers ``(O=n-2, I=n-1, spatial...)``: output axes ``(n - 2,)``.
* ``hk.BatchNorm`` / ``hk.LayerNorm``: ``scale`` multiplies and ``offset`` adds
  (BatchNorm's have shape ``(1, 1, 1, C)`` on NHWC).
* ``hk.MultiHeadAttention``: query/key/value/out projections are ``hk.Linear``.
* ``hk.Embed``: ``ARRAY_INDEX`` gathers rows; ``ONE_HOT`` is
  ``jnp.dot(one_hot(ids), embeddings)``, a matmul over the vocabulary axis.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gc
from tests.integrations.common import fan_in_mean, flat_leaves

_LINEAR = ((1,), "dot_general contracts axis 0")


def _axes(rule):
    return {path: axes for path, (axes, _) in rule.decisions.items()}


def _reasons(rule):
    return {path: why for path, (_, why) in rule.decisions.items()}


def _infer(f, *example):
    """Haiku-transformed ``f``: abstract params and the inferred rule."""
    model = hk.transform(f)
    params = jax.eval_shape(model.init, jax.random.key(0), *example)
    rule = optax_gc.infer_output_axes(
        lambda p, *a: model.apply(p, None, *a), params, *example
    )
    return params, rule


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


# --- hk.Linear ----------------------------------------------------------------


def test_linear_mlp():
    def f(x):
        h = jax.nn.relu(hk.Linear(8)(x))
        return hk.Linear(4, with_bias=False)(h)

    params, rule = _infer(f, _spec((5, 3)))
    assert jax.tree.map(jnp.shape, params) == {
        "linear": {"w": (3, 8), "b": (8,)},
        "linear_1": {"w": (8, 4)},
    }
    assert rule.decisions == {
        "linear/w": _LINEAR,  # (in, out): jnp.dot contracts axis 0
        "linear/b": (None, "elementwise only (add)"),
        "linear_1/w": _LINEAR,
    }


# --- convolutions ---------------------------------------------------------------

_CONVS = {
    # Conv2D NHWC: w (kh, kw, in, out), rhs_spec (3, 2, 0, 1)
    "conv2d_nhwc": (
        lambda: hk.Conv2D(6, 3),
        (2, 8, 8, 4),
        (3, 3, 4, 6),
        (3,),
        "conv: in-feature and spatial axes (0, 1, 2)",
    ),
    # Conv2D NCHW: same kernel layout; the bias is (out, 1, 1)
    "conv2d_nchw": (
        lambda: hk.Conv2D(6, 3, data_format="NCHW"),
        (2, 4, 8, 8),
        (3, 3, 4, 6),
        (3,),
        "conv: in-feature and spatial axes (0, 1, 2)",
    ),
    # grouped: w (kh, kw, in // 2, out); in-feature axis is still axis 2
    "conv2d_grouped": (
        lambda: hk.Conv2D(6, 3, feature_group_count=2),
        (2, 8, 8, 4),
        (3, 3, 2, 6),
        (3,),
        "conv: in-feature and spatial axes (0, 1, 2)",
    ),
    # 1x1 conv: w (1, 1, in, out); the size-1 spatial axes are fan-in too
    "conv2d_1x1": (
        lambda: hk.Conv2D(6, 1),
        (2, 8, 8, 4),
        (1, 1, 4, 6),
        (3,),
        "conv: in-feature and spatial axes (0, 1, 2)",
    ),
    # depthwise: w (kh, kw, 1, C * mult), groups = C; the size-1 I is fan-in
    "depthwise": (
        lambda: hk.DepthwiseConv2D(2, 3),
        (2, 8, 8, 4),
        (3, 3, 1, 8),
        (3,),
        "conv: in-feature and spatial axes (0, 1, 2)",
    ),
    # transposed: w (kh, kw, out, in), rhs_spec (2, 3, 0, 1): O is axis 2
    "conv2d_transpose": (
        lambda: hk.Conv2DTranspose(6, 3, stride=2),
        (2, 8, 8, 4),
        (3, 3, 6, 4),
        (2,),
        "conv: in-feature and spatial axes (0, 1, 3)",
    ),
    # Conv1D NWC: w (k, in, out)
    "conv1d": (
        lambda: hk.Conv1D(6, 3),
        (2, 8, 4),
        (3, 4, 6),
        (2,),
        "conv: in-feature and spatial axes (0, 1)",
    ),
}


@pytest.mark.parametrize("name", sorted(_CONVS))
def test_conv(name):
    make, x_shape, w_shape, w_axes, w_reason = _CONVS[name]
    params, rule = _infer(lambda x: make()(x), _spec(x_shape))
    [module] = params
    assert params[module]["w"].shape == w_shape
    assert rule.decisions[f"{module}/w"] == (w_axes, w_reason)
    assert rule.decisions[f"{module}/b"] == (None, "elementwise only (add)")
    assert set(rule.decisions) == {f"{module}/w", f"{module}/b"}


# --- ResNet with BatchNorm --------------------------------------------------------


def _resnet(resnet_v2):
    def f(x, is_training):
        net = hk.nets.ResNet(
            blocks_per_group=(1, 1, 1, 1),
            num_classes=3,
            bottleneck=False,
            channels_per_group=(4, 8, 8, 8),
            use_projection=(False, True, True, True),
            initial_conv_config={"output_channels": 4},
            resnet_v2=resnet_v2,
            # the default zero logits would give every conv a zero gradient
            logits_config={"w_init": hk.initializers.RandomNormal()},
        )
        return net(x, is_training)

    return hk.transform_with_state(f)


def _resnet_expected(shapes):
    """Oracle per module kind, from nets/resnet.py, conv.py and batch_norm.py."""
    expected = {}
    for path, shape in shapes.items():
        module, name = path.rsplit("/", 1)
        if module.endswith("logits"):  # hk.Linear
            expected[path] = (1,) if name == "w" else None
        elif "batchnorm" in module:  # scale * rsqrt(var), + offset
            assert name in ("scale", "offset") and shape[:3] == (1, 1, 1)
            expected[path] = None
        else:  # hk.Conv2D HWIO, no bias (1x1 shortcut convs alike)
            assert "conv" in module and name == "w"
            expected[path] = (3,)
    return expected


@pytest.mark.parametrize("resnet_v2", [False, True])
@pytest.mark.parametrize("is_training", [True, False])
def test_resnet_batchnorm(resnet_v2, is_training):
    model = _resnet(resnet_v2)
    x = _spec((1, 16, 16, 3))
    params, state = jax.eval_shape(
        lambda key, x: model.init(key, x, is_training=True), jax.random.key(0), x
    )
    state = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), state)  # EMAs
    rule = optax_gc.infer_output_axes(
        lambda p, x: model.apply(p, state, None, x, is_training=is_training)[0],
        params,
        x,
    )
    shapes = {k: v.shape for k, v in flat_leaves(params).items()}
    # v1: 12 convs, 12 BatchNorms (scale, offset), logits; v2: 9 BatchNorms
    assert len(shapes) == (38 if not resnet_v2 else 32)
    assert _axes(rule) == _resnet_expected(shapes)
    reasons = _reasons(rule)
    one_by_one = [k for k, s in shapes.items() if k.endswith("/w") and s[:2] == (1, 1)]
    assert len(one_by_one) == 3  # the shortcut convs of groups 1-3
    for path in shapes:
        if path.endswith("/scale"):
            assert reasons[path] == "elementwise only (mul)"
        elif path.endswith("/offset") or path.endswith("logits/b"):
            assert reasons[path] == "elementwise only (add)"
        elif path.endswith("logits/w"):
            assert reasons[path] == _LINEAR[1]
        else:
            assert reasons[path] == "conv: in-feature and spatial axes (0, 1, 2)"


# --- attention, embeddings, layer_stack ---------------------------------------------


def _mha(x):
    mha = hk.MultiHeadAttention(
        num_heads=2,
        key_size=4,
        w_init=hk.initializers.VarianceScaling(),
        model_size=x.shape[-1],
    )
    return mha(x, x, x)


def test_multi_head_attention():
    params, rule = _infer(_mha, _spec((2, 5, 6)))
    expected = {}
    # query/key/value: hk.Linear(H * K) on (.., T, D); out: hk.Linear on H * V
    for proj in ("query", "key", "value", "linear"):
        expected[f"multi_head_attention/{proj}/w"] = _LINEAR
        expected[f"multi_head_attention/{proj}/b"] = (None, "elementwise only (add)")
    assert rule.decisions == expected
    assert params["multi_head_attention/query"]["w"].shape == (6, 8)
    assert params["multi_head_attention/linear"]["w"].shape == (8, 6)


def test_embed_array_index_is_a_lookup():
    with pytest.warns(optax_gc.InferenceWarning, match="none of the 1 leaf"):
        _, rule = _infer(lambda t: hk.Embed(10, 4)(t), _spec((2, 5), jnp.int32))
    assert rule.decisions == {"embed/embeddings": (None, "lookup")}


def test_embed_one_hot_is_a_lookup_too():
    # ONE_HOT: jnp.dot(one_hot(ids), embeddings) computes the same rows as
    # ARRAY_INDEX; the one-hot operand (ids == arange(vocab)) makes this
    # dot_general a lookup, so the table is left alone either way.
    def f(t):
        return hk.Embed(10, 4, lookup_style="ONE_HOT")(t)

    with pytest.warns(optax_gc.InferenceWarning, match="none of the 1 leaf"):
        _, rule = _infer(f, _spec((2, 5), jnp.int32))
    assert rule.decisions == {"embed/embeddings": (None, "lookup")}


def test_tied_embedding_transformer():
    def f(tokens):
        embed = hk.Embed(10, 6)
        h = embed(tokens)
        h = h + _mha(hk.LayerNorm(-1, True, True)(h))
        h = hk.layer_stack(3)(lambda y: y + jnp.tanh(hk.Linear(6)(y)))(h)
        return h @ embed.embeddings.T  # logits with the input table

    params, rule = _infer(f, _spec((2, 5), jnp.int32))
    stack = "__layer_stack_no_per_layer/linear"
    assert params[stack]["w"].shape == (3, 6, 6)  # (L, in, out)
    expected = {
        "embed/embeddings": None,  # gather and h @ table.T
        "layer_norm/scale": None,
        "layer_norm/offset": None,
        # scanned Linear: w (L, in, out) sliced to (in, out); L kept
        f"{stack}/w": (0, 2),
        f"{stack}/b": None,  # (L, out), added
    }
    for proj in ("query", "key", "value", "linear"):
        expected[f"multi_head_attention/{proj}/w"] = (1,)
        expected[f"multi_head_attention/{proj}/b"] = None
    assert _axes(rule) == expected
    reasons = _reasons(rule)
    assert reasons["embed/embeddings"] == "tied lookup and matmul"
    assert reasons[f"{stack}/w"] == "dot_general contracts axis 1; stacked axis 0 kept"
    assert reasons["layer_norm/scale"] == "elementwise only (mul)"
    for path, axes in expected.items():
        if axes is None and path != "embed/embeddings":
            assert reasons[path].startswith("elementwise only"), path


# --- real gradients ---------------------------------------------------------------


def _random(tree, seed):
    """Normal(0, 0.3) arrays in the shapes of ``tree`` (NumPy: compiling
    Haiku's initializers or ``jax.random`` for every leaf costs many seconds on
    CPU). Random offsets everywhere also matter: with LayerNorm's zero offset
    the attention projections' gradients are already centred, as the LN output
    has zero mean over features, and GC would have nothing to do."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), tree
    )


def _resnet_loss_setup():
    model = _resnet(False)
    x = _random(_spec((2, 16, 16, 3)), 1)
    params, state = jax.eval_shape(
        lambda key, x: model.init(key, x, is_training=True), jax.random.key(0), x
    )
    state = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), state)

    def fn(p, x):
        return model.apply(p, state, None, x, is_training=True)[0]

    return fn, _random(params, 0), x


def _transformer_loss_setup():
    def f(tokens):
        embed = hk.Embed(10, 6)
        h = embed(tokens)
        h = h + _mha(hk.LayerNorm(-1, True, True)(h))
        h = hk.layer_stack(3)(lambda y: y + jnp.tanh(hk.Linear(6)(y)))(h)
        return hk.Linear(10)(h) + h @ embed.embeddings.T

    model = hk.transform(f)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 10, (2, 5)))
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    return (lambda p, t: model.apply(p, None, t)), _random(params, 0), tokens


@pytest.mark.parametrize("setup", [_resnet_loss_setup, _transformer_loss_setup])
def test_real_gradients_centred_over_inferred_fan_in(setup):
    fn, params, x = setup()
    rule = optax_gc.infer_output_axes(fn, params, x)

    def loss(p):
        out = fn(p, x)
        return jnp.mean(jnp.sin(3.0 * out) + out**2)

    grads = jax.jit(jax.grad(loss))(params)
    gc, _ = optax_gc.centralize(output_axes=rule).update(grads, None)
    raw, out = flat_leaves(grads), flat_leaves(gc)
    touched = 0
    for path, (axes, _) in rule.decisions.items():
        if axes is None:
            np.testing.assert_array_equal(out[path], raw[path])
            assert out[path].dtype == raw[path].dtype
            continue
        touched += 1
        scale = float(np.abs(raw[path]).max())
        assert scale > 0, path
        np.testing.assert_allclose(
            fan_in_mean(out[path], axes), 0.0, atol=1e-5 * scale, err_msg=path
        )
        # GC did work: the raw gradient's fan-in means were not zero
        assert np.abs(fan_in_mean(raw[path], axes)).max() > 1e-4 * scale, path
    assert touched >= 6
