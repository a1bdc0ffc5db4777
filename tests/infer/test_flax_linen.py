"""`optax_gc.infer_output_axes` on a zoo of Flax linen models.

Every model is built from the installed ``flax.linen`` layers; for every leaf
of its parameters the expected output axes (and the reason) are derived by hand
from the layer's definition in ``flax/linen/linear.py``, ``attention.py`` and
``normalization.py`` (flax 0.12.8):

* ``Dense``: ``dot_general(x, kernel (in, out), ((x.ndim - 1,), (0,)))``, so
  the fan-in is axis 0.
* ``DenseGeneral``: the kernel is ``inputs.shape[axis] + features``, and the
  axes under ``axis`` are contracted: ``(in, H, D)`` has fan-in axis 0,
  ``(H, D, out)`` (``axis=(-2, -1)``) has fan-in axes 0 and 1.
* ``MultiHeadDotProductAttention``: ``query``/``key``/``value`` are
  ``DenseGeneral(features=(heads, head_dim), axis=-1)`` and ``out`` is
  ``DenseGeneral(features, axis=(-2, -1))``.
* ``Conv``: ``lax.conv_general_dilated`` with an HWIO kernel ``(kh, kw, in /
  groups, out)``: the spatial and in-feature axes are the fan-in, size-1 axes
  included (a depthwise kernel's ``in / groups = 1`` axis is contracted too;
  averaging over a size-1 axis or keeping it is the same projection).
* ``ConvTranspose``: ``lax.conv_transpose``; with ``transpose_kernel=True`` the
  kernel is ``(kh, kw, features, in)`` and JAX swaps its I/O axes, so axis 3
  is the in-feature (fan-in) axis and axis 2 is kept.
* ``ConvLocal``: the kernel ``(oh, ow, kh * kw * in, out)`` meets the input
  patches in a ``dot_general`` contracting the patch axis; the output
  positions are batch dimensions, hence kept.
* ``Einsum``: whatever the equation contracts; letters shared with the output
  are batch or free dimensions, hence kept.
* ``Embed``: ``jnp.take`` (a gather with data indices: a lookup); ``attend``
  is ``query @ embedding.T`` (a matmul): both together are a tied table.
* ``LayerNorm``/``BatchNorm`` scales and biases, ``Conv``/``Dense`` biases and
  position embeddings only meet data elementwise.
* ``nn.scan(..., variable_axes={"params": 0})`` stacks each parameter along a
  new axis 0 that the scan slices off: that axis is kept.

Then, per model, real gradients centralized with the inferred rule have zero
mean over each leaf's fan-in, and the untouched leaves come back bit-identical.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gc
from tests.integrations.common import flat_leaves

# --- expected decisions ---------------------------------------------------------


def _axes_text(axes):
    return f"axis {axes[0]}" if len(axes) == 1 else f"axes {tuple(axes)}"


def dot(kept, fan_in, *, uses=1, stacked=False):
    """A leaf whose axes ``fan_in`` are contracted by ``dot_general``."""
    assert not set(kept) & set(fan_in)
    reason = f"dot_general contracts {_axes_text(fan_in)}"
    if uses > 1:
        reason += f" ({uses} uses)"
    if stacked:
        reason += "; stacked axis 0 kept"
    return tuple(kept), reason


def conv(kept, fan_in):
    """A convolution kernel whose in-feature and spatial axes are ``fan_in``."""
    assert not set(kept) & set(fan_in)
    return tuple(kept), f"conv: in-feature and spatial {_axes_text(fan_in)}"


ELEMENTWISE = (None, "elementwise only")  # checked as a prefix
LOOKUP = (None, "lookup")
TIED = (None, "tied lookup and matmul")

F32, BF16, I32 = jnp.float32, jnp.bfloat16, jnp.int32


def spec(shape, dtype=F32):
    return jax.ShapeDtypeStruct(shape, dtype)


class Case(NamedTuple):
    model: nn.Module
    inputs: tuple  # ShapeDtypeStructs; integer inputs are drawn in [0, 3)
    expected: dict
    stats: str | None = None  # batch_stats: None, "closed" over or "arg"


# --- the models -------------------------------------------------------------------


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (4, 6)
        shared = nn.Dense(6, name="shared")  # applied twice: one weight, 2 uses
        x = shared(nn.tanh(shared(x)))
        x = nn.relu(nn.Dense(8, name="hidden")(x))
        return nn.Dense(3, use_bias=False, name="head")(x)


MLP = Case(
    Mlp(),
    (spec((4, 6)),),
    {
        "shared/kernel": dot((1,), (0,), uses=2),  # (6, 6), x @ k twice
        "shared/bias": ELEMENTWISE,
        "hidden/kernel": dot((1,), (0,)),  # (6, 8)
        "hidden/bias": ELEMENTWISE,
        "head/kernel": dot((1,), (0,)),  # (8, 3)
    },
)


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 5, 8)
        h = nn.DenseGeneral((2, 4), axis=-1, name="split")(x)  # (2, 5, 2, 4)
        h = nn.tanh(h)
        merged = nn.DenseGeneral(6, axis=(-2, -1), name="merge")(h)  # (2, 5, 6)
        both = nn.DenseGeneral((3, 2), axis=(-2, -1), name="regroup")(h)
        return merged + both.reshape(merged.shape)


HEADS = Case(
    Heads(),
    (spec((2, 5, 8)),),
    {
        "split/kernel": dot((1, 2), (0,)),  # (in, H, D): contracts in
        "split/bias": ELEMENTWISE,  # (H, D)
        "merge/kernel": dot((2,), (0, 1)),  # (H, D, out): contracts H and D
        "merge/bias": ELEMENTWISE,
        "regroup/kernel": dot((2, 3), (0, 1)),  # (H, D, 3, 2): contracts H, D
        "regroup/bias": ELEMENTWISE,  # (3, 2)
    },
)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x, ctx):  # x: (2, 5, 6), ctx: (2, 3, 4)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=8, normalize_qk=True, name="self_attn"
        )(x, mask=mask)
        return nn.MultiHeadDotProductAttention(
            num_heads=2, qkv_features=8, out_features=5, name="cross_attn"
        )(x, ctx)


def _attention_expected(prefix, qk_norm):
    expected = {
        f"{prefix}/{name}/kernel": dot((1, 2), (0,))  # (in, heads, head_dim)
        for name in ("query", "key", "value")
    }
    expected |= {f"{prefix}/{n}/bias": ELEMENTWISE for n in ("query", "key", "value")}
    expected[f"{prefix}/out/kernel"] = dot((2,), (0, 1))  # (heads, head_dim, out)
    expected[f"{prefix}/out/bias"] = ELEMENTWISE
    if qk_norm:  # LayerNorm(use_bias=False) over head_dim: scale (head_dim,)
        expected[f"{prefix}/query_ln/scale"] = ELEMENTWISE
        expected[f"{prefix}/key_ln/scale"] = ELEMENTWISE
    return expected


ATTENTION = Case(
    Attention(),
    (spec((2, 5, 6)), spec((2, 3, 4))),
    _attention_expected("self_attn", True) | _attention_expected("cross_attn", False),
)


class Convs(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 8, 8, 1)
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name="depthwise")(x))
        x = nn.relu(
            nn.Conv(8, (3, 3), strides=2, feature_group_count=2, name="grouped")(x)
        )
        x = nn.relu(nn.Conv(6, (1, 1), name="pointwise")(x))
        return nn.Conv(
            4, (2, 2), kernel_dilation=2, padding="CIRCULAR", name="dilated"
        )(x)


CONVS = Case(
    Convs(),
    (spec((2, 8, 8, 1)),),
    {
        # (3, 3, 1, 8): one input channel, contracted with the 3x3 window.
        "conv/kernel": conv((3,), (0, 1, 2)),
        "conv/bias": ELEMENTWISE,
        # Depthwise, groups = 8 = in: kernel (3, 3, 8 / 8, 8); the conv contracts
        # the size-1 I axis with the window (fan-in 9 entries per output).
        "depthwise/kernel": conv((3,), (0, 1, 2)),
        "depthwise/bias": ELEMENTWISE,
        # Two groups: kernel (3, 3, 8 / 2, 8), fan-in window and 4 in-features.
        "grouped/kernel": conv((3,), (0, 1, 2)),
        "grouped/bias": ELEMENTWISE,
        # 1x1: kernel (1, 1, 8, 6); the size-1 window axes are contracted too.
        "pointwise/kernel": conv((3,), (0, 1, 2)),
        "pointwise/bias": ELEMENTWISE,
        "dilated/kernel": conv((3,), (0, 1, 2)),  # (2, 2, 6, 4)
        "dilated/bias": ELEMENTWISE,
    },
)


class Transposed(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 4, 4, 3)
        x = nn.relu(nn.ConvTranspose(6, (3, 3), strides=(2, 2), name="up")(x))
        return nn.ConvTranspose(4, (2, 2), transpose_kernel=True, name="up_t")(x)


TRANSPOSED = Case(
    Transposed(),
    (spec((2, 4, 4, 3)),),
    {
        "up/kernel": conv((3,), (0, 1, 2)),  # (kh, kw, in, out)
        "up/bias": ELEMENTWISE,
        # transpose_kernel: (kh, kw, out=4, in=6); lax swaps I/O, so axis 3 is
        # the in-feature axis contracted with the input, axis 2 is the output.
        "up_t/kernel": conv((2,), (0, 1, 3)),
        "up_t/bias": ELEMENTWISE,
    },
)


class Local(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 6, 6, 2)
        x = nn.ConvLocal(4, (3, 3), padding="VALID", name="local2d")(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (2, 16, 4)
        return nn.ConvLocal(3, (2,), strides=2, padding="VALID", name="local1d")(x)


LOCAL = Case(
    Local(),
    (spec((2, 6, 6, 2)),),
    {
        # (oh, ow, kh * kw * in, out) = (4, 4, 18, 4): the patch axis is
        # contracted, each output position has its own kernel (batch dims).
        "local2d/kernel": dot((0, 1, 3), (2,)),
        "local2d/bias": ELEMENTWISE,  # (4, 4, 4)
        "local1d/kernel": dot((0, 2), (1,)),  # (8, 2 * 4, 3)
        "local1d/bias": ELEMENTWISE,  # (8, 3)
    },
)


class Einsums(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 2, 4)
        # Per-head projection: h is a batch dimension of the dot_general.
        y = nn.Einsum((2, 4, 3), "bhd,hdf->bhf", name="per_head")(x)
        z = nn.Einsum((3, 2, 5), "btd,dhk->bthk", name="split")(y)
        return nn.Einsum((2, 3, 5), "bhf,hfo->bo", name="merge")(nn.tanh(y)) + z.sum(
            axis=(1, 2)
        )


EINSUMS = Case(
    Einsums(),
    (spec((2, 2, 4)),),
    {
        "per_head/kernel": dot((0, 2), (1,)),  # hdf: d contracted, h batch
        "per_head/bias": ELEMENTWISE,  # (h, f)
        "split/kernel": dot((1, 2), (0,)),  # dhk: d contracted
        "split/bias": ELEMENTWISE,  # (h, k)
        "merge/kernel": dot((2,), (0, 1)),  # hfo: h and f contracted
        "merge/bias": ELEMENTWISE,  # (o,)
    },
)


class Embeddings(nn.Module):
    @nn.compact
    def __call__(self, tokens, segments):  # both (2, 5) int
        tok = nn.Embed(11, 8, name="tok")
        x = tok(tokens) + nn.Embed(3, 8, name="segment")(segments)
        x = nn.gelu(nn.Dense(8, name="mix")(x))
        return tok.attend(x)  # tied logits: x @ embedding.T


EMBEDDINGS = Case(
    Embeddings(),
    (spec((2, 5), I32), spec((2, 5), I32)),
    {
        "tok/embedding": TIED,  # jnp.take and attend's matmul
        "segment/embedding": LOOKUP,  # jnp.take only
        "mix/kernel": dot((1,), (0,)),
        "mix/bias": ELEMENTWISE,
    },
)


class Norms(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (4, 6), training mode
        x = nn.Dense(8, name="dense")(x)
        x = nn.BatchNorm(use_running_average=False, momentum=0.9, name="bn")(x)
        x = nn.LayerNorm(name="ln")(nn.relu(x))
        x = nn.RMSNorm(name="rms")(x)
        return nn.Dense(2, name="head")(x)


NORMS = Case(
    Norms(),
    (spec((4, 6)),),
    {
        "dense/kernel": dot((1,), (0,)),
        "dense/bias": ELEMENTWISE,
        "bn/scale": ELEMENTWISE,  # rsqrt(var + eps) * scale, times x - mean
        "bn/bias": ELEMENTWISE,
        "ln/scale": ELEMENTWISE,
        "ln/bias": ELEMENTWISE,
        "rms/scale": ELEMENTWISE,
        "head/kernel": dot((1,), (0,)),
        "head/bias": ELEMENTWISE,
    },
    stats="arg",
)


class ResidualBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Conv(self.features, (3, 3), self.strides, use_bias=False, name="conv1")
        h = h(x)
        h = nn.relu(nn.BatchNorm(use_running_average=False, name="bn1")(h))
        h = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(h)
        h = nn.BatchNorm(use_running_average=False, name="bn2")(h)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(
                self.features, (1, 1), self.strides, use_bias=False, name="proj"
            )(x)
            x = nn.BatchNorm(use_running_average=False, name="proj_bn")(x)
        return nn.relu(x + h)


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 8, 8, 3)
        x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False, name="stem_bn")(x))
        x = ResidualBlock(8, name="block1")(x)
        x = ResidualBlock(16, strides=2, name="block2")(x)
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


RESNET = Case(
    ResNet(),
    (spec((2, 8, 8, 3)),),
    {
        "stem/kernel": conv((3,), (0, 1, 2)),  # (3, 3, 3, 8)
        "block1/conv1/kernel": conv((3,), (0, 1, 2)),  # (3, 3, 8, 8)
        "block1/conv2/kernel": conv((3,), (0, 1, 2)),
        "block2/conv1/kernel": conv((3,), (0, 1, 2)),  # (3, 3, 8, 16)
        "block2/conv2/kernel": conv((3,), (0, 1, 2)),  # (3, 3, 16, 16)
        "block2/proj/kernel": conv((3,), (0, 1, 2)),  # (1, 1, 8, 16)
        "head/kernel": dot((1,), (0,)),  # (16, 10)
        "head/bias": ELEMENTWISE,
    }
    | {
        f"{bn}/{p}": ELEMENTWISE
        for bn in (
            "stem_bn",
            "block1/bn1",
            "block1/bn2",
            "block2/bn1",
            "block2/bn2",
            "block2/proj_bn",
        )
        for p in ("scale", "bias")
    },
    stats="closed",
)


class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.gelu(nn.Dense(16, name="up")(nn.LayerNorm(name="ln")(x)))
        return x + nn.Dense(8, name="down")(h), None


class Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 8)
        blocks = nn.scan(
            MlpBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = blocks(name="layers")(x, None)
        return nn.Dense(2, name="head")(x)


STACKED = Case(
    Stacked(),
    (spec((2, 8)),),
    {
        # Each leaf gains a leading layer axis (3, ...) sliced off by the scan.
        "layers/up/kernel": dot((0, 2), (1,), stacked=True),  # (3, 8, 16)
        "layers/up/bias": ELEMENTWISE,  # (3, 16)
        "layers/down/kernel": dot((0, 2), (1,), stacked=True),  # (3, 16, 8)
        "layers/down/bias": ELEMENTWISE,
        "layers/ln/scale": ELEMENTWISE,  # (3, 8)
        "layers/ln/bias": ELEMENTWISE,
        "head/kernel": dot((1,), (0,)),
        "head/bias": ELEMENTWISE,
    },
)


class Rematted(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (2, 8)
        block = nn.remat(MlpBlock)
        x, _ = block(name="block1")(x)
        x, _ = block(name="block2")(x)
        return x


REMATTED = Case(
    Rematted(),
    (spec((2, 8)),),
    {
        f"{b}/{p}": e
        for b in ("block1", "block2")
        for p, e in {
            "up/kernel": dot((1,), (0,)),  # (8, 16)
            "up/bias": ELEMENTWISE,
            "down/kernel": dot((1,), (0,)),  # (16, 8)
            "down/bias": ELEMENTWISE,
            "ln/scale": ELEMENTWISE,
            "ln/bias": ELEMENTWISE,
        }.items()
    },
)


class LowPrecision(nn.Module):
    param_dtype: Any = F32

    @nn.compact
    def __call__(self, x):  # x: (2, 6, 6, 2)
        kw = {"dtype": BF16, "param_dtype": self.param_dtype}
        x = nn.relu(nn.Conv(4, (3, 3), name="conv", **kw)(x))
        x = nn.LayerNorm(name="ln", **kw)(x.mean(axis=(1, 2)))
        x = nn.DenseGeneral((2, 3), name="proj", **kw)(x)
        return nn.Dense(3, name="head", **kw)(x.reshape(x.shape[0], -1))


def _low_precision_expected():
    return {
        "conv/kernel": conv((3,), (0, 1, 2)),  # (3, 3, 2, 4), cast to bf16 first
        "conv/bias": ELEMENTWISE,
        "ln/scale": ELEMENTWISE,
        "ln/bias": ELEMENTWISE,
        "proj/kernel": dot((1, 2), (0,)),  # (4, 2, 3)
        "proj/bias": ELEMENTWISE,
        "head/kernel": dot((1,), (0,)),  # (6, 3)
        "head/bias": ELEMENTWISE,
    }


BF16_COMPUTE = Case(LowPrecision(), (spec((2, 6, 6, 2)),), _low_precision_expected())
BF16_PARAMS = Case(
    LowPrecision(param_dtype=BF16),
    (spec((2, 6, 6, 2), BF16),),
    _low_precision_expected(),
)


class DecoderBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, mask=mask)
        h = nn.gelu(nn.Dense(16, name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + nn.Dense(8, name="down")(h), None


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):  # tokens: (2, 6) int
        embed = nn.Embed(13, 8, name="embed")
        pos = self.param("pos", nn.initializers.normal(0.02), (1, 6, 8))
        x = embed(tokens) + pos
        blocks = nn.scan(
            nn.remat(DecoderBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=2,
        )
        x, _ = blocks(name="layers")(x, None)
        return embed.attend(nn.LayerNorm(name="ln_f")(x))


TRANSFORMER = Case(
    Transformer(),
    (spec((2, 6), I32),),
    {
        "embed/embedding": TIED,  # lookup and the tied logits
        "pos": ELEMENTWISE,  # (1, L, D), added to the embeddings
        "ln_f/scale": ELEMENTWISE,
        "ln_f/bias": ELEMENTWISE,
        # Two layers, scanned: every leaf has a leading (2,) layer axis.
        "layers/attn/query/kernel": dot((0, 2, 3), (1,), stacked=True),
        "layers/attn/key/kernel": dot((0, 2, 3), (1,), stacked=True),
        "layers/attn/value/kernel": dot((0, 2, 3), (1,), stacked=True),
        # (layers, heads, head_dim, D): contracts heads and head_dim.
        "layers/attn/out/kernel": dot((0, 3), (1, 2), stacked=True),
        "layers/up/kernel": dot((0, 2), (1,), stacked=True),  # (2, 8, 16)
        "layers/down/kernel": dot((0, 2), (1,), stacked=True),  # (2, 16, 8)
    }
    | {
        f"layers/{p}": ELEMENTWISE
        for p in (
            "attn/query/bias",  # (2, heads, head_dim)
            "attn/key/bias",
            "attn/value/bias",
            "attn/out/bias",
            "up/bias",
            "down/bias",
            "ln1/scale",
            "ln1/bias",
            "ln2/scale",
            "ln2/bias",
        )
    },
)

CASES = {
    "mlp": MLP,
    "dense_general": HEADS,
    "attention": ATTENTION,
    "conv": CONVS,
    "conv_transpose": TRANSPOSED,
    "conv_local": LOCAL,
    "einsum": EINSUMS,
    "embed": EMBEDDINGS,
    "norms": NORMS,
    "resnet": RESNET,
    "scan": STACKED,
    "remat": REMATTED,
    "bf16_compute": BF16_COMPUTE,
    "bf16_params": BF16_PARAMS,
    "transformer": TRANSFORMER,
}


# --- plumbing -------------------------------------------------------------------


def forward(case):
    """``fn(params, *inputs, batch_stats=None)`` as a training step calls it."""

    def fn(params, *inputs, batch_stats=None):
        if case.stats is None:
            return case.model.apply({"params": params}, *inputs)
        variables = {"params": params, "batch_stats": batch_stats}
        return case.model.apply(variables, *inputs, mutable=["batch_stats"])

    return fn


def infer(case, params, inputs, batch_stats):
    """The rule, with batch_stats closed over or passed as an input."""
    fn = forward(case)
    if case.stats == "arg":
        return optax_gc.infer_output_axes(fn, params, *inputs, batch_stats=batch_stats)
    if case.stats == "closed":
        return optax_gc.infer_output_axes(
            lambda p, *xs: fn(p, *xs, batch_stats=batch_stats), params, *inputs
        )
    return optax_gc.infer_output_axes(fn, params, *inputs)


def real_inputs(case, seed=0):
    """Random inputs (NumPy, so that nothing compiles eagerly)."""
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.integers(0, 3, s.shape), s.dtype)
        if jnp.issubdtype(s.dtype, jnp.integer)
        else jnp.asarray(rng.standard_normal(s.shape), s.dtype)
        for s in case.inputs
    )


def random_like(tree, seed):
    """Random arrays (0.5 * standard normal) with the shapes of ``tree``."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), tree
    )


