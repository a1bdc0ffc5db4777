"""Shared test helpers: tree comparison and the authors' reference trajectories."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

DATA = pathlib.Path(__file__).parent / "data" / "gc_reference_trajectories.npz"


def assert_trees_close(actual, expected, rtol=1e-6, atol=0.0):
    """Same structure, and every leaf close (NumPy semantics)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert np.shape(a) == np.shape(e)
        np.testing.assert_allclose(
            np.asarray(a, np.float64) if not np.iscomplexobj(a) else np.asarray(a),
            np.asarray(e, np.float64) if not np.iscomplexobj(e) else np.asarray(e),
            rtol=rtol,
            atol=atol,
        )


def assert_trees_equal(actual, expected):
    """Same structure, and every leaf bit-identical with the same dtype."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert np.asarray(a).dtype == np.asarray(e).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def fan_in_means(tree, output_axes=-1, min_ndim=2):
    """Per kernel leaf, the mean over every axis except ``output_axes``."""

    def mean(x):
        x = np.asarray(x, np.float64)
        if x.ndim < min_ndim:
            return None
        keep = {a % x.ndim for a in np.atleast_1d(output_axes)}
        return x.mean(axis=tuple(a for a in range(x.ndim) if a not in keep))

    return jax.tree.map(mean, tree)


# --- a small separable problem for optimizer tests ----------------------------


def separable_problem():
    """Params (conv, dense, bias) and a loss whose leaves do not interact."""
    keys = jax.random.split(jax.random.key(0), 8)
    params = {
        "conv": jax.random.normal(keys[0], (3, 3, 4, 8)),
        "dense": jax.random.normal(keys[1], (8, 5)),
        "bias": jax.random.normal(keys[2], (5,)),
    }
    target = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape),
        params,
        {"conv": keys[3], "dense": keys[4], "bias": keys[5]},
    )

    def loss(p):
        # Separable across leaves: the bias gradient never sees the kernels.
        return sum(
            jnp.sum(jnp.cosh(p[k] - target[k]) + 0.1 * (p[k] - target[k]) ** 4)
            for k in p
        )

    return params, loss


def run_problem(tx, steps=100):
    """``steps`` jitted steps of ``tx`` on :func:`separable_problem`."""
    params, loss = separable_problem()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


# --- the authors' trajectories (see ../shared/reference/README.md) ----------


class Reference:
    """The recorded problem: names, tensors and per-config trajectories."""

    def __init__(self):
        with np.load(DATA) as z:
            self.data = {k: z[k] for k in z.files}
        self.meta = json.loads(bytes(self.data["meta"]).decode())
        self.names = list(self.meta["shapes"])
        self.steps = self.meta["steps"]

    def get(self, kind, layout):
        """``kind`` in init/A/T/noise; ``layout`` 'torch' or 'flax'."""
        tree = {n: self.data[f"{kind}/{n}"] for n in self.names}
        return to_layout(tree, layout, stacked=kind == "noise")

    def trajectory(self, config, layout):
        tree = {n: self.data[f"traj/{config}/{n}"] for n in self.names}
        return to_layout(tree, layout, stacked=True)


def _to_flax(x, stacked):
    lead = 1 if stacked else 0
    nd = x.ndim - lead
    if nd == 4:  # (out, in, kh, kw) -> (kh, kw, in, out)
        perm = (2, 3, 1, 0)
    elif nd == 2:  # (out, in) -> (in, out)
        perm = (1, 0)
    else:
        return x
    return np.transpose(x, tuple(range(lead)) + tuple(p + lead for p in perm))


def to_layout(tree, layout, stacked=False):
    if layout == "torch":
        return tree
    assert layout == "flax"
    return {k: _to_flax(v, stacked) for k, v in tree.items()}


def replay(ref, tx, layout):
    """Runs ``tx`` on the reference problem; returns weights after each step."""
    params = jax.tree.map(jnp.asarray, ref.get("init", layout))
    a, t, noise = ref.get("A", layout), ref.get("T", layout), ref.get("noise", layout)

    @jax.jit
    def step(params, state, noise_s):
        grads = jax.tree.map(
            lambda w, a_, t_, n: a_ * (w - t_) + n, params, a, t, noise_s
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    out = []
    for s in range(ref.steps):
        params, state = step(params, state, {k: v[s] for k, v in noise.items()})
        out.append(params)
    return {k: np.stack([np.asarray(p[k]) for p in out]) for k in ref.names}


def max_relative_error(actual, expected):
    """Largest ``||x - ref|| / ||ref||`` over tensors and steps."""
    worst = 0.0
    for k in expected:
        for x, r in zip(actual[k], expected[k], strict=True):
            worst = max(worst, float(np.linalg.norm(x - r) / np.linalg.norm(r)))
    return worst
