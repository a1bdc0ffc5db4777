"""GC inside ``shard_map`` (``partition_specs``) on a 2-D mesh of 8 host devices.

Run like test_sharded.py: in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and OPTAX_GC_MULTIDEVICE=1
(see tests/test_multidevice.py).

Inside ``shard_map`` each device sees only its shard; with ``partition_specs``
GC must still give the global result, ``g - g.mean(fan_in)``, for every way of
sharding a kernel's fan-in and output axes.
"""

import itertools
import math
import re

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
MESH_SIZES = {"a": 2, "b": 4}
CHOICES = (None, "a", "b", AB)  # per dimension: unsharded, "a", "b", ("a", "b")


def _is_spec(x):
    return isinstance(x, P)


def shard_map(f, specs):
    """``jit(shard_map(f))`` of one argument, on current and old (0.4.35) jax."""
    if hasattr(jax, "shard_map"):
        mapped = jax.shard_map(f, mesh=MESH, in_specs=(specs,), out_specs=specs)
    else:  # jax < 0.6: the experimental API, check_rep rather than check_vma
        from jax.experimental.shard_map import shard_map as experimental_shard_map

        mapped = experimental_shard_map(
            f, mesh=MESH, in_specs=(specs,), out_specs=specs, check_rep=False
        )
    return jax.jit(mapped)


def place(tree, specs):
    """``device_put`` with a (prefix) tree of PartitionSpecs."""
    shardings = jax.tree.map(
        lambda s, sub: jax.tree.map(lambda _: NamedSharding(MESH, s), sub),
        specs,
        tree,
        is_leaf=_is_spec,
    )
    return jax.device_put(tree, shardings)


def gc_in_shard_map(tree, specs, **kwargs):
    """``centralize(partition_specs=specs, **kwargs)`` inside shard_map."""
    tx = optax_gc.centralize(partition_specs=specs, **kwargs)
    return shard_map(lambda g: tx.update(g, None)[0], specs)(place(tree, specs))


def global_gc(tree, **kwargs):
    """The reference: GC on the unsharded arrays (one device)."""
    tx = optax_gc.centralize(**kwargs)
    return jax.jit(lambda g: tx.update(g, None)[0])(tree)


def oracle(g, output_axes):
    """Φ(g) in numpy float64: subtract the mean over every non-output axis."""
    g = np.asarray(g, np.float64)
    kept = {a % g.ndim for a in output_axes}
    fan_in = tuple(a for a in range(g.ndim) if a not in kept)
    return g - g.mean(axis=fan_in, keepdims=True)


