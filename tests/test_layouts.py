"""LayoutWarning: the default axes on trees whose layout they get wrong.

Every tree here comes from the installed framework's own layers; which leaves
the default gets wrong is read from each layer's definition (Equinox stores
``(out, in)``; Flax's ``Embed`` a ``(vocab, dim)`` table; ``DenseGeneral``
q/k/v kernels ``(in, H, D)``; ``nn.scan`` a leading layer axis).
"""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_gc

eqx = pytest.importorskip("equinox")
nn = pytest.importorskip("flax.linen")


def _eqx_model():
    keys = jax.random.split(jax.random.key(0), 2)
    return [
        eqx.nn.Conv2d(1, 4, 3, key=keys[0]),
        eqx.nn.MLP(16, 3, 8, 1, key=keys[1]),
    ]


def _grads(params):
    return jax.tree.map(jnp.ones_like, eqx.filter(params, eqx.is_array))


def _step(tx, params):
    grads = _grads(params) if isinstance(params, list) else params
    return tx.update(grads, tx.init(grads), grads)


def test_default_axes_on_equinox_layers_warn_and_name_the_weights():
    model = _eqx_model()
    with pytest.warns(optax_gc.LayoutWarning, match="output_axes=0") as record:
        _step(optax_gc.gc_adam(1e-3), model)
    message = str(record[0].message)
    assert message.startswith("gc_adam:")
    for path in ("0/weight", "1/layers/0/weight", "1/layers/1/weight"):
        assert f'"{path}"' in message, path
    assert '"0/bias" (4, 1, 1)' in message  # a Conv2d's bias is (out, 1, 1)
    assert "1/layers/0/bias" not in message  # (out,): ndim 1, left alone anyway
    assert "stacked" not in message


@pytest.mark.parametrize("axes", [0, (-1,), "inferred"])
def test_explicit_axes_on_equinox_layers_do_not_warn(axes):
    model = _eqx_model()
    if axes == "inferred":
        params, static = eqx.partition(model, eqx.is_array)

        def fn(p, x):
            conv, mlp = eqx.combine(p, static)
            return mlp(conv(x).reshape(-1)[:16])

        axes = optax_gc.infer_output_axes(fn, params, jnp.ones((1, 6, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(optax_gc.gc_adam(1e-3, output_axes=axes), model)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x)))), None


class _LM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(50, 8)(tokens)
        stack = nn.scan(
            _Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
        )
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(50)(nn.LayerNorm()(x))


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(50, 8)(tokens)
        return nn.Dense(50)(nn.MultiHeadDotProductAttention(num_heads=2)(x))


def _flax(model):
    tokens = jnp.zeros((2, 4), jnp.int32)
    return model, model.init(jax.random.key(0), tokens)["params"], tokens


def test_the_design_cards_chain_on_a_transformer_warns():
    _, params, _ = _flax(_LM())
    tx = optax.chain(optax_gc.centralize(), optax.adam(1e-3))
    with pytest.warns(optax_gc.LayoutWarning) as record:
        jax.jit(tx.update)(params, tx.init(params), params)
    message = str(record[0].message)
    assert message.startswith("centralize:")
    assert '"Embed_0/embedding" (50, 8)' in message
    # The stacked modules' (L, ...) kernels, biases and norm scales: 16 leaves.
    for path in ("layers/Dense_0/kernel", "layers/LayerNorm_0/scale"):
        assert f'"{path}"' in message, path
    assert "and 10 more: layers stacked on a leading axis" in message
    assert '"Dense_0/kernel"' not in message  # the head (in, out) is right
    assert "infer_output_axes" in message


def test_unstacked_attention_kernels_warn_and_the_output_projection_does_not():
    _, params, _ = _flax(_Attention())
    with pytest.warns(optax_gc.LayoutWarning) as record:
        optax_gc.explain(params)
    message = str(record[0].message)
    for name in ("query", "key", "value"):
        assert f'"MultiHeadDotProductAttention_0/{name}/kernel" (8, 2, 4)' in message
    # (H, D, out): the default keeps out, averages over (H, D): right.
    assert "out/kernel" not in message
    assert "(H, D): output_axes (1, 2)" in message


