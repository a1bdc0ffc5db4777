"""centralize() + optax pieces replays the authors' own GC optimizers."""

import optax
import pytest

import optax_gc
from tests.helpers import Reference, max_relative_error, replay

REF = Reference()
GC_CONFIGS = [c for c, cfg in REF.meta["configs"].items() if cfg["use_gc"]]
LAYOUT_AXES = {"flax": -1, "torch": 0}


def _from_pieces(cfg, output_axes):
    """The authors' optimizer spelled with optax pieces and centralize()."""
    gc = optax_gc.centralize(output_axes=output_axes, conv_only=cfg["gc_conv_only"])
    decay = optax.add_decayed_weights(cfg["weight_decay"])
    scale = optax.scale(-cfg["lr"])
    if cfg["class"] == "SGD":
        momentum = optax.trace(
            decay=cfg["momentum"], nesterov=cfg.get("nesterov", False)
        )
        return optax.chain(decay, gc, momentum, scale)
    b1, b2 = cfg.get("betas", (0.9, 0.999))
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8)
    if cfg["gc_loc"]:
        return optax.chain(decay, gc, adam, scale)
    return optax.chain(decay, adam, gc, scale)


def test_reference_configs_present():
    assert len(GC_CONFIGS) == 6
    assert {REF.meta["configs"][c]["class"] for c in GC_CONFIGS} == {"SGD", "Adam"}


@pytest.mark.parametrize("layout", ["flax", "torch"])
@pytest.mark.parametrize("config", GC_CONFIGS)
def test_replays_reference(config, layout):
    cfg = REF.meta["configs"][config]
    got = replay(REF, _from_pieces(cfg, LAYOUT_AXES[layout]), layout)
    err = max_relative_error(got, REF.trajectory(config, layout))
    assert err <= 1e-5, f"{config}/{layout}: relative error {err:.2e}"


@pytest.mark.parametrize("layout", ["flax", "torch"])
def test_wrong_axes_do_not_match(layout):
    """The check can fail: the other layout's axes miss the trajectory."""
    cfg = REF.meta["configs"]["sgd_gc"]
    wrong = LAYOUT_AXES["torch" if layout == "flax" else "flax"]
    got = replay(REF, _from_pieces(cfg, wrong), layout)
    assert max_relative_error(got, REF.trajectory("sgd_gc", layout)) > 1e-3


def test_baseline_matches_without_gc():
    """sgd_plain is the authors' SGD without GC: optax alone reproduces it."""
    cfg = REF.meta["configs"]["sgd_plain"]
    tx = optax.chain(
        optax.add_decayed_weights(cfg["weight_decay"]),
        optax.trace(decay=cfg["momentum"]),
        optax.scale(-cfg["lr"]),
    )
    got = replay(REF, tx, "flax")
    assert max_relative_error(got, REF.trajectory("sgd_plain", "flax")) <= 1e-5
    assert max_relative_error(got, REF.trajectory("sgd_gc", "flax")) > 1e-3
