"""`infer_output_axes` on Equinox layers, checked against hand-derived axes.

Each expected entry is derived from the installed layer's source (equinox
0.13.8, ``equinox/nn``): ``Linear`` computes ``weight @ x`` with an
``(out, in)`` weight, ``Conv``/``ConvTranspose`` call ``conv_general_dilated``
with ``OIHW`` weights (``(out, in // groups, *kernel)``) and ``(out, 1, ...)``
biases, ``Embedding`` indexes ``weight[x]``, ``MultiheadAttention`` projects
with four ``Linear`` layers and ``MLP`` is a tuple of ``Linear`` layers. Models
are applied the Equinox way: ``params, static = eqx.partition(model,
eqx.is_inexact_array)`` and ``eqx.combine(params, static)``, per example under
``jax.vmap`` or directly on one example. Paths are attribute names and tuple
indices joined by ``/``.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from tests.integrations.common import (
    ELEMENTWISE,
    assert_centred_by_rule,
    assert_decisions,
    assert_update_then_gc,
)

F32 = jnp.float32
# Linear: weight (out, in) @ x contracts the in-feature axis 1.
LINEAR = ((0,), "dot_general contracts axis 1")


def _spec(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _leaves(tree):
    """``{"a/b/c": array}`` for every non-None leaf."""
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
        for p, x in jax.tree.leaves_with_path(tree)
    }


def _batched(module, x):
    return jax.vmap(module)(x)


def _single(module, x):
    return module(x)


def _self_attention(module, x):  # x: (batch, seq, features)
    return jax.vmap(lambda xi: module(xi, xi, xi))(x)


def _keys(n):
    return jax.random.split(jax.random.key(0), n)


# --- a model combining the layers, written for these tests -------------------

VOCAB, WIDTH, CLASSES = 11, 8, 5


class TinyEqx(eqx.Module):
    """Embedding, self-attention, depthwise Conv1d over time, MLP head."""

    embed: eqx.nn.Embedding
    attn: eqx.nn.MultiheadAttention
    conv: eqx.nn.Conv1d
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(VOCAB, WIDTH, key=k[0])
        self.attn = eqx.nn.MultiheadAttention(
            2, WIDTH, use_query_bias=True, use_output_bias=True, key=k[1]
        )
        self.conv = eqx.nn.Conv1d(WIDTH, WIDTH, 3, padding=1, groups=WIDTH, key=k[2])
        self.mlp = eqx.nn.MLP(WIDTH, CLASSES, width_size=6, depth=1, key=k[3])

    def __call__(self, tokens):  # tokens: (seq,) ints
        x = jax.vmap(self.embed)(tokens)  # (seq, WIDTH)
        x = x + self.attn(x, x, x)
        x = x + self.conv(x.T).T  # channels first for Conv1d
        return self.mlp(x.mean(axis=0))


TINY_EXPECTED = {
    "embed/weight": (None, "lookup"),  # weight[x] with a data index
    # MultiheadAttention(2 heads, 8): qk_size = vo_size = 8 // 2, so every
    # projection is a Linear with an (8, 8) weight
    "attn/query_proj/weight": LINEAR,
    "attn/query_proj/bias": (None, ELEMENTWISE),
    "attn/key_proj/weight": LINEAR,
    "attn/value_proj/weight": LINEAR,
    "attn/output_proj/weight": LINEAR,
    "attn/output_proj/bias": (None, ELEMENTWISE),
    # depthwise Conv1d weight (8, 1, 3): fan-in = taps and the size-1 in-feature
    "conv/weight": ((0,), "conv: in-feature and spatial axes (1, 2)"),
    "conv/bias": (None, ELEMENTWISE),  # (8, 1)
    "mlp/layers/0/weight": LINEAR,  # (6, 8)
    "mlp/layers/0/bias": (None, ELEMENTWISE),
    "mlp/layers/1/weight": LINEAR,  # (5, 6)
    "mlp/layers/1/bias": (None, ELEMENTWISE),
}

CONV_OIHW = "conv: in-feature and spatial axes (1, 2, 3)"

CASES = {
    "linear_vmap": (
        lambda: eqx.nn.Linear(4, 6, key=_keys(1)[0]),
        _batched,
        (_spec(5, 4),),
        {"weight": LINEAR, "bias": (None, ELEMENTWISE)},
    ),
    "linear_single_example": (
        lambda: eqx.nn.Linear(4, 6, key=_keys(1)[0]),
        _single,
        (_spec(4),),
        {"weight": LINEAR, "bias": (None, ELEMENTWISE)},
    ),
    # out_features="scalar": weight (1, 4), the one unit still has fan-in axis 1
    "linear_scalar_out": (
        lambda: eqx.nn.Linear(4, "scalar", key=_keys(1)[0]),
        _batched,
        (_spec(5, 4),),
        {"weight": LINEAR, "bias": (None, ELEMENTWISE)},
    ),
    # weight (out=5, in=2, 3, 3), bias (5, 1, 1)
    "conv2d": (
        lambda: eqx.nn.Conv2d(2, 5, 3, key=_keys(1)[0]),
        _batched,
        (_spec(2, 2, 7, 7),),
        {"weight": ((0,), CONV_OIHW), "bias": (None, ELEMENTWISE)},
    ),
    # strided, dilated, padded; weight (5, 2, 3, 3)
    "conv2d_strided_dilated": (
        lambda: eqx.nn.Conv2d(
            2, 5, 3, stride=2, dilation=2, padding=2, key=_keys(1)[0]
        ),
        _batched,
        (_spec(2, 2, 9, 9),),
        {"weight": ((0,), CONV_OIHW), "bias": (None, ELEMENTWISE)},
    ),
    # grouped: weight (6, in / groups = 2, 3, 3)
    "conv2d_grouped": (
        lambda: eqx.nn.Conv2d(4, 6, 3, groups=2, key=_keys(1)[0]),
        _batched,
        (_spec(2, 4, 7, 7),),
        {"weight": ((0,), CONV_OIHW), "bias": (None, ELEMENTWISE)},
    ),
    # depthwise: weight (4, 1, 3, 3); fan-in = taps and the size-1 in-feature
    "conv2d_depthwise": (
        lambda: eqx.nn.Conv2d(4, 4, 3, padding=1, groups=4, key=_keys(1)[0]),
        _batched,
        (_spec(2, 4, 7, 7),),
        {
            "weight": ((0,), "conv: in-feature and spatial axes (1, 2, 3)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # depthwise with channel multiplier 2: weight (8, 1, 3, 3)
    "conv2d_depthwise_multiplier": (
        lambda: eqx.nn.Conv2d(4, 8, 3, groups=4, key=_keys(1)[0]),
        _batched,
        (_spec(2, 4, 7, 7),),
        {
            "weight": ((0,), "conv: in-feature and spatial axes (1, 2, 3)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # ConvTranspose2d: conv_general_dilated with lhs_dilation, weight (5, 2, 3, 3)
    "conv_transpose2d": (
        lambda: eqx.nn.ConvTranspose2d(2, 5, 3, stride=2, key=_keys(1)[0]),
        _batched,
        (_spec(2, 2, 4, 4),),
        {"weight": ((0,), CONV_OIHW), "bias": (None, ELEMENTWISE)},
    ),
    "embedding": (
        lambda: eqx.nn.Embedding(10, 6, key=_keys(1)[0]),
        _batched,
        (_spec(5, dtype=jnp.int32),),
        {"weight": (None, "lookup")},
    ),
    # query/key (H * qk = 6, query_size = 7), value (H * vo = 8, 7), output (5, 8)
    "multihead_attention": (
        lambda: eqx.nn.MultiheadAttention(
            num_heads=2,
            query_size=7,
            qk_size=3,
            vo_size=4,
            output_size=5,
            use_query_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            key=_keys(1)[0],
        ),
        _self_attention,
        (_spec(2, 4, 7),),
        {
            "query_proj/weight": LINEAR,
            "query_proj/bias": (None, ELEMENTWISE),
            "key_proj/weight": LINEAR,
            "value_proj/weight": LINEAR,
            "value_proj/bias": (None, ELEMENTWISE),
            "output_proj/weight": LINEAR,
            "output_proj/bias": (None, ELEMENTWISE),
        },
    ),
    # layers (Linear(4, 8), Linear(8, 8), Linear(8, 3))
    "mlp": (
        lambda: eqx.nn.MLP(4, 3, 8, depth=2, key=_keys(1)[0]),
        _batched,
        (_spec(5, 4),),
        {
            **{f"layers/{i}/weight": LINEAR for i in range(3)},
            **{f"layers/{i}/bias": (None, ELEMENTWISE) for i in range(3)},
        },
    ),
    "tiny_model": (
        lambda: TinyEqx(_keys(1)[0]),
        _batched,
        (_spec(3, 5, dtype=jnp.int32),),
        TINY_EXPECTED,
    ),
}


def _is_abstract_inexact(x):
    return isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.inexact)


def _rule(model, apply, *args, is_param=eqx.is_inexact_array):
    params, static = eqx.partition(model, is_param)

    def fn(p, *a):
        return apply(eqx.combine(p, static), *a)

    return optax_gc.infer_output_axes(fn, params, *args), params


@pytest.mark.parametrize("name", list(CASES))
def test_inferred_axes_match_layer_definition(name):
    make, apply, args, expected = CASES[name]
    model = eqx.filter_eval_shape(make)  # abstract: no initializer runs
    if name == "embedding":  # a lone lookup table: a rule that centres nothing
        with pytest.warns(optax_gc.InferenceWarning, match="none of the 1 leaf"):
            rule, params = _rule(model, apply, *args, is_param=_is_abstract_inexact)
    else:
        rule, params = _rule(model, apply, *args, is_param=_is_abstract_inexact)
    assert_decisions(rule, expected, _leaves(params))


def _batch():
    k1, k2 = jax.random.split(jax.random.key(1))
    tokens = jax.random.randint(k1, (3, 5), 0, VOCAB)
    labels = jax.random.randint(k2, (3,), 0, CLASSES)
    return tokens, labels


@eqx.filter_grad
def _grads(model, tokens, labels):
    logits = jax.vmap(model)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.cache
def _tiny_model_and_rule():
    """Built once: Equinox modules are immutable, so both tests can share it."""
    model = TinyEqx(jax.random.key(0))
    rule, _ = _rule(model, _batched, _spec(3, 5, dtype=jnp.int32))
    return model, rule


def test_centralize_with_rule_on_real_gradients():
    model, rule = _tiny_model_and_rule()
    grads = eqx.filter_jit(_grads)(model, *_batch())  # model-shaped, None leaves
    out = _leaves(optax_gc.centralize(output_axes=rule).update(grads, None)[0])
    decided = assert_centred_by_rule(_leaves(grads), out, rule)
    assert decided == sum(a is not None for a, _ in TINY_EXPECTED.values())


def test_gc_adam_step_on_filtered_equinox_trees():
    model, rule = _tiny_model_and_rule()
    tx = optax_gc.gc_adam(1e-3, location="update", output_axes=rule)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, tokens, labels):
        grads = _grads(model, tokens, labels)
        updates, opt_state = tx.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        return eqx.apply_updates(model, updates), opt_state, grads

    new_model, opt_state, grads = step(model, opt_state, *_batch())
    before = _leaves(eqx.filter(model, eqx.is_array))
    after = _leaves(eqx.filter(new_model, eqx.is_array))

    # Reference: optax.adam's update, then GC with the same rule.
    adam = optax.adam(1e-3)
    params = eqx.filter(model, eqx.is_array)
    updates, _ = adam.update(grads, adam.init(params), params)
    updates = _leaves(optax_gc.centralize(output_axes=rule).update(updates, None)[0])
    assert set(before) == set(after) == set(updates) == set(rule.decisions)
    assert_update_then_gc(before, after, updates, rule)
