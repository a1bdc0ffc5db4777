"""docs/recipes/flax_linen.md: GC with a Flax linen Conv + BatchNorm + Dense
model and `TrainState`, on real gradients."""

import jax
import numpy as np
import optax

import optax_gc
from tests.helpers import assert_trees_close
from tests.integrations.common import (
    fan_in_mean,
    flat_leaves,
    image_batch,
    linen_grads,
    linen_state,
    linen_step,
)


def test_flax_linen_real_gradients():
    state = linen_state(optax.chain(optax_gc.centralize(), optax.adam(1e-3)))
    grads, _ = linen_grads(state, image_batch())
    gc_grads, _ = optax_gc.centralize().update(grads, None)
    raw, out = flat_leaves(grads), flat_leaves(gc_grads)
    kernels = [k for k in raw if k.endswith("kernel")]
    assert sorted(kernels) == ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]
    for k in kernels:
        # (kh, kw, in) for Conv, (in,) for Dense: one mean per output unit.
        np.testing.assert_allclose(fan_in_mean(out[k], (-1,)), 0.0, atol=1e-7)
        assert np.abs(fan_in_mean(raw[k], (-1,))).max() > 1e-4  # GC did work
    untouched = [k for k in raw if k not in kernels]
    assert sorted(untouched) == [
        "BatchNorm_0/bias",
        "BatchNorm_0/scale",
        "Conv_1/bias",
        "Dense_0/bias",
    ]
    for k in untouched:
        np.testing.assert_array_equal(out[k], raw[k])


def test_flax_linen_train_state_step():
    gc_state = linen_state(optax.chain(optax_gc.centralize(), optax.adam(1e-2)))
    plain_state = linen_state(optax.adam(1e-2))
    batch = image_batch()
    gc_next, plain_next = linen_step(gc_state, batch), linen_step(plain_state, batch)
    # The step is adam on the centralized gradient ...
    grads, _ = linen_grads(gc_state, batch)
    expected, _ = optax.adam(1e-2).update(
        optax_gc.centralize().update(grads, None)[0],
        optax.adam(1e-2).init(gc_state.params),
    )
    delta = jax.tree.map(lambda a, b: a - b, gc_next.params, gc_state.params)
    assert_trees_close(delta, expected, rtol=1e-5, atol=1e-8)
    # ... so BatchNorm scale/bias and biases move exactly as without GC.
    new, ref = flat_leaves(gc_next.params), flat_leaves(plain_next.params)
    for k in new:
        if not k.endswith("kernel"):
            np.testing.assert_array_equal(new[k], ref[k])
        else:
            assert not np.allclose(new[k], ref[k])


def test_flax_linen_update_location_keeps_kernel_means():
    state = linen_state(optax_gc.with_gc(optax.adam(1e-2), location="update"))
    start = flat_leaves(state.params)
    for seed in range(5):
        state = linen_step(state, image_batch(seed))
    end = flat_leaves(state.params)
    for k in start:
        if k.endswith("kernel"):
            np.testing.assert_allclose(
                fan_in_mean(end[k], (-1,)), fan_in_mean(start[k], (-1,)), atol=1e-6
            )


def test_flax_linen_training_reduces_loss():
    state = linen_state(optax.chain(optax_gc.centralize(), optax.adam(1e-2)))
    batch = image_batch(0, 64)

    def loss(state):
        logits = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats},
            batch[0],
            train=False,
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    before = loss(state)
    for _ in range(30):
        state = linen_step(state, batch)
    assert loss(state) < 0.8 * before