def test_the_inferred_rule_on_a_transformer_does_not_warn():
    model, params, tokens = _flax(_LM())
    rule = optax_gc.infer_output_axes(
        lambda p, t: model.apply({"params": p}, t), params, tokens
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx = optax.chain(optax_gc.centralize(output_axes=rule), optax.adam(1e-3))
        jax.jit(tx.update)(params, tx.init(params), params)


def test_a_flax_cnn_on_the_default_does_not_warn():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(3)(nn.relu(x).reshape(x.shape[0], -1))

    params = CNN().init(jax.random.key(0), jnp.ones((2, 5, 5, 1)))["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx = optax_gc.gc_sgd(0.1, momentum=0.9)
        jax.jit(tx.update)(params, tx.init(params), params)


def test_haiku_embeddings_and_layer_stacks_warn():
    hk = pytest.importorskip("haiku")

    def forward(tokens):
        x = hk.Embed(50, 8)(tokens)

        def layer(x):
            return x + hk.Linear(8)(jax.nn.relu(hk.LayerNorm(-1, True, True)(x)))

        x = hk.layer_stack(3)(layer)(x)
        return hk.Linear(50)(x)

    f = hk.without_apply_rng(hk.transform(forward))
    params = f.init(jax.random.key(0), jnp.zeros((2, 4), jnp.int32))
    with pytest.warns(optax_gc.LayoutWarning) as record:
        optax_gc.gc_fraction(params)
    message = str(record[0].message)
    assert '"embed/embeddings" (50, 8)' in message
    stack = "__layer_stack_no_per_layer"
    assert f'"{stack}/linear/w" (3, 8, 8)' in message
    assert f'"{stack}/layer_norm/scale" (3, 8)' in message
    assert '"linear/w"' not in message  # the head (in, out) is right


def test_a_transform_warns_once_per_trace():
    model = _eqx_model()
    grads = _grads(model)
    tx = optax_gc.gc_adam(1e-3)
    state = tx.init(grads)
    step = jax.jit(tx.update)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            _, state = step(grads, state, grads)
    assert [w.category for w in record] == [optax_gc.LayoutWarning]


def _message(tree, **kwargs):
    with pytest.warns(optax_gc.LayoutWarning) as record:
        optax_gc.explain(tree, **kwargs)
    return str(record[0].message)


def _quiet(tree, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return optax_gc.explain(tree, **kwargs)


def test_haiku_transposed_convolutions_warn():
    hk = pytest.importorskip("haiku")
    # hk.Conv2DTranspose stores w as (kh, kw, out, in): its output axis is -2.
    f = hk.without_apply_rng(hk.transform(lambda x: hk.Conv2DTranspose(6, 3)(x)))
    params = f.init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    assert params["conv2_d_transpose"]["w"].shape == (3, 3, 6, 2)
    assert '"conv2_d_transpose/w" (3, 3, 6, 2)' in _message(params)
    _quiet(params, output_axes=-2)


def test_a_scanned_block_without_biases_warns_on_its_kernels():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            x = x + nn.Dense(8, use_bias=False)(nn.LayerNorm()(x))
            return x + nn.Dense(8, use_bias=False)(nn.LayerNorm()(x)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=3,
            )
            return stack(name="layers")(x, None)[0]

    params = Net().init(jax.random.key(0), jnp.ones((2, 8)))["params"]
    message = _message(params)
    assert '"layers/Dense_0/kernel" (3, 8, 8)' in message
    assert "stacked on a leading axis" in message


def test_a_haiku_layer_stack_without_biases_warns():
    hk = pytest.importorskip("haiku")

    def forward(x):
        return hk.layer_stack(4)(
            lambda x: jax.nn.relu(hk.Linear(8, with_bias=False)(x))
        )(x)

    f = hk.without_apply_rng(hk.transform(forward))
    params = f.init(jax.random.key(0), jnp.ones((2, 8)))
    assert '"__layer_stack_no_per_layer/linear/w" (4, 8, 8)' in _message(params)


def test_pytorch_state_dict_keys_warn():
    state = {"conv1.weight": jnp.ones((8, 3, 3, 3)), "fc.weight": jnp.ones((10, 8))}
    message = _message(state)
    assert '"conv1.weight"' in message and '"fc.weight"' in message
    assert "output_axes=0" in message


def test_flax_attention_biases_are_named_with_the_kernels():
    _, params, _ = _flax(_Attention())
    message = _message(params)
    assert '"MultiHeadDotProductAttention_0/query/bias" (2, 4)' in message


def test_equinox_embeddings_and_norms_are_told_apart_from_weights():
    keys = jax.random.split(jax.random.key(0), 2)
    model = {
        "emb": eqx.nn.Embedding(20, 4, key=keys[0]),
        "norm": eqx.nn.LayerNorm((3, 4)),
        "proj": eqx.nn.Linear(4, 5, key=keys[1]),
    }
    message = _message(eqx.filter(model, eqx.is_array))
    emb, norm, proj = (message.index(f'"{p}') for p in ("emb/", "norm/", "proj/"))
    assert "vocabulary" in message[emb:] and "normalization" in message[norm:]
    fixes = message.split("; ")
    assert any('"proj/weight"' in f and "output_axes=0" in f for f in fixes)
    assert not any('"emb/weight"' in f and "output_axes=0" in f for f in fixes)


def test_convolutions_named_like_attention_do_not_warn():
    class SelfAttention2D(nn.Module):  # SAGAN-style: 1x1 convs, (out,) biases
        @nn.compact
        def __call__(self, x):
            q = nn.Conv(4, (1, 1), name="query")(x)
            k = nn.Conv(4, (3,), name="key")(x.reshape(x.shape[0], -1, x.shape[-1]))
            return q.sum() + k.sum()

    params = SelfAttention2D().init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
    _quiet(params["params"])


def test_path_rules_leave_the_default_leaves_checked():
    _, params, _ = _flax(_Attention())
    following_the_embedding_advice = optax_gc.path_rules({r"embedding$": None})
    message = _message(params, output_axes=following_the_embedding_advice)
    assert '"MultiHeadDotProductAttention_0/query/kernel"' in message
    assert '"Embed_0/embedding"' not in message  # the rule decides it
    explicit = optax_gc.path_rules({r"embedding$": None}, default=(-1,))
    _quiet(params, output_axes=explicit)


def test_short_names_alone_are_not_read_as_biases():
    _quiet({"a": jnp.ones((4, 8)), "b": jnp.ones((3, 3, 8, 8))})
