"""docs/recipes/flax_nnx.md: GC through `nnx.Optimizer`."""

import numpy as np
import optax
from flax import nnx

import optax_gc
from tests.integrations.common import fan_in_mean, flat_leaves, image_batch


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.linear = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.linear(x.mean(axis=(1, 2)))


def _nnx_loss(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_flax_nnx_optimizer():
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax_gc.with_gc(optax.adam(1e-2), location="update"), wrt=nnx.Param
    )
    x, y = image_batch()
    grads = nnx.grad(_nnx_loss)(model, x, y)
    gc_grads = optax_gc.centralize().update(grads, None)[0]
    raw, out = flat_leaves(grads), flat_leaves(gc_grads)
    for k in raw:
        if "kernel" in k:
            np.testing.assert_allclose(fan_in_mean(out[k], (-1,)), 0.0, atol=1e-7)
        else:
            np.testing.assert_array_equal(out[k], raw[k])
    assert sum("kernel" in k for k in raw) == 2

    before = flat_leaves(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = flat_leaves(nnx.state(model, nnx.Param))
    for k in before:
        if "kernel" in k:  # GC on the final update: unit means do not move
            np.testing.assert_allclose(
                fan_in_mean(after[k], (-1,)), fan_in_mean(before[k], (-1,)), atol=1e-6
            )
        assert not np.array_equal(after[k], before[k]), k


def test_flax_nnx_chain_centralize_matches_manual():
    model = NNXNet(nnx.Rngs(0))
    tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = image_batch()
    grads = nnx.grad(_nnx_loss)(model, x, y)
    before = flat_leaves(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = flat_leaves(nnx.state(model, nnx.Param))
    gc_grads = flat_leaves(optax_gc.centralize().update(grads, None)[0])
    for k in before:
        np.testing.assert_allclose(
            after[k] - before[k], -0.1 * gc_grads[k], rtol=1e-5, atol=1e-7
        )
