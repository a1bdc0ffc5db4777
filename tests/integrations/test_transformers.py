"""docs/recipes/transformers.md: attention kernels, scan-stacked layers and
embeddings, handled by `optax_gc.path_rules`."""

import flax.linen as nn
import jax
import numpy as np
import optax

import optax_gc
from tests.integrations.common import fan_in_mean, flat_leaves

TRANSFORMER_RULES = optax_gc.path_rules(
    {
        r"embedding$": None,
        r"(bias|scale)$": None,  # (H, D) biases and scan-stacked (L, D) norms
        r"layers/.*kernel$": (0, -1),
        r"(query|key|value)/kernel$": (1, 2),
        r"out/kernel$": (2,),
    }
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.relu(nn.Dense(12)(nn.LayerNorm()(x)))
        return x + nn.Dense(6)(h), None


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(20, 6)(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6)(x)
        layers = nn.scan(
            MLP,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(20)(x)


def test_attention_and_scan_rules():
    tokens = jax.random.randint(jax.random.key(1), (4, 5), 0, 20)
    model = Transformer()
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss(params):
        logits = model.apply({"params": params}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    grads = jax.grad(loss)(params)
    out = flat_leaves(
        optax_gc.centralize(output_axes=TRANSFORMER_RULES).update(grads, None)[0]
    )
    raw = flat_leaves(grads)
    shapes = {k: v.shape for k, v in raw.items() if "kernel" in k or "embedding" in k}
    assert shapes == {
        "Embed_0/embedding": (20, 6),
        "MultiHeadDotProductAttention_0/query/kernel": (6, 2, 3),
        "MultiHeadDotProductAttention_0/key/kernel": (6, 2, 3),
        "MultiHeadDotProductAttention_0/value/kernel": (6, 2, 3),
        "MultiHeadDotProductAttention_0/out/kernel": (2, 3, 6),
        "layers/Dense_0/kernel": (3, 6, 12),
        "layers/Dense_1/kernel": (3, 12, 6),
        "Dense_0/kernel": (6, 20),
    }
    np.testing.assert_array_equal(out["Embed_0/embedding"], raw["Embed_0/embedding"])
    for name in ("query", "key", "value"):
        k = f"MultiHeadDotProductAttention_0/{name}/kernel"
        # Each (head, dim) unit is centred over its own `in` fan-in only.
        expected = raw[k] - raw[k].mean(axis=0, keepdims=True)
        np.testing.assert_allclose(out[k], expected, atol=1e-7)
    k = "MultiHeadDotProductAttention_0/out/kernel"
    expected = raw[k] - raw[k].mean(axis=(0, 1), keepdims=True)
    np.testing.assert_allclose(out[k], expected, atol=1e-7)
    for k in ("layers/Dense_0/kernel", "layers/Dense_1/kernel"):
        for layer in range(3):  # layer by layer, never across the stack
            g = raw[k][layer]
            np.testing.assert_allclose(
                out[k][layer], g - g.mean(0, keepdims=True), atol=1e-7
            )
    k = "Dense_0/kernel"
    np.testing.assert_allclose(
        out[k], raw[k] - raw[k].mean(0, keepdims=True), atol=1e-7
    )
    stacked = [k for k in raw if k.startswith("layers/") and raw[k].ndim == 2]
    assert sorted(stacked) == [
        "layers/Dense_0/bias",
        "layers/Dense_1/bias",
        "layers/LayerNorm_0/bias",
        "layers/LayerNorm_0/scale",
    ]  # (L, D): two dimensions, but no fan-in
    for k in raw:
        if "bias" in k or "scale" in k:
            np.testing.assert_array_equal(out[k], raw[k])


def test_default_axes_mix_heads_on_attention_kernels():
    """Without the rule, (in, H, D) kernels are averaged over in and H."""
    g = jax.random.normal(jax.random.key(0), (6, 2, 3))
    wrong = optax_gc.centralize_array(g)
    right = optax_gc.centralize_array(g, (1, 2))
    assert np.abs(fan_in_mean(wrong, (1, 2))).max() > 1e-3
    np.testing.assert_allclose(fan_in_mean(right, (1, 2)), 0.0, atol=1e-7)
