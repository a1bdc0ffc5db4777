"""Model code shared by the benchmarks: the Flax CNN, the byte-level LM and
real parameter shapes.

``CNN`` is the network ``benchmarks.train`` trains and ``benchmarks.overhead``
times a full train step of. The ``*_shapes`` builders give the ``{path: shape}``
of real models' parameters in Flax layout (kernels ``(..., in, out)``), from
which ``benchmarks.overhead`` builds random gradient trees; ``GPT2_RULES`` are
the GC output axes for the GPT-2 tree, written by hand. ``GPT2`` is a Flax
linen GPT-2 whose parameter tree is ``gpt2_small_shapes``: the model
``benchmarks.inference`` reads the output axes of. ``TransformerLM`` is the
small pre-LN decoder, layers stacked with ``nn.scan``, that ``benchmarks.lm``
trains on the standard library's sources.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

import optax_gc

NORMS = ("batch", "group", "none")


class CNN(nn.Module):
    """Two conv-norm-ReLU pairs per stage, two stages, then a hidden Dense layer.

    ``conv(w) conv(w) pool conv(2w) conv(2w) pool dense(hidden) dense(10)``,
    3x3 convolutions without bias, each followed by the normalization ``norm``
    and ReLU; 2x2 max-pools. ``norm`` is ``"batch"`` (BatchNorm, momentum 0.9:
    statistics of the batch in training, running averages in evaluation),
    ``"group"`` (GroupNorm with ``groups`` groups: the same computation in
    training and evaluation, independent of the batch) or ``"none"`` (the
    convolutions then have biases). ``width=32, stem_stride=1, hidden=128`` is
    the network of the independent Fashion-MNIST run quoted in issue 11.
    ``benchmarks.train`` trains ``width=16, stem_stride=2`` on Fashion-MNIST by
    default: the strided first convolution runs the rest at a quarter of the
    pixels, which is what fits its default run in 5 minutes on 2 CPU cores.
    """

    width: int = 16
    stem_stride: int = 1
    hidden: int = 128
    num_classes: int = 10
    norm: str = "batch"
    groups: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

        def conv_norm_relu(x, features, stride=1):
            x = nn.Conv(features, (3, 3), strides=stride, use_bias=self.norm == "none")(
                x
            )
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            elif self.norm == "group":
                x = nn.GroupNorm(num_groups=self.groups)(x)
            return nn.relu(x)

        x = conv_norm_relu(x, self.width, self.stem_stride)
        x = conv_norm_relu(x, self.width)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = conv_norm_relu(x, 2 * self.width)
        x = conv_norm_relu(x, 2 * self.width)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


def resnet50_shapes(num_classes=1000):
    """{path: shape} of ResNet-50 (v1.5) parameters, Flax layout."""
    shapes = {
        "conv_init/kernel": (7, 7, 3, 64),
        "bn_init/scale": (64,),
        "bn_init/bias": (64,),
    }
    cin = 64
    for stage, (blocks, width) in enumerate(
        zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)
    ):
        for b in range(blocks):
            p = f"stage{stage}_block{b}"
            for i, (k, ci, co) in enumerate(
                ((1, cin, width), (3, width, width), (1, width, 4 * width))
            ):
                shapes[f"{p}/conv{i}/kernel"] = (k, k, ci, co)
                shapes[f"{p}/bn{i}/scale"] = (co,)
                shapes[f"{p}/bn{i}/bias"] = (co,)
            if b == 0:
                shapes[f"{p}/proj_conv/kernel"] = (1, 1, cin, 4 * width)
                shapes[f"{p}/proj_bn/scale"] = (4 * width,)
                shapes[f"{p}/proj_bn/bias"] = (4 * width,)
            cin = 4 * width
    shapes["head/kernel"] = (cin, num_classes)
    shapes["head/bias"] = (num_classes,)
    return shapes


def gpt2_small_shapes(layers=12, d=768, heads=12, vocab=50257, ctx=1024):
    """{path: shape} of a GPT-2-small-like model with DenseGeneral attention."""
    hd = d // heads
    shapes = {"wte/embedding": (vocab, d), "wpe/embedding": (ctx, d)}
    for i in range(layers):
        p = f"h_{i}"
        shapes[f"{p}/ln_1/scale"] = (d,)
        shapes[f"{p}/ln_1/bias"] = (d,)
        for name in ("query", "key", "value"):
            shapes[f"{p}/attn/{name}/kernel"] = (d, heads, hd)
            shapes[f"{p}/attn/{name}/bias"] = (heads, hd)
        shapes[f"{p}/attn/out/kernel"] = (heads, hd, d)
        shapes[f"{p}/attn/out/bias"] = (d,)
        shapes[f"{p}/ln_2/scale"] = (d,)
        shapes[f"{p}/ln_2/bias"] = (d,)
        shapes[f"{p}/mlp/fc/kernel"] = (d, 4 * d)
        shapes[f"{p}/mlp/fc/bias"] = (4 * d,)
        shapes[f"{p}/mlp/proj/kernel"] = (4 * d, d)
        shapes[f"{p}/mlp/proj/bias"] = (d,)
    shapes["ln_f/scale"] = (d,)
    shapes["ln_f/bias"] = (d,)
    return shapes


GPT2_RULES = optax_gc.path_rules(
    {
        r"embedding$": None,
        r"bias$": None,
        r"(query|key|value)/kernel$": (1, 2),
        r"out/kernel$": (2,),
    }
)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(4 * x.shape[-1], name="fc")(x))
        return nn.Dense(x.shape[-1], name="proj")(h)


class _GPT2Block(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln_1")(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(
            h, h, mask=mask
        )
        return x + _MLP(name="mlp")(nn.LayerNorm(name="ln_2")(x))


class GPT2(nn.Module):
    """A GPT-2 in Flax linen, tied logits; its tree is ``gpt2_small_shapes``."""

    layers: int = 12
    d: int = 768
    heads: int = 12
    vocab: int = 50257
    ctx: int = 1024

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(self.vocab, self.d, name="wte")
        positions = jnp.arange(tokens.shape[-1])
        x = wte(tokens) + nn.Embed(self.ctx, self.d, name="wpe")(positions)[None]
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            x = _GPT2Block(self.heads, name=f"h_{i}")(x, mask)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


class _LMBlock(nn.Module):
    """One pre-LN decoder block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``.

    Called by ``nn.scan`` as ``(carry, _) -> (carry, None)``. The attention is
    causal (each position attends to itself and the positions before it),
    ``nn.MultiHeadDotProductAttention`` with ``heads`` heads over the whole
    width: q/k/v kernels ``(d, heads, d // heads)``, out kernel
    ``(heads, d // heads, d)``. The MLP is ``Dense(4d)``, gelu, ``Dense(d)``.
    """

    heads: int

    @nn.compact
    def __call__(self, x, _):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm(name="ln_1")(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(
            h, h, mask=mask
        )
        return x + _MLP(name="mlp")(nn.LayerNorm(name="ln_2")(x)), None


class TransformerLM(nn.Module):
    """A byte-level pre-LN decoder-only transformer; ``benchmarks.lm`` trains it.

    ``tokens`` ``(batch, T)`` int bytes, ``T <= ctx`` -> logits
    ``(batch, T, 256)``. Token embedding ``nn.Embed(256, d)`` plus a learned
    position embedding ``pos_embedding`` ``(1, ctx, d)``; ``layers`` blocks
    (``_LMBlock``) stacked with ``nn.scan``, so every block parameter has a
    leading axis of size ``layers`` (under ``blocks/``); a final LayerNorm
    ``ln_f``; an untied output head ``nn.Dense(256)`` (``head``). No dropout.
    """

    layers: int = 4
    d_model: int = 128
    heads: int = 4
    ctx: int = 128
    vocab: int = 256

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        pos = self.param(
            "pos_embedding",
            nn.initializers.normal(0.02),
            (1, self.ctx, self.d_model),
        )
        x = x + pos[:, : tokens.shape[-1]]
        blocks = nn.scan(
            _LMBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )(self.heads, name="blocks")
        x, _ = blocks(x, None)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))