def output(y):
    """The model's prediction (dropping updated batch_stats), as float32."""
    if isinstance(y, tuple):
        y = y[0]
    return y.astype(F32)


# --- tests ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_inferred_axes_match_layer_definitions(name):
    case = CASES[name]
    variables = jax.eval_shape(case.model.init, jax.random.key(0), *case.inputs)
    stats = variables.get("batch_stats")
    if case.stats == "closed":  # closed-over values must be concrete
        stats = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), stats)
    rule = infer(case, variables["params"], case.inputs, stats)
    assert set(rule.decisions) == set(flat_leaves(variables["params"]))
    assert set(rule.decisions) == set(case.expected)
    for path, (axes, reason) in sorted(rule.decisions.items()):
        exp_axes, exp_reason = case.expected[path]
        assert axes == exp_axes, (path, axes, reason)
        if exp_reason == ELEMENTWISE[1]:
            assert reason.startswith(exp_reason), (path, reason)
        else:
            assert reason == exp_reason, (path, reason)


@pytest.mark.parametrize("name", list(CASES))
def test_centralized_real_gradients(name):
    case = CASES[name]
    inputs = real_inputs(case)
    # Random weights of the model's shapes: GC does not care how they were
    # initialized, and skipping model.init saves a compilation per model.
    variables = random_like(
        jax.eval_shape(case.model.init, jax.random.key(0), *inputs), seed=1
    )
    params, stats = variables["params"], variables.get("batch_stats")
    rule = infer(case, params, inputs, stats)
    fn = forward(case)
    shape = jax.eval_shape(fn, params, *inputs, batch_stats=stats)
    shape = (shape[0] if isinstance(shape, tuple) else shape).shape
    target = jnp.asarray(np.random.default_rng(2).standard_normal(shape), F32)
    gc = optax_gc.centralize(output_axes=rule)

    @jax.jit  # one compilation per model: gradients, then GC
    def grads_and_gc(params):
        def loss(p):
            return jnp.mean((output(fn(p, *inputs, batch_stats=stats)) - target) ** 2)

        grads = jax.grad(loss)(params)
        return grads, gc.update(grads, gc.init(params))[0]

    grads, gc_grads = grads_and_gc(params)
    raw, out = flat_leaves(grads), flat_leaves(gc_grads)
    worked = False
    for path, g in raw.items():
        axes, _ = rule.decisions[path]
        assert out[path].dtype == g.dtype
        if axes is None:
            np.testing.assert_array_equal(np.asarray(out[path]), np.asarray(g))
            continue
        fan_in = tuple(a for a in range(g.ndim) if a not in axes)
        raw64, out64 = np.asarray(g, np.float64), np.asarray(out[path], np.float64)
        scale = np.abs(raw64).max()
        # bf16 leaves: the mean is taken in float32 but the result is rounded.
        rtol = 1e-2 if g.dtype == BF16 else 1e-5
        np.testing.assert_allclose(
            out64.mean(axis=fan_in), 0.0, atol=rtol * scale + 1e-30, err_msg=path
        )
        worked |= bool(np.abs(raw64.mean(axis=fan_in)).max() > 1e-3 * scale)
    assert worked  # at least one leaf had a fan-in mean for GC to remove
