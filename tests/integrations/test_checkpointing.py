"""docs/recipes/checkpointing.md: an Orbax checkpoint round trip of a GC
optimizer state resumes bit-identically."""

import pytest

import optax_gc
from tests.helpers import assert_trees_equal
from tests.integrations.common import image_batch, linen_state, linen_step


def test_orbax_checkpoint_resume(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = optax_gc.gc_adam(1e-2, weight_decay=1e-4)
    batches = [image_batch(s) for s in range(10)]
    state = linen_state(tx)
    for b in batches[:5]:
        state = linen_step(state, b)

    ckpt = ocp.StandardCheckpointer()
    saveable = {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "step": state.step,
    }
    ckpt.save(tmp_path / "ckpt", saveable)
    ckpt.wait_until_finished()

    uninterrupted = state
    for b in batches[5:]:
        uninterrupted = linen_step(uninterrupted, b)

    fresh = linen_state(tx)
    target = {
        "params": fresh.params,
        "batch_stats": fresh.batch_stats,
        "opt_state": fresh.opt_state,
        "step": fresh.step,
    }
    restored = ckpt.restore(tmp_path / "ckpt", target)
    ckpt.close()
    resumed = fresh.replace(**restored)
    for b in batches[5:]:
        resumed = linen_step(resumed, b)
    assert_trees_equal(resumed.params, uninterrupted.params)
    assert_trees_equal(resumed.opt_state, uninterrupted.opt_state)
