"""benchmarks.lm end to end on tiny settings, and the stdlib corpus it reads."""

import contextlib
import hashlib
import io
import json
import math

import jax
import numpy as np
import pytest

import optax_gc
from benchmarks import datasets, lm
from benchmarks.models import TransformerLM

TINY = [
    "--layers",
    "1",
    "--d-model",
    "16",
    "--heads",
    "2",
    "--ctx",
    "16",
    "--batch-size",
    "4",
    "--steps",
    "6",
    "--eval-every",
    "3",
    "--eval-windows",
    "8",
]
KEYS = {"config", "versions", "data", "explain", "explain_rows", "summary", "runs"}
KEYS |= {"heldout_bits_diff_per_eval", "seconds"}


def _main(argv):
    """Runs the script, returning its results and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = lm.main(argv)
    return results, printed.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    results, printed = _main(TINY + ["--seeds", "2", "--out", str(out)])
    return out, results, printed


def _check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


# --- the script ---------------------------------------------------------------------


def test_tiny_run_of_every_arm_writes_results_and_figure(tiny_run):
    out, returned, printed = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert KEYS <= set(results)
    assert results["summary"] == returned["summary"]
    assert results["versions"]["jax"] and results["versions"]["optax_gc"]
    assert results["config"]["hyperparameters"]["weight_decay"] == lm.WEIGHT_DECAY
    data = results["data"]
    assert data["python"] and data["root"] == datasets.stdlib_dir()
    assert len(data["sha256"]) == 64 and data["held_out_files"] > 0
    assert data["eval"]["scored_bytes"] == 8 * 16
    runs = results["runs"]
    assert len(runs) == 2 * 3
    assert {(r["arm"], r["seed"]) for r in runs} == {
        (arm, seed) for arm in lm.ARMS for seed in (0, 1)
    }
    for run in runs:
        assert [h["step"] for h in run["history"]] == [3, 6]
        for h in run["history"]:
            for key in ("train_loss", "heldout_nats", "heldout_bits"):
                assert math.isfinite(h[key]) and 0 < h[key] < 10
            assert h["heldout_bits"] == pytest.approx(h["heldout_nats"] / math.log(2))
    # The summary pairs each GC arm with its own seed's baseline.
    final = {(r["arm"], r["seed"]): r["history"][-1] for r in runs}
    assert set(results["summary"]) == set(lm.GC_ARMS)
    for arm, row in results["summary"].items():
        assert set(row) == set(lm.METRICS)
        for metric, stats in row.items():
            diffs = [
                final[(arm, s)][metric] - final["adamw", s][metric] for s in (0, 1)
            ]
            assert stats["diff_mean"] == pytest.approx(np.mean(diffs))
            assert stats["diff_se"] == pytest.approx(np.std(diffs, ddof=1) / 2**0.5)
            assert all(math.isfinite(v) for v in stats.values())
        assert f"| {arm} | " in printed
        diffs = [
            final[(arm, s)]["heldout_bits"] - final["adamw", s]["heldout_bits"]
            for s in (0, 1)
        ]
        per_eval = results["heldout_bits_diff_per_eval"][arm]
        assert len(per_eval) == 2 and per_eval[-1] == pytest.approx(
            np.mean(diffs), abs=1e-4
        )
    assert "blocks/attn/query/kernel" in results["explain"]
    assert results["explain"] in printed
    assert len(results["explain_rows"]) == len(jax.tree.leaves(lm_params()))
    _check_png(out / "curves.png")


def test_arms_of_a_seed_share_init_and_batches_and_seeds_differ(tiny_run):
    _, results, _ = tiny_run
    runs = results["runs"]
    for key in ("init_sha256", "batch_order_sha256"):
        by_seed = [{r[key] for r in runs if r["seed"] == s} for s in (0, 1)]
        assert len(by_seed[0]) == 1 and len(by_seed[1]) == 1
        assert by_seed[0] != by_seed[1]
    # GC changes the training: the arms of a seed end apart.
    final = {(r["arm"], r["seed"]): r["history"][-1]["train_loss"] for r in runs}
    assert len({final[arm, 0] for arm in lm.ARMS}) == 3


def test_same_seed_gives_the_same_histories(tiny_run, tmp_path):
    _, results, _ = tiny_run
    again, _ = _main(TINY + ["--seeds", "1", "--out", str(tmp_path)])
    first = [r for r in results["runs"] if r["seed"] == 0]
    assert len(again["runs"]) == len(first) == 3
    for a, b in zip(first, again["runs"], strict=True):
        for key in ("arm", "init_sha256", "batch_order_sha256", "history"):
            assert a[key] == b[key]


def test_replot_redraws_the_figure(tiny_run):
    out, _, _ = tiny_run
    (out / "curves.png").unlink()
    _main(["--replot", str(out / "results.json")])
    _check_png(out / "curves.png")


def test_batch_order_and_eval_windows():
    order = lm.batch_order(3, n_bytes=1000, steps=5, batch_size=7, ctx=16)
    assert order.shape == (5, 7) and order.min() >= 0 and order.max() <= 1000 - 17
    np.testing.assert_array_equal(order, lm.batch_order(3, 1000, 5, 7, 16))
    starts = lm.eval_starts(1000, 4)
    np.testing.assert_array_equal(starts, [0, 250, 500, 750])
    # Non-overlapping windows inside the bytes whenever they fit.
    for n_bytes, windows, span in ((1000, 58, 17), (17 * 9, 9, 17), (5000, 512, 9)):
        starts = lm.eval_starts(n_bytes, windows)
        assert np.all(np.diff(starts) >= span) and starts[-1] + span <= n_bytes


# --- the inferred output axes ---------------------------------------------------------


def lm_params(layers=2, d=32, heads=4, ctx=8):
    model = TransformerLM(layers=layers, d_model=d, heads=heads, ctx=ctx)
    return lm.output_axes_rule(model, batch_size=3)[0]


def test_inferred_axes_are_the_hand_derived_ones():
    layers, d, heads, ctx = 2, 32, 4, 8
    model = TransformerLM(layers=layers, d_model=d, heads=heads, ctx=ctx)
    params, rule = lm.output_axes_rule(model, batch_size=3)
    table = optax_gc.explain(params, output_axes=rule)
    # From the layer definitions: a stacked q/k/v kernel (L, d, H, Dh) is
    # contracted with the input over d (axis 1); the out kernel (L, H, Dh, d)
    # over H and Dh; the MLP kernels (L, in, out) over in. The stack axis 0
    # indexes layers. The head (d, 256) is contracted over d. Embeddings are
    # looked up or added, biases added, LayerNorm parameters multiplied or
    # added: GC leaves them alone.
    hd, v = d // heads, 256
    kernels = {
        "blocks/attn/query/kernel": ((layers, d, heads, hd), (0, 2, 3), d),
        "blocks/attn/key/kernel": ((layers, d, heads, hd), (0, 2, 3), d),
        "blocks/attn/value/kernel": ((layers, d, heads, hd), (0, 2, 3), d),
        "blocks/attn/out/kernel": ((layers, heads, hd, d), (0, 3), heads * hd),
        "blocks/mlp/fc/kernel": ((layers, d, 4 * d), (0, 2), d),
        "blocks/mlp/proj/kernel": ((layers, 4 * d, d), (0, 2), 4 * d),
        "head/kernel": ((d, v), (1,), d),
    }
    untouched = {
        "embed/embedding": (v, d),
        "pos_embedding": (1, ctx, d),
        "blocks/attn/query/bias": (layers, heads, hd),
        "blocks/attn/key/bias": (layers, heads, hd),
        "blocks/attn/value/bias": (layers, heads, hd),
        "blocks/attn/out/bias": (layers, d),
        "blocks/mlp/fc/bias": (layers, 4 * d),
        "blocks/mlp/proj/bias": (layers, d),
        "blocks/ln_1/scale": (layers, d),
        "blocks/ln_1/bias": (layers, d),
        "blocks/ln_2/scale": (layers, d),
        "blocks/ln_2/bias": (layers, d),
        "ln_f/scale": (d,),
        "ln_f/bias": (d,),
        "head/bias": (v,),
    }
    assert {row.path for row in table} == set(kernels) | set(untouched)
    for path, (shape, kept, fan_in) in kernels.items():
        row = table[path]
        assert (row.shape, row.kept, row.fan_in) == (shape, kept, fan_in), path
        assert row.units == math.prod(shape) // fan_in
    for path, shape in untouched.items():
        assert (table[path].shape, table[path].kept) == (shape, None), path
    assert table["embed/embedding"].why == "lookup"


# --- the corpus ---------------------------------------------------------------------

EXCLUDED = ["test", "tests", "idle_test", "site-packages", "dist-packages"]


def _held_out_by_hand(path: str) -> bool:
    return int.from_bytes(hashlib.sha256(path.encode()).digest(), "big") % 10 == 0


def _names(n_held, n_train):
    """Module names, ``n_held`` of them held out and ``n_train`` not."""
    held, train = [], []
    for i in range(10_000):
        name = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"mod_{i}.py"
        side = held if _held_out_by_hand(name) else train
        side.append(name)
        if len(held) >= n_held and len(train) >= n_train:
            break
    return held[:n_held] + train[:n_train]


def _fake_corpus(root, names):
    contents = {}
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"# {name}\n" + "".join(f"x_{name[:-3]}_{k} = {k}\n" for k in range(5))
        contents[name] = text.encode()
        path.write_bytes(contents[name])
    for folder in EXCLUDED + ["pkg0/tests", "pkg1/__pycache__"]:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "excluded.py").write_text("never read\n")
    (root / "notes.txt").write_text("not python\n")
    return contents


def test_split_is_the_documented_hash_rule_and_never_leaks(tmp_path):
    contents = _fake_corpus(tmp_path, _names(n_held=3, n_train=9))
    corpus = datasets.load_stdlib_corpus(tmp_path)
    held, train = set(corpus.held_out_paths), set(corpus.train_paths)
    assert not held & train and held | train == set(contents)
    assert len(held) == 3
    assert list(corpus.train_paths) == sorted(train)
    assert list(corpus.held_out_paths) == sorted(held)
    for path in contents:
        assert (path in held) == _held_out_by_hand(path) == datasets.is_held_out(path)
    # The bytes are the files in path order, each followed by the separator.
    for paths, array in (
        (corpus.train_paths, corpus.train),
        (corpus.held_out_paths, corpus.held_out),
    ):
        expected = b"".join(contents[p] + b"\n" for p in paths)
        assert array.dtype == np.uint8 and array.tobytes() == expected
    train_bytes = corpus.train.tobytes()
    for path in held:
        assert contents[path] not in train_bytes
        assert path[:-3].encode() not in train_bytes
    assert b"never read" not in train_bytes + corpus.held_out.tobytes()


def test_fingerprint_follows_every_file(tmp_path):
    names = _names(n_held=1, n_train=3)
    _fake_corpus(tmp_path, names)
    first = datasets.load_stdlib_corpus(tmp_path).sha256
    assert datasets.load_stdlib_corpus(tmp_path).sha256 == first
    digest = hashlib.sha256()
    for name in sorted(names):
        content = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        digest.update(f"{name}\0{content}\n".encode())
    assert first == digest.hexdigest()
    (tmp_path / names[0]).write_bytes(b"# changed\n")
    assert datasets.load_stdlib_corpus(tmp_path).sha256 != first


def test_the_standard_library_corpus():
    corpus = datasets.load_stdlib_corpus()
    n = len(corpus.train_paths) + len(corpus.held_out_paths)
    assert n > 500 and 0.05 < len(corpus.held_out_paths) / n < 0.15
    assert len(corpus.train) > 5_000_000 and len(corpus.held_out) > 300_000
    for path in corpus.train_paths + corpus.held_out_paths:
        parts = path.split("/")
        assert path.endswith(".py") and not set(parts) & datasets.STDLIB_EXCLUDED


def test_missing_or_empty_corpus_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datasets.load_stdlib_corpus(missing)
    with pytest.raises(SystemExit) as info:
        lm.main(TINY + ["--data-dir", str(missing), "--out", str(tmp_path / "o")])
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    empty = tmp_path / "empty"
    (empty / "tests").mkdir(parents=True)
    (empty / "tests" / "t.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no \\*.py files"):
        datasets.load_stdlib_corpus(empty)
    with pytest.raises(SystemExit) as info:
        lm.main(TINY + ["--data-dir", str(empty), "--out", str(tmp_path / "o")])
    assert str(empty) in str(info.value)


def test_too_few_held_out_bytes_is_an_error(tmp_path):
    _fake_corpus(tmp_path, _names(n_held=1, n_train=3))
    argv = TINY + ["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        lm.main(argv + ["--eval-windows", "1000"])
    assert "--eval-windows 1000" in str(info.value)


# --- options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--layers", "0"], "--layers"),
        (["--d-model", "-8"], "--d-model"),
        (["--heads", "0"], "--heads"),
        (["--ctx", "0"], "--ctx"),
        (["--batch-size", "0"], "--batch-size"),
        (["--steps", "0"], "--steps"),
        (["--steps", "1", "--eval-every", "1"], "--steps"),
        (["--seeds", "0"], "--seeds"),
        (["--eval-every", "0"], "--eval-every"),
        (["--eval-windows", "0"], "--eval-windows"),
        (["--d-model", "30", "--heads", "4"], "--d-model"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--steps", "10", "--eval-every", "20"], "--eval-every"),
        (["--arms", "sgd"], "--arms"),
        (["--arms", ","], "--arms"),
        (["--layers", "two"], "--layers"),
    ],
)
def test_bad_options_are_usage_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        lm.parse_args(argv)
    assert info.value.code == 2
    assert option in capsys.readouterr().err


def test_arms_option_selects_gc_arms_and_keeps_the_baseline():
    args = lm.parse_args(["--arms", "adamw-update+gc"])
    assert args.arms == ["adamw", "adamw-update+gc"]
    assert lm.parse_args([]).arms == list(lm.ARMS)


def test_only_gc_differs_between_the_optimizers():
    params = lm_params(layers=1, d=8, heads=2, ctx=4)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), params)
    mask = lm.decay_mask(params)
    flags = zip(_paths(params), jax.tree.leaves(mask), strict=True)
    decayed = {p for p, m in flags if m}
    assert decayed == {p for p in _paths(params) if p.endswith("kernel")}
    # With GC masked off everywhere, the GC arms are the baseline exactly.
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    schedule = lm.make_schedule(1e-2, 10)
    off = optax_gc.path_rules({}, default=None)
    base = lm.make_optimizer("adamw", schedule, off)
    for arm in lm.GC_ARMS:
        tx = lm.make_optimizer(arm, schedule, off)
        state, base_state = tx.init(params), base.init(params)
        for _ in range(3):
            u, state = tx.update(grads, state, params)
            b, base_state = base.update(grads, base_state, params)
            for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(b), strict=True):
                np.testing.assert_array_equal(x, y)


def _paths(tree):
    return [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
