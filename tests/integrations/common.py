"""Helpers shared by several recipe tests: a batch of images, flat leaves and
the Flax linen Conv + BatchNorm + Dense model of docs/recipes/flax_linen.md
(also restored in docs/recipes/checkpointing.md)."""

import flax.linen as nn
import jax
import numpy as np
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


ELEMENTWISE = "elementwise only"  # a reason checked as a prefix: "(add)", ...


def assert_decisions(rule, expected, leaf_paths):
    """``rule`` decided exactly ``expected`` ``{path: (axes, reason)}`` for the
    leaves at ``leaf_paths``; an ``ELEMENTWISE`` reason is a prefix."""
    assert set(rule.decisions) == set(expected) == set(leaf_paths)
    for path, (axes, reason) in expected.items():
        got_axes, got_reason = rule.decisions[path]
        assert got_axes == axes, (path, rule.decisions[path])
        if reason == ELEMENTWISE:
            assert got_reason.startswith(ELEMENTWISE), (path, got_reason)
        else:
            assert got_reason == reason, (path, got_reason)


def assert_centred_by_rule(raw, out, rule, already_centred=()):
    """``out`` (GC of ``raw`` with ``rule``, ``{path: leaf}``): leaves with axes
    have zero per-unit means and had not (but for ``already_centred``); the
    others are bit-identical. Returns how many leaves had axes."""
    assert set(raw) == set(out) == set(rule.decisions)
    decided = 0
    for path, (axes, _) in rule.decisions.items():
        if axes is None:
            np.testing.assert_array_equal(out[path], raw[path])
            continue
        decided += 1
        scale = np.abs(raw[path]).max()
        assert scale > 0, path
        if path not in already_centred:
            assert np.abs(fan_in_mean(raw[path], axes)).max() > 1e-3 * scale, path
        np.testing.assert_allclose(
            fan_in_mean(out[path], axes), 0.0, atol=1e-5 * scale, err_msg=path
        )
    return decided


def assert_update_then_gc(before, after, updates, rule):
    """Each leaf moved by exactly ``updates``; each leaf ``rule`` gives axes kept
    its per-unit mean weight (GC on the update). ``{path: leaf}`` dicts."""
    for path, (axes, _) in rule.decisions.items():
        np.testing.assert_allclose(
            after[path], before[path] + updates[path], rtol=1e-5, atol=1e-7
        )
        assert not np.array_equal(after[path], before[path]), path
        if axes is not None:
            np.testing.assert_allclose(
                fan_in_mean(after[path], axes),
                fan_in_mean(before[path], axes),
                atol=1e-6,
                err_msg=path,
            )


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