def _normal(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def spec_combinations(shape):
    """Every PartitionSpec of ``shape`` on MESH: each dim None/"a"/"b"/("a","b")
    where the mesh size divides it, never using a mesh axis twice."""
    per_dim = []
    for size in shape:
        ok = []
        for choice in CHOICES:
            names = () if choice is None else (choice if choice == AB else (choice,))
            if size % math.prod(MESH_SIZES[n] for n in names) == 0:
                ok.append(choice)
        per_dim.append(ok)
    out = []
    for combo in itertools.product(*per_dim):
        used = [n for c in combo if c is not None for n in (c if c == AB else (c,))]
        if len(used) == len(set(used)):
            out.append(P(*combo))
    return out


# name, key path, shape, output_axes (for the centralize call).
ATTN_RULE = optax_gc.path_rules({r"attn/query/kernel$": (1, 2)}, strict=True)
KERNELS = {
    "dense": (("dense", "kernel"), (64, 128), (-1,)),
    "conv": (("conv", "kernel"), (2, 3, 16, 32), (-1,)),
    "attn": (("attn", "query", "kernel"), (32, 4, 8), (1, 2)),
}


def _nest(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _kind(spec, ndim, output_axes):
    """Which mesh axes shard the fan-in and the output axes of a leaf."""
    kept = {a % ndim for a in output_axes}
    fan_in, output = set(), set()
    for dim, entry in enumerate(spec):
        names = () if entry is None else (entry if entry == AB else (entry,))
        (output if dim in kept else fan_in).update(names)
    if fan_in and output:
        return "both"
    if len(fan_in) > 1:
        return "multi_axis_fan_in"
    return "fan_in" if fan_in else "output" if output else "unsharded"


CASES = [
    pytest.param(name, spec, id=f"{name}-{spec}")
    for name, (_, shape, _) in KERNELS.items()
    for spec in spec_combinations(shape)
]


def test_spec_combinations_cover_every_kind():
    """The generated cases include fan-in-only, output-only, both, multi-axis."""
    assert len(spec_combinations((64, 128))) == 9
    assert len(spec_combinations((2, 3, 16, 32))) == 12
    assert P("b", "a") in spec_combinations((64, 128))
    assert P("b", None, None, None) not in spec_combinations((2, 3, 16, 32))
    kinds = {name: set() for name in KERNELS}
    for name, spec in (case.values for case in CASES):
        _, shape, axes = KERNELS[name]
        kinds[name].add(_kind(spec, len(shape), axes))
    every = {"unsharded", "fan_in", "output", "both", "multi_axis_fan_in"}
    assert kinds == {name: every for name in KERNELS}


@pytest.mark.parametrize("name, spec", CASES)
def test_every_spec_equals_global_gc(name, spec):
    path, shape, axes = KERNELS[name]
    g = _normal(shape, seed=len(shape))
    tree = _nest(path, g)
    output_axes = ATTN_RULE if name == "attn" else axes
    specs = _nest(path, spec)
    out = _get(gc_in_shard_map(tree, specs, output_axes=output_axes), path)
    expected = _get(global_gc(tree, output_axes=output_axes), path)
    assert out.shape == shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, oracle(g, axes), rtol=1e-5, atol=1e-6)
    assert out.sharding.is_equivalent_to(NamedSharding(MESH, spec), len(shape))


def test_callable_output_axes_inside_shard_map():
    tree = {"attn": _normal((32, 4, 8)), "dense": _normal((64, 128), seed=1)}
    specs = {"attn": P("b", "a", None), "dense": P("a", "b")}

    def rule(path, leaf):
        return (1, 2) if leaf.ndim == 3 else -1

    out = gc_in_shard_map(tree, specs, output_axes=optax_gc.per_leaf(rule))
    np.testing.assert_allclose(out["attn"], oracle(tree["attn"], (1, 2)), atol=1e-6)
    np.testing.assert_allclose(out["dense"], oracle(tree["dense"], (-1,)), atol=1e-6)


def test_a_params_fn_inside_shard_map_sees_the_global_shapes():
    tree = {"embed": _normal((64, 16)), "dense": _normal((32, 16), seed=1)}
    specs = {"embed": P("a", None), "dense": P("a", "b")}

    def axes(params):  # decides by global shape: (64, 16) is the embedding
        return jax.tree.map(lambda x: None if x.shape == (64, 16) else -1, params)

    out = gc_in_shard_map(tree, specs, output_axes=axes)
    np.testing.assert_array_equal(out["embed"], tree["embed"])
    np.testing.assert_allclose(out["dense"], oracle(tree["dense"], (-1,)), atol=1e-6)


def test_bias_and_global_fan_in_one_untouched():
    tree = {
        "bias": _normal((128,)),
        "row": _normal((1, 64), seed=1),  # global fan-in 1: GC would zero it
        "count": jnp.arange(8 * 4, dtype=jnp.int32).reshape(8, 4),
    }
    specs = {"bias": P("b"), "row": P(None, AB), "count": P(AB, None)}
    out = gc_in_shard_map(tree, specs)
    for k in tree:
        np.testing.assert_array_equal(out[k], tree[k])
        assert out[k].dtype == tree[k].dtype


@pytest.mark.parametrize(
    "shape, spec",
    [((8, 4), P(AB, None)), ((2, 4, 5), P("a", "b", None)), ((4, 8), P("b", "a"))],
    ids=str,
)
def test_local_fan_in_one_is_centred(shape, spec):
    """Each shard holds one fan-in row: the global fan-in decides, not the local."""
    g = _normal(shape, seed=3)
    out = gc_in_shard_map(g, spec)
    np.testing.assert_allclose(out, oracle(g, (-1,)), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out) - np.asarray(g)).max() > 0.1  # not skipped


