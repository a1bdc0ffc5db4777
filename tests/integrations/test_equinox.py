"""docs/recipes/equinox.md: Equinox output-first weights, `output_axes=0`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc
from tests.integrations.common import fan_in_mean, image_batch


class EqxNet(eqx.Module):
    conv: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 8, 3, key=k1)
        self.linear = eqx.nn.Linear(8, 10, key=k2)

    def __call__(self, x):  # x: (1, H, W)
        return self.linear(jax.nn.relu(self.conv(x)).mean(axis=(1, 2)))


def _eqx_grads(model):
    x, y = image_batch()
    x = jnp.moveaxis(x, -1, 1)

    @eqx.filter_grad
    def grads(model):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return grads(model)


def test_equinox_output_first_layout():
    model = EqxNet(jax.random.key(0))
    assert model.conv.weight.shape == (8, 1, 3, 3)
    assert model.linear.weight.shape == (10, 8)
    tx = optax.chain(optax_gc.centralize(output_axes=0), optax.adam(1e-2))
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    grads = _eqx_grads(model)
    gc_grads = optax_gc.centralize(output_axes=0).update(grads, None)[0]
    for w in ("conv", "linear"):
        g = getattr(gc_grads, w).weight
        np.testing.assert_allclose(fan_in_mean(g, (0,)), 0.0, atol=1e-7)
        b = getattr(gc_grads, w).bias
        np.testing.assert_array_equal(b, getattr(grads, w).bias)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    new_model = eqx.apply_updates(model, updates)
    assert not np.allclose(new_model.linear.weight, model.linear.weight)


def test_equinox_with_default_axes_is_the_documented_mistake():
    """output_axes=-1 on (out, in) weights centres each input across outputs."""
    grads = _eqx_grads(EqxNet(jax.random.key(0)))
    with pytest.warns(optax_gc.LayoutWarning, match='"linear/weight".*output_axes=0'):
        wrong = optax_gc.centralize().update(grads, None)[0].linear.weight
    right = optax_gc.centralize(output_axes=0).update(grads, None)[0].linear.weight
    assert np.abs(fan_in_mean(wrong, (0,))).max() > 1e-4  # fan-in not centred
    np.testing.assert_allclose(fan_in_mean(wrong, (-1,)), 0.0, atol=1e-7)
    assert not np.allclose(wrong, right)
