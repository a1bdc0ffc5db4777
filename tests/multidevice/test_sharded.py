"""GC on kernels sharded over a 2-D mesh of 8 host CPU devices.

Run by tests/test_multidevice.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gc

assert jax.device_count() == 8, jax.devices()
MESH = jax.make_mesh((2, 4), ("a", "b"))
AB = ("a", "b")

SPECS = {
    "fan_in": {"conv": P(None, None, AB, None), "dense": P(AB, None)},
    "output": {"conv": P(None, None, None, AB), "dense": P(None, AB)},
    "both": {"conv": P(None, None, "a", "b"), "dense": P("a", "b")},
    "both_transposed": {"conv": P("a", None, None, "b"), "dense": P("b", "a")},
}


def _grads():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return {
        "conv": jax.random.normal(k1, (2, 3, 16, 32)),
        "dense": jax.random.normal(k2, (64, 128)),
        "bias": jax.random.normal(k3, (128,)),
    }


def _place(tree, specs):
    shardings = {
        "conv": NamedSharding(MESH, specs["conv"]),
        "dense": NamedSharding(MESH, specs["dense"]),
        "bias": NamedSharding(MESH, P()),
    }
    return jax.device_put(tree, shardings)


def _gc(grads):
    return optax_gc.centralize().update(grads, None)[0]


@pytest.mark.parametrize("case", list(SPECS))
def test_sharded_equals_unsharded_and_keeps_sharding(case):
    grads = _grads()
    expected = jax.jit(_gc)(grads)  # one device
    sharded = _place(grads, SPECS[case])
    out = jax.jit(_gc)(sharded)
    for k in grads:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-6, atol=1e-6)
        assert out[k].sharding.is_equivalent_to(sharded[k].sharding, grads[k].ndim), (
            k,
            out[k].sharding,
            sharded[k].sharding,
        )
        assert out[k].dtype == grads[k].dtype


@pytest.mark.parametrize("case", list(SPECS))
def test_sharded_optimizer_step(case):
    params = _grads()
    tx = optax_gc.gc_adamw(1e-2, location="update")

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    grads = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
    expected, _ = jax.jit(step)(params, grads, tx.init(params))
    sp, sg = _place(params, SPECS[case]), _place(grads, SPECS[case])
    out, state = jax.jit(step)(sp, sg, tx.init(sp))
    for k in params:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-6, atol=1e-6)
        assert out[k].sharding.is_equivalent_to(sp[k].sharding, params[k].ndim)


def _collectives(hlo: str) -> list[str]:
    ops = (
        "all-gather",
        "all-reduce",
        "all-to-all",
        "reduce-scatter",
        "collective-permute",
    )
    return [op for op in ops if op in hlo]


def test_output_sharded_gc_needs_no_collectives():
    sharded = _place(_grads(), SPECS["output"])
    hlo = jax.jit(_gc).lower(sharded).compile().as_text()
    assert _collectives(hlo) == []


def test_fan_in_sharded_gc_reduces_across_devices():
    """The check above can fail: a sharded fan-in does need an all-reduce."""
    sharded = _place(_grads(), SPECS["fan_in"])
    hlo = jax.jit(_gc).lower(sharded).compile().as_text()
    assert "all-reduce" in _collectives(hlo)


def test_bf16_sharded_keeps_dtype():
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads())
    out = jax.jit(_gc)(_place(grads, SPECS["both"]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_sharding_recipe_on_eight_devices(capsys):
    from tests.test_docs import ROOT, run_page

    namespace = run_page(ROOT / "docs" / "recipes" / "sharding.md")
    kernel = namespace["params"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    assert kernel.sharding.spec == P(None, "model")
    assert "model" in capsys.readouterr().out