def test_bf16_keeps_dtype_and_equals_global_gc():
    tree = {
        "dense": _normal((64, 128), dtype=jnp.bfloat16),
        "conv": _normal((2, 3, 16, 32), seed=1, dtype=jnp.bfloat16),
    }
    specs = {"dense": P(AB, None), "conv": P("a", None, "b", None)}
    out = gc_in_shard_map(tree, specs)
    expected = global_gc(tree)
    for k in tree:
        assert out[k].dtype == jnp.bfloat16
        got = np.asarray(out[k], np.float32)
        np.testing.assert_allclose(got, expected[k].astype(jnp.float32), 1e-2, 1e-2)
        np.testing.assert_allclose(got, oracle(tree[k], (-1,)), rtol=1e-2, atol=1e-2)


def _mixed_tree():
    return {
        "enc": {"dense": _normal((64, 128)), "conv": _normal((2, 3, 16, 32), 1)},
        "head": {"kernel": _normal((32, 16), 2), "bias": _normal((16,), 3)},
    }


@pytest.mark.parametrize(
    "specs",
    [
        {"enc": P("a"), "head": {"kernel": P("b", None), "bias": P()}},
        {"enc": P(None), "head": P("b")},
        P("a"),
    ],
    ids=["subtree", "two_subtrees", "one_spec"],
)
def test_prefix_spec_tree(specs):
    tree = _mixed_tree()
    out = gc_in_shard_map(tree, specs)
    expected = global_gc(tree)
    for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
        got = _get(out, [k.key for k in path])
        np.testing.assert_allclose(got, leaf, rtol=1e-6, atol=1e-6, err_msg=str(path))
    np.testing.assert_array_equal(out["head"]["bias"], tree["head"]["bias"])


def test_without_partition_specs_gives_per_shard_means():
    """The failure the option prevents: a sharded fan-in, no partition_specs."""
    g = _normal((64, 128))
    spec = P(AB, None)
    tx = optax_gc.centralize()
    wrong = shard_map(lambda x: tx.update(x, None)[0], spec)(place(g, spec))
    right = gc_in_shard_map(g, spec)
    expected = oracle(g, (-1,))
    assert np.abs(np.asarray(wrong) - expected).max() > 0.1
    # each shard of 8 rows got its own mean
    shards = np.asarray(wrong).reshape(8, 8, 128).mean(axis=1)
    np.testing.assert_allclose(shards, 0.0, atol=1e-6)
    np.testing.assert_allclose(right, expected, rtol=1e-5, atol=1e-6)


def test_partition_specs_outside_shard_map_raise():
    g = {"dense": _normal((64, 128))}
    tx = optax_gc.centralize(partition_specs={"dense": P("a", None)})
    with pytest.raises(ValueError, match=r'leaf "dense".*not bound'):
        jax.jit(lambda g: tx.update(g, None)[0])(g)


def test_mismatched_spec_tree_raises():
    g = {"dense": _normal((64, 128)), "conv": _normal((2, 3, 16, 32), 1)}
    specs = {"dense": P("a", None), "conv": P("a")}
    tx = optax_gc.centralize(partition_specs={"dense": P("a", None)})
    f = shard_map(lambda g: tx.update(g, None)[0], specs)
    with pytest.raises(ValueError, match="tree structure"):
        f(place(g, specs))


