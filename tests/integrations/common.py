"""Helpers shared by several recipe tests: a batch of images, flat leaves and
the Flax linen Conv + BatchNorm + Dense model of docs/recipes/flax_linen.md
(also restored in docs/recipes/checkpointing.md)."""

import flax.linen as nn
import jax
import optax
from flax.training import train_state

from tests.helpers import fan_in_means


def fan_in_mean(x, output_axes):
    """Mean of one array over every axis except ``output_axes`` (float64)."""
    return fan_in_means(x, output_axes, min_ndim=0)


def flat_leaves(tree):
    """``{"a/b/kernel": leaf}`` for every leaf of ``tree``."""
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): x
        for p, x in jax.tree.leaves_with_path(tree)
    }


def image_batch(seed=0, n=16):
    """``n`` random 8x8x1 images (NHWC) and integer labels in [0, 10)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, 8, 8, 1)), jax.random.randint(k2, (n,), 0, 10)


# --- Flax linen: Conv + BatchNorm + Dense with TrainState --------------------


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)  # BatchNorm carries the bias
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3), strides=2)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
    batch_stats: dict


def linen_state(tx):
    variables = CNN().init(jax.random.key(0), image_batch()[0], train=False)
    return TrainState.create(
        apply_fn=CNN().apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )


def linen_grads(state, batch):
    x, y = batch

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    return jax.grad(loss_fn, has_aux=True)(state.params)


@jax.jit
def linen_step(state, batch):
    grads, batch_stats = linen_grads(state, batch)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats)
