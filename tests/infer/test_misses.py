"""Regression tests for the classes of silent misses adversarial passes found.

Each expectation is derived by hand from the computation: a weight's fan-in is
the set of its axes that, for one output coordinate, vary across the support
of the Jacobian; when no axis of a leaf indexes output units, or only a part
of a unit's fan-in feeds it, the leaf is left alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gc

X = jax.ShapeDtypeStruct((5, 3), jnp.float32)
IDS = jax.ShapeDtypeStruct((5,), jnp.int32)
CENTRES_NOTHING = pytest.mark.filterwarnings("ignore::optax_gc.InferenceWarning")


def infer(fn, params, *inputs):
    return optax_gc.infer_output_axes(fn, params, *inputs).decisions


def axes(fn, params, *inputs):
    return {k: a for k, (a, _) in infer(fn, params, *inputs).items()}


def spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


# -- a weight that meets data in two contractions ---------------------------------


@pytest.mark.parametrize(
    "einsum",
    [
        lambda x, w, z: jnp.einsum("bi,oij,bj->bo", x, w, z),
        lambda x, w, z: jnp.einsum("bi,oij,bj->bo", x, w, z, optimize=False),
        lambda x, w, z: jnp.einsum("boj,bj->bo", jnp.einsum("bi,oij->boj", x, w), z),
        lambda x, w, z: jnp.einsum("boi,bi->bo", jnp.einsum("oij,bj->boi", w, z), x),
    ],
)
def test_bilinear_layer_fan_in_is_both_inputs(einsum):
    # y[b, o] = sum_ij x[b, i] W[o, i, j] z[b, j]: unit o's fan-in is (i, j).
    decisions = infer(
        lambda p, x, z: einsum(x, p["w"], z), {"w": jnp.zeros((4, 3, 6))}, X, spec(5, 6)
    )
    assert decisions["w"][0] == (0,), decisions["w"]
    assert decisions["w"][1].startswith("dot_general")


@CENTRES_NOTHING
@pytest.mark.parametrize(
    "form",
    [
        lambda x, m: jnp.einsum("bi,ij,bj->b", x, m, x),
        lambda x, m: jnp.einsum("bj,bj->b", x @ m, x),
        lambda x, m: (x @ m) @ x.T,  # a bilinear score q M k^T
    ],
)
def test_quadratic_forms_have_no_units(form):
    # Every output coordinate depends on every entry of M: no axis of M
    # indexes units, so GC leaves it alone.
    decision = infer(lambda p, x: form(x, p["m"]), {"m": jnp.zeros((3, 3))}, X)["m"]
    assert decision[0] is None
    assert "no output axis" in decision[1]


@CENTRES_NOTHING
def test_a_hypernetwork_weight_has_no_units():
    # W(z) = (z @ H).reshape(3, 4); y = x @ W(z). Unit o's fan-in is every z
    # and every i of H's merged (i, o) axis: that axis is both fan-in and
    # kept, so no axis of H indexes units alone.
    def fn(p, x, z):
        w = (z @ p["h"]).reshape(-1, 3, 4)
        return jnp.einsum("bi,bio->bo", x, w)

    decision = infer(fn, {"h": jnp.zeros((6, 12))}, X, spec(5, 6))["h"]
    assert decision[0] is None
    assert "both contracted and kept" in decision[1]


def test_a_hypernetwork_with_separate_axes_keeps_the_output_axis():
    def fn(p, x, z):
        w = jnp.einsum("bz,zio->bio", z, p["h"])
        return jnp.einsum("bi,bio->bo", x, w)

    assert axes(fn, {"h": jnp.zeros((6, 3, 4))}, X, spec(5, 6)) == {"h": (2,)}


def test_soft_merged_experts_average_over_experts_and_inputs():
    # y[b, o] = sum_e gate[b, e] sum_i x[b, i] W[e, i, o]: unit o's fan-in
    # is (e, i).
    def fn(p, x):
        gate = jax.nn.softmax(x @ p["router"])
        w = jnp.einsum("be,eio->bio", gate, p["experts"])
        return jnp.einsum("bi,bio->bo", x, w)

    params = {"router": jnp.zeros((3, 2)), "experts": jnp.zeros((2, 3, 4))}
    assert axes(fn, params, X) == {"router": (1,), "experts": (2,)}


def test_attention_keeps_each_projection_s_units():
    # q @ k.T multiplies two layers' outputs: each projection keeps (H, D),
    # the DenseGeneral convention, not a bilinear form.
    def fn(p, x):
        q = jnp.einsum("bi,ihd->bhd", x, p["q"])
        k = jnp.einsum("bi,ihd->bhd", x, p["k"])
        v = jnp.einsum("bi,ihd->bhd", x, p["v"])
        a = jax.nn.softmax(jnp.einsum("qhd,khd->hqk", q, k))
        return jnp.einsum("hqk,khd,hdo->qo", a, v, p["o"])

    qkv = jnp.zeros((3, 2, 4))
    params = {"q": qkv, "k": qkv, "v": qkv, "o": jnp.zeros((2, 4, 3))}
    assert axes(fn, params, X) == {"q": (1, 2), "k": (1, 2), "v": (1, 2), "o": (2,)}


@pytest.mark.parametrize(
    "loss",
    [
        lambda logits, y: optax.softmax_cross_entropy(logits, y).mean(),
        lambda logits, y: -(y * jax.nn.log_softmax(logits)).sum(-1).mean(),
        lambda logits, y: ((logits - y) ** 2).mean(),
    ],
)
def test_a_loss_of_the_logits_is_not_a_second_contraction(loss):
    def fn(p, x, y):
        return loss(jnp.tanh(x @ p["w"]) @ p["head"] + p["b"][None], y)

    params = {"w": jnp.zeros((3, 8)), "head": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    got = axes(fn, params, X, spec(5, 4))
    assert got == {"w": (1,), "head": (1,), "b": None}


# -- partial use written as a gather, and whole use written as parts -----------------


@CENTRES_NOTHING
@pytest.mark.parametrize(
    "part",
    [
        lambda w: w[jnp.array([0, 1, 2])],
        lambda w: w[np.array([0, 1, 2])],
        lambda w: jnp.take(w, np.array([3, 0, 1]), axis=0),
        lambda w: w[np.array([0, 0, 1])],  # repeats, row 2 and 3 unused
        lambda w: jax.lax.pad(w, 0.0, ((0, -1, 0), (0, 0, 0))),
        lambda w: w[:3],
        lambda w: w[::2][:, :],
    ],
)
def test_a_fan_in_only_partly_used_leaves_the_leaf_alone(part):
    def fn(p, x):
        w = part(p["w"])  # (4, 6) -> (k, 6), k < 4 rows of the fan-in
        return x[:, : w.shape[0]] @ w

    x = spec(5, 4)
    decision = infer(fn, {"w": jnp.zeros((4, 6))}, x)["w"]
    assert decision == (None, "axis 0 only partly used by dot_general")


@pytest.mark.parametrize(
    "whole",
    [
        lambda w: jnp.roll(w, 1, 0),
        lambda w: jnp.roll(w, -3, 0),
        lambda w: jnp.concatenate([w[:2], w[2:]]),
        lambda w: jnp.concatenate([w[3:], w[1:3], w[:1]]),
        lambda w: w[np.array([3, 2, 1, 0])],
        lambda w: w[::-1],
    ],
)
def test_every_row_used_is_a_whole_fan_in(whole):
    def fn(p, x):
        return x @ whole(p["w"])

    decisions = infer(fn, {"w": jnp.zeros((4, 6))}, spec(5, 4))
    assert decisions["w"][0] == (1,), decisions["w"]


# -- a bias added to a value built from parameters only -------------------------------


@CENTRES_NOTHING
def test_a_bias_added_to_a_parameter_only_value_is_never_centred():
    def fn(p, x):
        q = jnp.einsum("d,dhk->hk", p["probe"], p["w"]) + p["b"]
        return jnp.einsum("hk,nhk->nh", q, x)

    params = {
        "probe": jnp.zeros(3),
        "w": jnp.zeros((3, 2, 4)),
        "b": jnp.zeros((2, 4)),
    }
    decisions = infer(fn, params, spec(5, 2, 4))
    # out[n, h] = sum_k (sum_d probe[d] w[d, h, k] + b[h, k]) x[n, h, k]:
    # w's unit h has fan-in (d, k); probe feeds every unit; b is the bias of
    # the query built from probe and w.
    assert decisions["w"][0] == (1,)
    assert decisions["probe"][0] is None
    assert decisions["b"] == (
        None,
        'added to a value built from other parameters ("probe", "w") before '
        "its use: a bias of that computation",
    )


def test_low_rank_factors_and_a_summed_stack():
    # y = x @ (U @ V): U feeds every unit through the rank axis (no units);
    # V's unit o has fan-in r. y = x @ W.sum(0): W's unit o has fan-in (k, i).
    def fn(p, x):
        return x @ (p["u"] @ p["v"]) + x @ p["w"].sum(0)

    params = {"u": jnp.zeros((3, 2)), "v": jnp.zeros((2, 4)), "w": jnp.zeros((5, 3, 4))}
    decisions = infer(fn, params, X)
    assert {k: a for k, (a, _) in decisions.items()} == {
        "u": None,
        "v": (1,),
        "w": (2,),
    }


def test_a_constant_initial_state_does_not_disagree_with_the_recurrence():
    # An unrolled RNN from h0 = 0: h0 @ wh meets data entry by entry, but
    # every later step contracts wh's axis 0 with data.
    def fn(p, xs):
        h = jnp.zeros((5, 4))
        for t in range(xs.shape[0]):
            h = jnp.tanh(xs[t] @ p["wx"] + h @ p["wh"])
        return h

    params = {"wx": jnp.zeros((3, 4)), "wh": jnp.zeros((4, 4))}
    assert axes(fn, params, spec(6, 5, 3)) == {"wx": (1,), "wh": (1,)}


@pytest.mark.parametrize(
    "quantize",
    [
        lambda w: (
            w
            + jax.lax.stop_gradient(
                jnp.round(w / jnp.abs(w).max()) * jnp.abs(w).max() - w
            )
        ),
        lambda w: w / jax.lax.stop_gradient(jnp.linalg.norm(w)),
    ],
)
def test_statistics_under_stop_gradient_mix_nothing(quantize):
    # A straight-through quantizer, a norm under stop_gradient: the gradient
    # reaches w per unit, as for x @ w.
    decisions = infer(lambda p, x: x @ quantize(p["w"]), {"w": jnp.zeros((3, 4))}, X)
    assert decisions["w"][0] == (1,), decisions["w"]


def test_a_readout_batched_over_the_units_keeps_them():
    # Decoding against a cache of keys passed in as data: per head, q's head
    # dimension is summed against the cache, as in self-attention, where q
    # keeps (H, D).
    def fn(p, x, cache):
        q = jnp.einsum("btd,dhk->bthk", x, p["wq"])
        return jnp.einsum("bthk,bshk->bhts", q, cache)

    got = axes(fn, {"wq": jnp.zeros((3, 2, 4))}, spec(2, 5, 3), spec(2, 7, 2, 4))
    assert got == {"wq": (1, 2)}


def test_a_one_hot_readout_is_a_selection():
    # The Q-value of the action taken, for an ensemble of heads: the one-hot
    # picks one entry; each head's action units stay units.
    def fn(p, x, actions):
        q = jnp.einsum("bi,eia->eba", x, p["w"])
        return jnp.einsum("eba,ba->eb", q, jax.nn.one_hot(actions, 4))

    got = axes(fn, {"w": jnp.zeros((2, 3, 4))}, X, IDS)
    assert got == {"w": (0, 2)}


def test_weights_added_together_decide_together():
    def fn(p, x):  # a re-parametrized kernel w0 + delta: both are the kernel
        return x @ (p["w0"] + p["delta"])

    params = {"w0": jnp.zeros((3, 4)), "delta": jnp.zeros((3, 4))}
    assert axes(fn, params, X) == {"w0": (1,), "delta": (1,)}


# -- a size-1 gain broadcast across the units -----------------------------------------


@CENTRES_NOTHING
def test_a_gain_shared_by_every_unit_is_not_centred():
    # PyTorch-layout conv1d kernel v (out, in, k), weight-normalised per tap
    # with one gain per tap shared by every unit: g is (1, 1, k).
    def fn(p, x):
        v = p["v"]
        kernel = v / jnp.linalg.norm(v, axis=(0, 1), keepdims=True) * p["g"]
        return jax.lax.conv_general_dilated(
            x, kernel.T, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
        )

    params = {"v": jnp.zeros((4, 3, 5)), "g": jnp.ones((1, 1, 5))}
    decisions = infer(fn, params, spec(2, 7, 3))
    assert decisions["g"][0] is None
    assert "shared by every output unit" in decisions["g"][1]


def test_a_per_unit_gain_is_centred_over_nothing_but_keeps_its_units():
    def fn(p, x):  # one gain per output unit: its units are the kernel's
        return x @ (p["v"] * p["g"])

    params = {"v": jnp.zeros((3, 4)), "g": jnp.ones((1, 4))}
    assert axes(fn, params, X) == {"v": (1,), "g": (1,)}


def test_a_single_output_unit_is_still_a_unit():
    assert axes(lambda p, x: x @ p["w"], {"w": jnp.zeros((3, 1))}, X) == {"w": (1,)}


# -- one-hot lookups -----------------------------------------------------------------


@CENTRES_NOTHING
@pytest.mark.parametrize(
    "lookup",
    [
        lambda ids, t: jax.nn.one_hot(ids, 7) @ t,
        lambda ids, t: jnp.eye(7)[ids] @ t,
        lambda ids, t: jnp.where(ids[:, None] == jnp.arange(7)[None, :], 1.0, 0.0) @ t,
        lambda ids, t: (jax.nn.one_hot(ids, 7) * 1.0) @ t,
        lambda ids, t: (2.0 * jax.nn.one_hot(ids, 7)) @ t,
        lambda ids, t: jnp.take(jnp.eye(7), ids, axis=0) @ t,
        lambda ids, t: (ids[:, None] == jnp.arange(7)[None, :]).astype(jnp.float32) @ t,
        lambda ids, t: (jax.nn.one_hot(ids, 7) * (ids > 0)[:, None]) @ t,  # masked
    ],
)
def test_one_hot_lookups_in_any_spelling(lookup):
    decision = infer(lambda p, ids: lookup(ids, p["t"]), {"t": jnp.zeros((7, 4))}, IDS)
    assert decision["t"] == (None, "lookup")


def test_a_dense_constant_matrix_gathered_by_ids_is_not_a_lookup():
    table = np.arange(21.0).reshape(7, 3)  # every row has several nonzeros

    def fn(p, ids):
        return jnp.asarray(table)[ids] @ p["w"]

    assert axes(fn, {"w": jnp.zeros((3, 4))}, IDS) == {"w": (1,)}


# -- an L2 term in the loss; a whole weight to a number ------------------------------


@pytest.mark.parametrize(
    "penalty",
    [
        lambda p: sum(jnp.sum(w**2) for w in jax.tree.leaves(p)),
        lambda p: optax.tree.norm(p) ** 2 if hasattr(optax, "tree") else 0.0,
        lambda p: jnp.vdot(p["w"], p["w"]) + jnp.vdot(p["head"], p["head"]),
    ],
)
def test_an_l2_term_in_the_loss_does_not_switch_gc_off(penalty):
    def loss(p, x, y):
        pred = jnp.tanh(x @ p["w"]) @ p["head"]
        return jnp.mean((pred - y) ** 2) + 1e-4 * penalty(p)

    params = {"w": jnp.zeros((3, 8)), "head": jnp.zeros((8, 2))}
    assert axes(loss, params, X, spec(5, 2)) == {"w": (1,), "head": (1,)}


@CENTRES_NOTHING
def test_a_leaf_only_reduced_to_a_number_has_no_units():
    def fn(p, x):
        return x * jnp.sum(p["w"] ** 2)

    decision = infer(fn, {"w": jnp.zeros((3, 4))}, X)["w"]
    assert decision[0] is None
    assert "only reduced to a number" in decision[1]


# -- vmapped ensembles of convolutions -------------------------------------------------


def _conv(kernel, x, groups=1, transpose=False):
    if transpose:
        return jax.lax.conv_transpose(
            x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


@pytest.mark.parametrize("in_axes", [(0, None), (0, 0)])
@pytest.mark.parametrize(
    "kind, kernel_shape",
    [("plain", (3, 3, 4, 6)), ("grouped", (3, 3, 2, 6)), ("transposed", (3, 3, 4, 6))],
)
def test_vmapped_ensembles_of_convolutions(in_axes, kind, kernel_shape):
    # Member e's kernel (kh, kw, in, out) is an ordinary conv kernel: fan-in
    # (kh, kw, in); the ensemble axis and out are kept.
    groups = 2 if kind == "grouped" else 1

    def fn(p, x):
        def member(k, x):
            return _conv(k, x, groups, transpose=kind == "transposed")

        return jax.vmap(member, in_axes)(p["k"], x)

    x_shape = (8, 6, 6, 4) if in_axes[1] is None else (5, 8, 6, 6, 4)
    decision = infer(fn, {"k": jnp.zeros((5, *kernel_shape))}, spec(*x_shape))["k"]
    assert decision[0] == (0, 4), decision


# -- cost ----------------------------------------------------------------------------


def _nested_scans(depth):
    def fn(p, x):
        def level(d, carry):
            if d == 0:
                a, b, c = carry
                return (b, c, jnp.tanh(a @ p["w"]))

            def body(carry, _):
                return level(d - 1, carry), None

            carry, _ = jax.lax.scan(body, carry, None, length=2)
            return carry

        a, b, c = level(depth, (x, jnp.zeros_like(x), jnp.zeros_like(x)))
        return a + b + c

    return fn


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_nested_loops_converge_without_a_product_of_iterations(depth):
    import optax_gc._infer._interpreter as interpreter

    runs = {"n": 0}
    original = interpreter.Interpreter.run

    def counting(self, jaxpr, inputs):
        runs["n"] += 1
        return original(self, jaxpr, inputs)

    interpreter.Interpreter.run = counting
    try:
        got = axes(_nested_scans(depth), {"w": jnp.zeros((3, 3))}, X)
    finally:
        interpreter.Interpreter.run = original
    assert got == {"w": (1,)}
    # A rotating 3-carry takes about 4 iterations per loop; without warm
    # starts the innermost body runs about 4**depth times.
    assert runs["n"] <= 12 * depth + 4, runs


def test_merged_lora_and_weight_norm_on_the_output():
    # x @ (W + A @ B): A feeds every unit through the rank axis (no units), B
    # keeps its output units with fan-in r, and W is the bias of A @ B.
    # (x @ v) * g / |v|: v's norm scales each unit's output: v keeps (1,).
    def fn(p, x):
        lora = x @ (p["w"] + p["a"] @ p["b"])
        v = p["v"]
        return lora + (x @ v) * p["g"] / jnp.linalg.norm(v, axis=0, keepdims=True)

    params = {
        "w": jnp.zeros((3, 4)),
        "a": jnp.zeros((3, 2)),
        "b": jnp.zeros((2, 4)),
        "v": jnp.zeros((3, 4)),
        "g": jnp.ones((1, 4)),
    }
    assert axes(fn, params, X) == {
        "w": None,
        "a": None,
        "b": (1,),
        "v": (1,),
        "g": None,
    }


# -- found by a cold review --------------------------------------------------------


def test_a_layer_output_that_lost_its_footprint_is_not_plain_data():
    # q scaled by a weight no longer carries wq's footprint, but it is still
    # a layer's output: q @ k is attention, and wk keeps (H, D).
    def fn(p, x):
        q = jnp.einsum("btd,dhk->bthk", x, p["wq"]) * jax.nn.softplus(p["s"])
        k = jnp.einsum("btd,dhk->bthk", x, p["wk"])
        return jnp.einsum("bqhk,bshk->bhqs", q, k)

    params = {
        "wq": jnp.zeros((3, 2, 4)),
        "wk": jnp.zeros((3, 2, 4)),
        "s": jnp.zeros((1, 1, 1, 4)),
    }
    got = axes(fn, params, spec(2, 5, 3))
    assert got["wq"] == got["wk"] == (1, 2)


def test_constants_are_computed_under_an_enclosing_jit():
    params = {"t": jnp.zeros((10, 4))}

    @jax.jit
    def inside(params, ids):
        rule = optax_gc.infer_output_axes(
            lambda p, i: jnp.eye(10)[i] @ p["t"], params, ids
        )
        assert rule.decisions["t"] == (None, "lookup")
        return ids

    with pytest.warns(optax_gc.InferenceWarning):
        inside(params, jnp.zeros(5, jnp.int32))


@CENTRES_NOTHING
def test_a_large_identity_table_is_still_a_one_hot():
    decision = infer(
        lambda p, ids: jnp.eye(300)[ids] @ p["t"], {"t": jnp.zeros((300, 4))}, IDS
    )
    assert decision["t"] == (None, "lookup")


@CENTRES_NOTHING
def test_parts_put_back_along_another_axis_are_not_whole():
    # Unit 0 reads w[0:2, 0] and unit 3 reads w[2:4, 0]: column 0 is split.
    def fn(p, x):
        w = p["w"]
        return x[:, :2] @ jnp.concatenate([w[:2], w[2:]], axis=1)

    decision = infer(fn, {"w": jnp.zeros((4, 3))}, spec(5, 4))["w"]
    assert decision[0] is None and "partly used" in decision[1]


@CENTRES_NOTHING
def test_one_entry_of_a_weight_is_not_an_l2_term():
    def fn(p, x):
        return x @ p["w"] + x * p["w"][0, 0]

    decision = infer(fn, {"w": jnp.zeros((3, 3))}, X)["w"]
    assert decision[0] is None and decision[1].startswith("uses disagree")


@CENTRES_NOTHING
def test_a_gather_of_shorter_slices_is_partial():
    def fn(p, x):
        w = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(p["w"], s, 2))(
            jnp.array([0, 0])
        )
        return jnp.einsum("bi,kio->bko", x[:, :2], w)

    decision = infer(fn, {"w": jnp.zeros((4, 3))}, X)["w"]
    assert decision[0] is None and "partly used" in decision[1]


@CENTRES_NOTHING
def test_constants_carried_by_a_loop_decide_nothing():
    # idx is arange(4) going in, zeros after one iteration: rows 1..3 unused.
    def fn(p, x):
        def body(c):
            return c[0] + 1, c[1] * 0

        _, idx = jax.lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.arange(4)))
        return x[:, :4] @ p["w"][idx]

    decision = infer(fn, {"w": jnp.zeros((4, 3))}, spec(5, 4))["w"]
    assert decision[0] is None and "partly used" in decision[1]


@CENTRES_NOTHING
def test_a_constant_chosen_by_data_is_data():
    def fn(p, x):
        idx = jax.lax.cond(
            x[0, 0] > 0, lambda: jnp.arange(4), lambda: jnp.zeros(4, jnp.int32)
        )
        return x[:, :4] @ p["w"][idx]

    assert infer(fn, {"w": jnp.zeros((4, 3))}, spec(5, 4))["w"] == (None, "lookup")


@CENTRES_NOTHING
def test_a_max_over_an_axis_reads_one_entry_per_unit():
    decision = infer(lambda p, x: x @ p["w"].max(0), {"w": jnp.zeros((5, 3, 4))}, X)[
        "w"
    ]
    assert decision[0] is None and "partly used" in decision[1]


def test_a_one_hot_times_data_is_not_a_one_hot():
    # Hard routing: the one-hot mask times data is the experts' input.
    def fn(p, x):
        mask = jax.nn.one_hot(jnp.argmax(x @ p["r"], -1), 2)
        routed = mask[:, :, None] * x[:, None, :]
        return jnp.einsum("bed,edo->beo", routed, p["e"]).sum(1)

    params = {"r": jnp.zeros((3, 2)), "e": jnp.zeros((2, 3, 4))}
    assert axes(fn, params, X)["e"] == (0, 2)


def test_a_loop_that_never_settles_leaves_its_leaves_alone():
    # A shift register deeper than the analysis iterates: each step moves
    # x @ w one slot down the carry.
    depth = 300

    def fn(p, x):
        def body(c, _):
            return (jnp.tanh(x @ p["w"]),) + c[:-1], None

        init = tuple(jnp.zeros((5, 3)) for _ in range(depth))
        c, _ = jax.lax.scan(body, init, None, length=2)
        return c[-1] + x @ p["v"]

    params = {"w": jnp.zeros((3, 3)), "v": jnp.zeros((3, 3))}
    decisions = infer(fn, params, X)
    assert decisions["w"][0] is None
    assert "did not settle" in decisions["w"][1]
    assert decisions["v"][0] == (1,)
