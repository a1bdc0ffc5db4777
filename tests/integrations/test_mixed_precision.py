"""docs/recipes/mixed_precision.md: bf16 params and gradients through a Flax
step keep their dtype and are centralized in float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gc
from tests.integrations.common import fan_in_mean, flat_leaves, image_batch


def test_bf16_params_and_grads_through_a_flax_step():
    class BF16Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            kw = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
            x = nn.relu(nn.Conv(8, (3, 3), **kw)(x))
            return nn.Dense(10, **kw)(x.mean(axis=(1, 2)))

    x, y = image_batch()
    model = BF16Net()
    params = model.init(jax.random.key(0), x.astype(jnp.bfloat16))["params"]
    tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = model.apply({"params": p}, x.astype(jnp.bfloat16))
            return optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), y
            ).mean()

        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, grads

    new_params, _, grads = step(params, state)
    # GC on its own (inside the step XLA may keep excess f32 precision).
    gc_grads = jax.jit(lambda g: optax_gc.centralize().update(g, None)[0])(grads)
    for tree in (new_params, grads, gc_grads):
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(tree))
    raw, out = flat_leaves(grads), flat_leaves(gc_grads)
    for k in raw:
        if k.endswith("kernel"):
            g = out[k]
            # Zero within bf16 rounding of each element.
            scale = np.abs(np.asarray(raw[k], np.float32)).max()
            np.testing.assert_allclose(fan_in_mean(g, (-1,)), 0.0, atol=8e-3 * scale)
            # Computed in float32, rounded once to bf16.
            g32 = np.asarray(raw[k], np.float32)
            keep = g32.ndim - 1
            ref = g32 - g32.mean(axis=tuple(range(keep)), keepdims=True)
            np.testing.assert_array_equal(
                np.asarray(g, np.float32),
                np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32),
            )
        else:
            np.testing.assert_array_equal(out[k], raw[k])