def _all_reduces(tree, specs, **kwargs):
    tx = optax_gc.centralize(partition_specs=specs, **kwargs)
    f = shard_map(lambda g: tx.update(g, None)[0], specs)
    hlo = f.lower(place(tree, specs)).compile().as_text()
    others = ("all-gather", "all-to-all", "reduce-scatter", "collective-permute")
    assert not [op for op in others if op in hlo]
    return len(re.findall(r"\ball-reduce(?:-start)?\(", hlo))


@pytest.mark.parametrize(
    "shape, spec, output_axes",
    [
        ((64, 128), P(None, AB), (-1,)),
        ((64, 128), P(None, "a"), (-1,)),
        ((2, 3, 16, 32), P(None, None, None, AB), (-1,)),
        ((32, 4, 8), P(None, "a", "b"), (1, 2)),
    ],
    ids=str,
)
def test_output_only_sharding_has_no_collective(shape, spec, output_axes):
    assert _all_reduces(_normal(shape), spec, output_axes=output_axes) == 0


@pytest.mark.parametrize(
    "shape, spec, output_axes",
    [
        ((64, 128), P(AB, None), (-1,)),
        ((64, 128), P("a", "b"), (-1,)),
        ((2, 3, 16, 32), P("a", None, "b", None), (-1,)),
        ((32, 4, 8), P("b", "a", None), (1, 2)),
    ],
    ids=str,
)
def test_fan_in_sharding_has_one_all_reduce(shape, spec, output_axes):
    assert _all_reduces(_normal(shape), spec, output_axes=output_axes) == 1


@optax_gc.per_leaf
def _attn_or_last(path, leaf):
    return (1, 2) if leaf.ndim == 3 else -1


OPTIMIZERS = {
    "with_gc_adam": lambda specs: optax_gc.with_gc(
        optax.adam(1e-2),
        location="update",
        output_axes=_attn_or_last,
        partition_specs=specs,
    ),
    "gc_adamw": lambda specs: optax_gc.gc_adamw(
        1e-2,
        weight_decay=0.1,
        location="update",
        output_axes=_attn_or_last,
        partition_specs=specs,
    ),
    "gc_sgd": lambda specs: optax_gc.gc_sgd(
        1e-2, 0.9, output_axes=_attn_or_last, partition_specs=specs
    ),
}
STEP_SPECS = {
    "fan_in": {
        "dense": P(AB, None),
        "conv": P(None, None, AB, None),
        "attn": P(AB, None, None),
        "bias": P("b"),
    },
    "mixed": {
        "dense": P("b", "a"),
        "conv": P("a", None, "b", None),
        "attn": P("b", "a", None),
        "bias": P(),
    },
}
STEPS = 3


def _train(tx, params):
    """``STEPS`` steps of ``tx`` on elementwise gradients, from ``tx.init``."""
    state = tx.init(params)
    for t in range(STEPS):
        grads = jax.tree.map(
            lambda p, t=t: jnp.cos(3.0 * p) + 0.5 * p + 0.1 * t, params
        )
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("spec_name", list(STEP_SPECS))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_optimizer_steps_in_shard_map_equal_jit(opt, spec_name):
    specs = STEP_SPECS[spec_name]
    params = {
        "dense": _normal((64, 128)),
        "conv": _normal((2, 3, 16, 32), 1),
        "attn": _normal((32, 4, 8), 2),
        "bias": _normal((128,), 3),
    }
    expected = jax.jit(lambda p: _train(OPTIMIZERS[opt](None), p))(params)
    tx = OPTIMIZERS[opt](specs)
    out = shard_map(lambda p: _train(tx, p), specs)(place(params, specs))
    for k in params:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-5, err_msg=k)
        assert not np.allclose(out[k], params[k])
    for k in ("dense", "conv", "attn"):  # every step keeps the per-unit mean
        fan_in = (0,) if k == "attn" else tuple(range(params[k].ndim - 1))
        np.testing.assert_allclose(
            np.asarray(out[k]).mean(axis=fan_in),
            np.asarray(params[k]).mean(axis=fan_in),
            atol=1e-6,
            err_msg=k,
        )
