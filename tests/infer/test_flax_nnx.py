"""`infer_output_axes` on Flax NNX layers, checked against hand-derived axes.

Each expected entry is derived from the installed layer's source (flax 0.12.8,
``flax/nnx/nn/linear.py`` and ``attention.py``): ``Linear`` and
``LinearGeneral`` call ``lax.dot_general`` with the kernel's ``in_features``
axes contracted, ``Conv``/``ConvTranspose`` use ``HWIO`` kernels, ``Embed``
indexes its table with ``jnp.take`` and ``attend`` multiplies by its transpose.
The models are applied the NNX way, ``nnx.merge(graphdef, params, rest)(x)``,
so every path is an ``nnx.State`` path without its trailing ``.value``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gc
from tests.integrations.common import (
    ELEMENTWISE,
    assert_centred_by_rule,
    assert_decisions,
    assert_update_then_gc,
)

F32 = jnp.float32


def _spec(*shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _path(key_path):
    """``a/b/c`` for a key path, without NNX's trailing ``value``."""
    names = [jax.tree_util.keystr((k,), simple=True) for k in key_path]
    return "/".join(names[:-1] if names and names[-1] == "value" else names)


def _leaves(tree):
    return {_path(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


def _pure_fn(model):
    """``(fn, params)`` with ``fn(params, *args) == model(*args)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(p, *args):
        return nnx.merge(graphdef, p, rest)(*args)

    return fn, params


# --- models written for these tests -------------------------------------------


class Block(nnx.Module):
    """One residual-free block: Linear, GELU, LayerNorm (square, so it scans)."""

    def __init__(self, d, rngs):
        self.linear = nnx.Linear(d, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x):
        return self.norm(jax.nn.gelu(self.linear(x)))


class Stack(nnx.Module):
    """``n`` Blocks built by an ``nnx.vmap``'d constructor, run by ``nnx.scan``."""

    def __init__(self, n, d, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(d, rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return body(x, self.blocks)


class Attend(nnx.Module):
    """Only ``Embed.attend``: the table used as an output layer, never looked up."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 6, rngs=rngs)

    def __call__(self, q):
        return self.embed.attend(q)


class TiedLM(nnx.Module):
    """Embedding lookup, a Linear, then logits from the same table."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 6, rngs=rngs)
        self.linear = nnx.Linear(6, 6, rngs=rngs)

    def __call__(self, tokens):
        return self.embed.attend(jnp.tanh(self.linear(self.embed(tokens))))


VOCAB, WIDTH = 11, 8


class TinyLM(nnx.Module):
    """Embed, depthwise Conv over time, attention, stacked blocks, Einsum head."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.conv = nnx.Conv(WIDTH, WIDTH, (3,), feature_group_count=WIDTH, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=WIDTH, decode=False, rngs=rngs
        )
        self.stack = Stack(3, WIDTH, rngs)
        self.head = nnx.Einsum("btd,dv->btv", (WIDTH, VOCAB), (VOCAB,), rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)  # (B, T, WIDTH)
        x = x + self.conv(x)
        x = x + self.attn(x)
        return self.head(self.stack(x))


# Stacked reason: the scan slices axis 0 off, so the per-layer axis 1 is
# contracted (axis 0 of the slice) and the stack axis is kept.
STACKED = "dot_general contracts axis 1; stacked axis 0 kept"

TINY_LM_EXPECTED = {
    "embed/embedding": (None, "lookup"),
    # depthwise Conv kernel (3, 1, 8): fan-in = taps and the (size-1) in-feature
    "conv/kernel": ((2,), "conv: in-feature and spatial axes (0, 1)"),
    "conv/bias": (None, ELEMENTWISE),
    # q/k/v LinearGeneral kernel (in=8, H=2, D=4): contracts `in` only
    **{
        f"attn/{n}/kernel": ((1, 2), "dot_general contracts axis 0")
        for n in ("query", "key", "value")
    },
    **{f"attn/{n}/bias": (None, ELEMENTWISE) for n in ("query", "key", "value")},
    # out LinearGeneral kernel (H=2, D=4, out=8), axis=(-2, -1): contracts H, D
    "attn/out/kernel": ((2,), "dot_general contracts axes (0, 1)"),
    "attn/out/bias": (None, ELEMENTWISE),
    # nnx.vmap'd Linear kernel (L=3, in=8, out=8) applied inside nnx.scan
    "stack/blocks/linear/kernel": ((0, 2), STACKED),
    "stack/blocks/linear/bias": (None, ELEMENTWISE),
    "stack/blocks/norm/scale": (None, ELEMENTWISE),
    "stack/blocks/norm/bias": (None, ELEMENTWISE),
    # Einsum "btd,dv->btv": kernel (d, v) contracts d
    "head/kernel": ((1,), "dot_general contracts axis 0"),
    "head/bias": (None, ELEMENTWISE),
}

CASES = {
    # Linear kernel (in, out): x @ kernel contracts `in`
    "linear": (
        lambda r: nnx.Linear(4, 6, rngs=r),
        (_spec(5, 4),),
        {
            "kernel": ((1,), "dot_general contracts axis 0"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # LinearGeneral kernel (2, 3, 4, 5) = in_features + out_features, axis=(-2, -1)
    "linear_general": (
        lambda r: nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=r),
        (_spec(7, 2, 3),),
        {
            "kernel": ((2, 3), "dot_general contracts axes (0, 1)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # batch_axis={0: 2}: kernel (2, 3, 4), axis 0 is a dot_general batch dim (kept)
    "linear_general_batch_axis": (
        lambda r: nnx.LinearGeneral(3, 4, axis=-1, batch_axis={0: 2}, rngs=r),
        (_spec(2, 5, 3),),
        {
            "kernel": ((0, 2), "dot_general contracts axis 1"),
            "bias": (None, ELEMENTWISE),  # (2, 4) reshaped to (2, 1, 4), added
        },
    ),
    # q/k/v kernels (in=6, H=2, D=4); out kernel (H, D, out=5); LayerNorm scales (D,)
    "multi_head_attention": (
        lambda r: nnx.MultiHeadAttention(
            num_heads=2,
            in_features=6,
            qkv_features=8,
            out_features=5,
            decode=False,
            normalize_qk=True,
            rngs=r,
        ),
        (_spec(3, 4, 6),),
        {
            **{
                f"{n}/kernel": ((1, 2), "dot_general contracts axis 0")
                for n in ("query", "key", "value")
            },
            **{f"{n}/bias": (None, ELEMENTWISE) for n in ("query", "key", "value")},
            "out/kernel": ((2,), "dot_general contracts axes (0, 1)"),
            "out/bias": (None, ELEMENTWISE),
            "query_ln/scale": (None, ELEMENTWISE),
            "key_ln/scale": (None, ELEMENTWISE),
        },
    ),
    # Conv kernel HWIO (3, 3, 3, 8): in-feature and spatial are the fan-in
    "conv": (
        lambda r: nnx.Conv(3, 8, (3, 3), rngs=r),
        (_spec(2, 6, 6, 3),),
        {
            "kernel": ((3,), "conv: in-feature and spatial axes (0, 1, 2)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # grouped: kernel (3, 3, in / groups = 2, 6)
    "conv_grouped": (
        lambda r: nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=r),
        (_spec(2, 6, 6, 4),),
        {
            "kernel": ((3,), "conv: in-feature and spatial axes (0, 1, 2)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # depthwise: kernel (3, 3, 1, 4); fan-in = taps and the size-1 in-feature
    "conv_depthwise": (
        lambda r: nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=r),
        (_spec(2, 6, 6, 4),),
        {
            "kernel": ((3,), "conv: in-feature and spatial axes (0, 1, 2)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # 1-D, dilated, strided, CIRCULAR (pads the data only): kernel (3, 2, 5)
    "conv_1d_dilated_circular": (
        lambda r: nnx.Conv(
            2, 5, (3,), strides=2, kernel_dilation=2, padding="CIRCULAR", rngs=r
        ),
        (_spec(2, 9, 2),),
        {
            "kernel": ((2,), "conv: in-feature and spatial axes (0, 1)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # ConvTranspose kernel (3, 3, in=3, out=5), HWIO
    "conv_transpose": (
        lambda r: nnx.ConvTranspose(3, 5, (3, 3), strides=2, rngs=r),
        (_spec(2, 4, 4, 3),),
        {
            "kernel": ((3,), "conv: in-feature and spatial axes (0, 1, 2)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # transpose_kernel=True: kernel (3, 3, out=5, in=3); lax.conv_transpose flips
    # the spatial axes and swaps I/O, so stored axis 2 is the output feature
    "conv_transpose_kernel": (
        lambda r: nnx.ConvTranspose(
            3, 5, (3, 3), strides=2, transpose_kernel=True, rngs=r
        ),
        (_spec(2, 4, 4, 3),),
        {
            "kernel": ((2,), "conv: in-feature and spatial axes (0, 1, 3)"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # Einsum "btd,dnh->btnh": kernel (d=6, n=2, h=3) contracts d
    "einsum": (
        lambda r: nnx.Einsum("btd,dnh->btnh", (6, 2, 3), (2, 3), rngs=r),
        (_spec(2, 5, 6),),
        {
            "kernel": ((1, 2), "dot_general contracts axis 0"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # Einsum "bnd,nde->bne": n is a dot_general batch dim (kept), d contracted
    "einsum_batch_dim": (
        lambda r: nnx.Einsum("bnd,nde->bne", (2, 6, 3), (2, 3), rngs=r),
        (_spec(4, 2, 6),),
        {
            "kernel": ((0, 2), "dot_general contracts axis 1"),
            "bias": (None, ELEMENTWISE),
        },
    ),
    # Embed: jnp.take(embedding, tokens, axis=0)
    "embed_lookup": (
        lambda r: nnx.Embed(10, 6, rngs=r),
        (_spec(3, 4, dtype=jnp.int32),),
        {"embedding": (None, "lookup")},
    ),
    # attend only: q @ embedding.T contracts the feature axis 1, rows are outputs
    "embed_attend": (
        Attend,
        (_spec(3, 6),),
        {"embed/embedding": ((0,), "dot_general contracts axis 1")},
    ),
    # lookup and attend on one table
    "embed_tied": (
        TiedLM,
        (_spec(3, 4, dtype=jnp.int32),),
        {
            "embed/embedding": (None, "tied lookup and matmul"),
            "linear/kernel": ((1,), "dot_general contracts axis 0"),
            "linear/bias": (None, ELEMENTWISE),
        },
    ),
    # nnx.vmap'd constructor: kernel (L=3, 4, 4), biases / norm params (3, 4)
    "vmap_stack_scan": (
        lambda r: Stack(3, 4, r),
        (_spec(2, 4),),
        {
            "blocks/linear/kernel": ((0, 2), STACKED),
            "blocks/linear/bias": (None, ELEMENTWISE),
            "blocks/norm/scale": (None, ELEMENTWISE),
            "blocks/norm/bias": (None, ELEMENTWISE),
        },
    ),
    "tiny_lm": (TinyLM, (_spec(2, 5, dtype=jnp.int32),), TINY_LM_EXPECTED),
}


@pytest.mark.parametrize("name", list(CASES))
def test_inferred_axes_match_layer_definition(name):
    make, args, expected = CASES[name]
    model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))  # abstract: no init runs
    fn, params = _pure_fn(model)
    if name == "embed_lookup":  # a lone lookup table: a rule that centres nothing
        with pytest.warns(optax_gc.InferenceWarning, match="none of the 1 leaf"):
            rule = optax_gc.infer_output_axes(fn, params, *args)
    else:
        rule = optax_gc.infer_output_axes(fn, params, *args)
    assert_decisions(rule, expected, _leaves(params))


def _tiny_lm_batch():
    k1, k2 = jax.random.split(jax.random.key(1))
    tokens = jax.random.randint(k1, (2, 5), 0, VOCAB)
    targets = jax.random.randint(k2, (2, 5), 0, VOCAB)
    return tokens, targets


def _loss(model, tokens, targets):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _tiny_lm_and_rule():
    model = TinyLM(nnx.Rngs(0))
    fn, params = _pure_fn(model)
    rule = optax_gc.infer_output_axes(fn, params, _spec(2, 5, dtype=jnp.int32))
    return model, rule


def test_centralize_with_rule_on_real_gradients():
    model, rule = _tiny_lm_and_rule()
    grads = nnx.jit(nnx.grad(_loss))(model, *_tiny_lm_batch())  # State of Params
    out = _leaves(optax_gc.centralize(output_axes=rule).update(grads, None)[0])
    # The head's input is a LayerNorm output, zero-mean over d, so its gradient
    # x^T delta already has zero fan-in mean.
    decided = assert_centred_by_rule(
        _leaves(grads), out, rule, already_centred={"head/kernel"}
    )
    assert decided == sum(a is not None for a, _ in TINY_LM_EXPECTED.values())


def test_nnx_optimizer_step_with_inferred_rule():
    model, rule = _tiny_lm_and_rule()
    tokens, targets = _tiny_lm_batch()
    optimizer = nnx.Optimizer(
        model,
        optax_gc.gc_adamw(1e-3, location="update", output_axes=rule),
        wrt=nnx.Param,
    )

    @nnx.jit
    def step(model, optimizer, tokens, targets):
        grads = nnx.grad(_loss)(model, tokens, targets)
        optimizer.update(model, grads)
        return grads

    before_state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    before = _leaves(before_state)
    grads = nnx.to_pure_dict(step(model, optimizer, tokens, targets))
    after = _leaves(nnx.state(model, nnx.Param))

    # Reference on plain dicts: optax.adamw's update, then GC with the same rule.
    adamw = optax.adamw(1e-3)
    updates, _ = adamw.update(grads, adamw.init(before_state), before_state)
    updates = _leaves(optax_gc.centralize(output_axes=rule).update(updates, None)[0])
    assert_update_then_gc(before, after, updates, rule)
