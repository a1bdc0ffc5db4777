"""GC vs baseline: a Flax CNN on real images, several seeds, one command.

    python -m benchmarks.train                          # the shipped Fashion-MNIST
                                                        # subset, 3 seeds
    python -m benchmarks.train --lr-sweep               # GC vs baseline over
                                                        # learning rates
    python -m benchmarks.train --dataset fashion-mnist  # all 60,000 images (the
                                                        # Debian package
                                                        # dataset-fashion-mnist)
    python -m benchmarks.train --dataset digits         # 8x8 digits, seconds

Run it from the repository root. The model is ``benchmarks.models.CNN``.

Each seed trains every optimizer with and without Gradient Centralization,
from the same initialization and with the same data order (the paper's
recipe, Yong et al., ECCV 2020, arXiv 2004.01461; nothing is tuned per arm):

* ``sgd``:          SGD, momentum 0.9, L2 5e-4 added to the gradient, vs
                    ``optax_gc.gc_sgd`` with the same arguments (L2 before GC);
* ``adam-grad``:    Adam vs ``optax_gc.gc_adam(location="gradient")``;
* ``adam-update``:  Adam vs ``optax_gc.gc_adam(location="update")``.

Both Adam rows share one baseline run per seed. The learning rate follows a
cosine decay to zero over the run (``--schedule constant`` keeps it fixed).
Writes ``results.json`` (every per-epoch metric of every run, the config and
versions) and ``curves.png`` into ``--out`` and prints a table: mean ± std
over seeds, and the paired difference GC - baseline with its standard error.
``--lr-sweep`` instead trains every arm at several multiples of the learning
rate and writes ``sweep.json`` and ``lr_sweep.png``.

Datasets (fixed splits):

* ``fashion-mnist-10k`` (default): ``benchmarks/data/fashion-mnist-10k.npz``,
  shipped with the repository: the first 10,000 of the 60,000 official
  Fashion-MNIST training images and the first 5,000 of the 10,000 official
  test images (``python -m benchmarks.make_subset`` rebuilds it);
* ``fashion-mnist``: the official files in ``--data-dir`` (the first
  ``--train-subset`` training images, default all 60,000; all 10,000 test
  images);
* ``digits``: scikit-learn's 1,797 bundled 8x8 images, stratified 80/20 with
  ``random_state=0`` (1,437 train / 360 test).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import math
import pathlib
import platform
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gc
from benchmarks.models import CNN

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
DATA_DIR = pathlib.Path(__file__).parent / "data"
SUBSET_FILE = DATA_DIR / "fashion-mnist-10k.npz"
SUBSET_SIZES = {"train": 10_000, "test": 5_000}
# sha256 of x_train, y_train, x_test, y_test's bytes, in that order (uint8).
SUBSET_SHA256 = "ed034e8d89dea1ef6745d0a25a44741530c5a7342f7e554f7f22ba66d9800a61"
DEFAULTS = {  # per dataset
    "fashion-mnist-10k": {
        "epochs": 8,
        "batch_size": 128,
        "seeds": 3,
        "width": 16,
        "stem_stride": 2,
    },
    "fashion-mnist": {
        "epochs": 8,
        "batch_size": 128,
        "seeds": 3,
        "width": 16,
        "stem_stride": 2,
    },
    "digits": {
        "epochs": 15,
        "batch_size": 32,
        "seeds": 5,
        "width": 16,
        "stem_stride": 1,
    },
}
OPTIMIZERS = ("sgd", "adam-grad", "adam-update")
SGD_LR, MOMENTUM, L2 = 0.05, 0.9, 5e-4
ADAM_LR = 1e-3
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
TITLES = {
    "sgd": "SGD, momentum 0.9, L2 5e-4",
    "adam-grad": "Adam, GC on the gradient",
    "adam-update": "Adam, GC on the update",
}


# --- data --------------------------------------------------------------------


def load_digits():
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def read_idx(path: pathlib.Path) -> np.ndarray:
    """Reads one gzipped IDX file of unsigned bytes.

    Args:
        path: an IDX file compressed with gzip, as Fashion-MNIST ships them.

    Returns:
        The uint8 array, in the shape the file's header gives.

    Raises:
        ValueError: naming ``path``, if it is not a gzipped unsigned-byte IDX
            file or holds fewer or more values than its header says.
    """
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise ValueError(
            f"{path}: expected {math.prod(shape)} values, got {array.size}"
        )
    return array.reshape(shape)


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in ("x_train", "y_train", "x_test", "y_test"):
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def _scale(arrays, n_train=None):
    """uint8 arrays -> float32 images in [0, 1] with a channel axis, int32 labels."""
    n = len(arrays["x_train"]) if n_train is None else n_train
    return (
        (arrays["x_train"][:n] / 255.0).astype(np.float32)[..., None],
        arrays["y_train"][:n].astype(np.int32),
        (arrays["x_test"] / 255.0).astype(np.float32)[..., None],
        arrays["y_test"].astype(np.int32),
    )


def load_subset(path: pathlib.Path = SUBSET_FILE, train_subset: int | None = None):
    """Loads the shipped Fashion-MNIST subset, checked against its sha256.

    Args:
        path: the ``.npz`` file (default: the one shipped in ``benchmarks/data``).
        train_subset: keep only the first N training images (default: all).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 images in [0, 1] of shape
        ``(N, 28, 28, 1)`` and int32 labels.

    Raises:
        FileNotFoundError: if ``path`` is missing; the message says how to
            restore it.
        ValueError: if ``path`` is not the recorded subset (not an ``.npz``,
            other arrays, or contents whose sha256 differs).
    """
    path = pathlib.Path(path)
    rebuild = (
        f"Restore it with `git checkout -- {path.name}` in {path.parent}, or "
        f"rebuild it from the official files with `python -m benchmarks."
        f"make_subset` (Debian package dataset-fashion-mnist)."
    )
    if not path.exists():
        raise FileNotFoundError(
            f"the Fashion-MNIST subset {path} is missing; it ships with the "
            f"repository. {rebuild}"
        )
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is corrupt: not an .npz (zip) file. {rebuild}")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path} is corrupt ({e}). {rebuild}") from e
    expected = {
        "x_train": (SUBSET_SIZES["train"], 28, 28),
        "y_train": (SUBSET_SIZES["train"],),
        "x_test": (SUBSET_SIZES["test"], 28, 28),
        "y_test": (SUBSET_SIZES["test"],),
    }
    got = {k: (np.shape(a), getattr(a, "dtype", type(a))) for k, a in arrays.items()}
    if got != {k: (s, np.dtype(np.uint8)) for k, s in expected.items()}:
        raise ValueError(
            f"{path} is corrupt: expected uint8 arrays {expected}, found {got}. "
            f"{rebuild}"
        )
    if arrays_sha256(arrays) != SUBSET_SHA256:
        raise ValueError(
            f"{path} is corrupt: its contents do not match the recorded sha256 "
            f"{SUBSET_SHA256}. {rebuild}"
        )
    return _scale(arrays, train_subset)


def load_fashion_mnist(data_dir: str, train_subset: int | None):
    root = pathlib.Path(data_dir)
    missing = [name for name in FASHION_FILES.values() if not (root / name).is_file()]
    if missing:
        sys.exit(
            f"error: Fashion-MNIST files not found in --data-dir {root}: "
            f"{', '.join(missing)}.\nInstall the Debian package "
            f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist puts "
            f"them in {FASHION_DIR}) or pass --data-dir pointing at the four IDX "
            f".gz files. The default dataset, fashion-mnist-10k, needs neither."
        )
    try:
        arrays = {k: read_idx(root / name) for k, name in FASHION_FILES.items()}
    except ValueError as e:
        sys.exit(f"error: {e}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
            sys.exit(
                f"error: {root}: {split} images {x.shape} and labels {y.shape} do "
                f"not form a Fashion-MNIST split"
            )
        if y.max(initial=0) > 9:
            sys.exit(f"error: {root}: {split} labels outside 0..9")
    return _scale(arrays, train_subset)


# --- optimizers -----------------------------------------------------------------


def learning_rates(name: str, args) -> float:
    return args.sgd_lr if name == "sgd" else args.adam_lr


def make_optimizer(name: str, gc: bool, learning_rate) -> optax.GradientTransformation:
    """The arm's optimizer; ``learning_rate`` is a float or an optax schedule."""
    if name == "sgd":
        if gc:
            return optax_gc.gc_sgd(learning_rate, MOMENTUM, weight_decay=L2)
        return optax.chain(
            optax.add_decayed_weights(L2), optax.sgd(learning_rate, MOMENTUM)
        )
    if not gc:
        return optax.adam(learning_rate)
    location = {"adam-grad": "gradient", "adam-update": "update"}[name]
    return optax_gc.gc_adam(learning_rate, location=location)


def make_schedule(kind: str, peak: float, total_steps: int):
    if kind == "constant":
        return peak
    return optax.cosine_decay_schedule(peak, decay_steps=total_steps, alpha=0.0)


# --- training --------------------------------------------------------------------


def make_run_fns(model, tx, x_train, y_train, x_test, y_test, batch_size):
    """Jitted (init, one epoch, evaluate) for one optimizer; reused over seeds.

    An epoch is ``len(x_train) // batch_size`` steps over a fresh permutation:
    the last partial batch is left out of that epoch (a different one each
    epoch). Evaluation covers every test image.
    """
    steps = len(x_train) // batch_size
    n_test = len(x_test)

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (updates["batch_stats"], jnp.mean(logits.argmax(-1) == y))

    @jax.jit
    def init(key):
        variables = model.init(key, x_train[:1], train=False)
        params = variables["params"]
        return params, variables["batch_stats"], tx.init(params)

    # One jitted step in a Python loop: on XLA:CPU a lax.scan over the epoch
    # runs these small convolutions about 8x slower than separate steps.
    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, idx):
        params, batch_stats, opt_state, loss_sum, acc_sum = carry
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (batch_stats, acc)), grads = grad_fn(
            params, batch_stats, x_train[idx], y_train[idx]
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, batch_stats, opt_state, loss_sum + loss, acc_sum + acc

    def train_epoch(carry, order):
        carry = (*carry, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        for i in range(steps):
            carry = step(carry, order[i * batch_size : (i + 1) * batch_size])
        *carry, loss_sum, acc_sum = carry
        return tuple(carry), loss_sum / steps, acc_sum / steps

    @jax.jit
    def eval_chunk_fn(params, batch_stats, x, y):
        logits = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=False
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return loss.sum(), jnp.sum(logits.argmax(-1) == y)

    def evaluate(params, batch_stats):
        loss, correct = 0.0, 0
        for i in range(0, n_test, 1000):  # the last chunk may be shorter
            chunk = slice(i, i + 1000)
            chunk_loss, chunk_correct = eval_chunk_fn(
                params, batch_stats, x_test[chunk], y_test[chunk]
            )
            loss, correct = loss + chunk_loss, correct + chunk_correct
        return loss / n_test, correct / n_test

    return init, train_epoch, evaluate


def params_sha256(params) -> str:
    """A fingerprint of the initial parameters (equal across a seed's arms)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def train_one(fns, seed, epochs, n_train, progress, label):
    init, train_epoch, evaluate = fns
    params, batch_stats, opt_state = init(jax.random.key(seed))
    init_sha = params_sha256(params)
    rng = np.random.default_rng(seed)  # the same data order for every arm
    order_sha = hashlib.sha256()
    carry = (params, batch_stats, opt_state)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n_train).astype(np.int32)
        order_sha.update(order.tobytes())
        carry, train_loss, train_acc = train_epoch(carry, order)
        test_loss, test_acc = evaluate(carry[0], carry[1])
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(train_loss),
                "train_acc": float(train_acc),
                "test_loss": float(test_loss),
                "test_acc": float(test_acc),
            }
        )
        progress.set_postfix_str(
            f"{label} epoch {epoch}: loss {float(train_loss):.4f}, "
            f"test acc {100 * float(test_acc):.2f}%"
        )
        progress.update(1)
    return history, init_sha, order_sha.hexdigest()[:16]


def arms_for(optimizers):
    """[(arm name, optimizer name, gc)]: Adam's baseline is shared by its rows."""
    arms = []
    if "sgd" in optimizers:
        arms += [("sgd", "sgd", False), ("sgd+gc", "sgd", True)]
    adam_rows = [n for n in optimizers if n != "sgd"]
    if adam_rows:
        arms.append(("adam", adam_rows[0], False))
        arms += [(f"{n}+gc", n, True) for n in adam_rows]
    return arms


def base_arm(name: str) -> str:
    return "sgd" if name == "sgd" else "adam"


def train_arms(args, data, factor=1.0, progress=None):
    """Every arm x seed at ``factor`` times the default learning rates."""
    model = CNN(width=args.width, stem_stride=args.stem_stride, hidden=args.hidden)
    steps = len(data[0]) // args.batch_size * args.epochs
    fns = {}
    for arm, name, gc in arms_for(args.optimizers):
        lr = factor * learning_rates(name, args)
        tx = make_optimizer(name, gc, make_schedule(args.schedule, lr, steps))
        fns[arm] = (name, gc, lr, make_run_fns(model, tx, *data, args.batch_size))
    runs = []
    for seed in range(args.seeds):
        for arm, (name, gc, lr, arm_fns) in fns.items():
            t0 = time.perf_counter()
            label = f"{arm} seed {seed}" + (f" lr {lr:g}" if factor != 1.0 else "")
            history, init_sha, order_sha = train_one(
                arm_fns, seed, args.epochs, len(data[0]), progress, label
            )
            seconds = time.perf_counter() - t0
            runs.append(
                {
                    "arm": arm,
                    "optimizer": name,
                    "gc": gc,
                    "seed": seed,
                    "learning_rate": lr,
                    "init_sha256": init_sha,
                    "data_order_sha256": order_sha,
                    "seconds": round(seconds, 2),
                    "history": history,
                }
            )
            final = history[-1]
            progress.write(
                f"{label:>28}: train loss {final['train_loss']:.4f}, test acc "
                f"{100 * final['test_acc']:.2f}% ({seconds:.1f} s)"
            )
    return runs


# --- reporting ---------------------------------------------------------------------


def _stats(base, gc):
    base, gc = np.asarray(base), np.asarray(gc)
    diff, n = gc - base, len(base)
    return {  # spreads need two seeds: None (null in results.json) with one
        "baseline_mean": float(base.mean()),
        "baseline_std": float(base.std(ddof=1)) if n > 1 else None,
        "gc_mean": float(gc.mean()),
        "gc_std": float(gc.std(ddof=1)) if n > 1 else None,
        "diff_mean": float(diff.mean()),
        "diff_se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
    }


def summarize(runs, optimizers, seeds):
    """Per optimizer: final train loss / test accuracy, baseline vs GC, paired diff."""
    final = {(r["arm"], r["seed"]): r["history"][-1] for r in runs}
    summary = {}
    for name in optimizers:
        summary[name] = {
            metric: _stats(
                [final[(base_arm(name), s)][metric] for s in seeds],
                [final[(f"{name}+gc", s)][metric] for s in seeds],
            )
            for metric in ("train_loss", "test_acc")
        }
    return summary


def _pm(mean, spread, scale, fmt):
    text = format(scale * mean, fmt)
    return text if spread is None else f"{text} ± {scale * spread:.{fmt[-2:]}}"


def _cells(row):
    cells = []
    for metric, scale, digits in (("train_loss", 1, ".4f"), ("test_acc", 100, ".2f")):
        stats = row[metric]
        cells += [
            _pm(stats["baseline_mean"], stats["baseline_std"], scale, digits),
            _pm(stats["gc_mean"], stats["gc_std"], scale, digits),
            _pm(stats["diff_mean"], stats["diff_se"], scale, "+" + digits),
        ]
    return "| " + " | ".join(cells) + " |"


HEAD = (
    "| train loss, baseline | train loss, GC | GC - baseline "
    "| test acc %, baseline | test acc %, GC | GC - baseline |"
)


def format_table(summary, n_seeds):
    lines = ["| optimizer " + HEAD, "|" + "---|" * 7]
    lines += [f"| {name} " + _cells(row) for name, row in summary.items()]
    lines.append(
        f"\nmean ± std over {n_seeds} seed(s); GC - baseline: mean of the per-seed "
        f"paired differences ± its standard error. Final epoch; train loss is "
        f"the mean minibatch loss over that epoch (training mode)."
    )
    return "\n".join(lines)


YLABELS = {"train_loss": "train loss", "test_acc": "test accuracy %"}
ARM_STYLES = (("baseline", "tab:gray"), ("GC", "tab:red"))


def _figure(names):
    """A (plt, figure, axes) grid: train loss above test accuracy, a column each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(names), figsize=(4.2 * len(names), 6.5), squeeze=False
    )
    return plt, fig, axes


def _finish(plt, fig, axes, names, xlabel, path, title):
    for col, name in enumerate(names):
        for row, metric in enumerate(YLABELS):
            ax = axes[row, col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(YLABELS[metric])
            if metric == "train_loss":
                ax.set_yscale("log")
                ax.set_title(TITLES[name])
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs, optimizers, path, title):
    """Per optimizer, baseline and GC per epoch: mean and a ±std band over seeds."""
    plt, fig, axes = _figure(optimizers)
    for col, name in enumerate(optimizers):
        arms = (base_arm(name), f"{name}+gc")
        for arm, (label, color) in zip(arms, ARM_STYLES, strict=True):
            hist = [r["history"] for r in runs if r["arm"] == arm]
            epochs = np.arange(1, len(hist[0]) + 1)
            for row, metric in enumerate(YLABELS):
                values = np.array([[h[metric] for h in run] for run in hist])
                if metric == "test_acc":
                    values = 100 * values
                mean = values.mean(0)
                std = values.std(0, ddof=1) if len(values) > 1 else 0 * mean
                ax = axes[row, col]
                ax.plot(epochs, mean, color=color, label=label, marker=".")
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
    _finish(
        plt, fig, axes, optimizers, "epoch", path, f"{title}: mean ± std over seeds"
    )


def summarize_sweep(runs_by_factor, optimizers, seeds):
    """{optimizer: [{learning_rate, train_loss: stats, test_acc: stats}]}."""
    out = {name: [] for name in optimizers}
    for runs in runs_by_factor:
        summary = summarize(runs, optimizers, seeds)
        for name in optimizers:
            lr = next(r["learning_rate"] for r in runs if r["arm"] == f"{name}+gc")
            out[name].append({"learning_rate": lr, **summary[name]})
    return out


def format_sweep(sweep, n_seeds):
    lines = ["| optimizer | learning rate " + HEAD, "|" + "---|" * 8]
    for name, rows in sweep.items():
        lines += [f"| {name} | {row['learning_rate']:g} " + _cells(row) for row in rows]
    lines.append(
        f"\nmean ± std over {n_seeds} seed(s); GC - baseline: mean of the per-seed "
        f"paired differences ± its standard error. Final epoch; the peak "
        f"learning rate of the schedule."
    )
    return "\n".join(lines)


def plot_sweep(sweep, path, title):
    """Per optimizer, baseline and GC at the last epoch against the learning rate."""
    plt, fig, axes = _figure(list(sweep))
    for col, rows in enumerate(sweep.values()):
        lrs = [row["learning_rate"] for row in rows]
        for row_i, metric in enumerate(YLABELS):
            ax = axes[row_i, col]
            scale = 100 if metric == "test_acc" else 1
            for arm, (label, color) in zip(("baseline", "gc"), ARM_STYLES, strict=True):
                mean = [scale * row[metric][f"{arm}_mean"] for row in rows]
                std = [scale * (row[metric][f"{arm}_std"] or 0) for row in rows]
                ax.errorbar(lrs, mean, yerr=std, color=color, label=label, marker="o")
            ax.set_xscale("log")
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
            ax.minorticks_off()
    title = f"{title}: last epoch, mean ± std over seeds"
    _finish(plt, fig, axes, list(sweep), "peak learning rate", path, title)


def _finite(tree):
    """NaN/inf (a diverged run) as null: results.json stays valid JSON."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def versions():
    import flax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "optax_gc": optax_gc.__version__,
        "device": str(jax.devices()[0]),
        "machine": platform.machine(),
    }


# --- main ---------------------------------------------------------------------


def _floats(text):
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not comma-separated numbers: {text!r}"
        ) from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"need positive numbers: {text!r}")
    return values


def parse_args(argv=None):
    per_dataset = "\n".join(
        f"  {name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
        for name, d in DEFAULTS.items()
    )
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"defaults per dataset:\n{per_dataset}",
    )
    p.add_argument(
        "--dataset",
        choices=list(DEFAULTS),
        default="fashion-mnist-10k",
        help="fashion-mnist-10k (default) ships with the repository; "
        "fashion-mnist reads the official files from --data-dir",
    )
    p.add_argument("--epochs", type=int, help="default: per dataset (below)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1; default: per dataset")
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default: all)",
    )
    p.add_argument("--batch-size", type=int, help="default: per dataset")
    p.add_argument(
        "--width", type=int, help="channels of the first two convs; per dataset"
    )
    p.add_argument(
        "--stem-stride", type=int, help="stride of the first conv; per dataset"
    )
    p.add_argument("--hidden", type=int, default=128, help="hidden Dense units (128)")
    p.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="learning rate: cosine decay to 0 over the run (default) or constant",
    )
    p.add_argument("--sgd-lr", type=float, default=SGD_LR, help=f"({SGD_LR:g})")
    p.add_argument("--adam-lr", type=float, default=ADAM_LR, help=f"({ADAM_LR:g})")
    p.add_argument(
        "--lr-sweep",
        nargs="?",
        const=",".join(f"{f:g}" for f in SWEEP_FACTORS),
        type=_floats,
        metavar="FACTORS",
        help="train every arm at these multiples of its learning rate instead "
        f"(default factors {','.join(f'{f:g}' for f in SWEEP_FACTORS)})",
    )
    p.add_argument("--out", help="results folder (default: runs/<dataset>[-lr-sweep])")
    p.add_argument(
        "--data-dir",
        default=FASHION_DIR,
        help=f"folder of the official Fashion-MNIST IDX files ({FASHION_DIR})",
    )
    p.add_argument(
        "--train-subset", type=int, help="use only the first N training images"
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        p.error(
            f"--optimizers: {'unknown ' + ', '.join(bad) if bad else 'none given'}; "
            f"choose from {', '.join(OPTIMIZERS)}"
        )
    args.optimizers = [n for n in OPTIMIZERS if n in names]
    for key in ("epochs", "seeds", "batch_size", "width", "stem_stride", "hidden"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    for key in ("sgd_lr", "adam_lr"):
        if not (getattr(args, key) > 0 and math.isfinite(getattr(args, key))):
            p.error(f"--{key.replace('_', '-')} must be a positive number")
    if args.train_subset is not None and args.train_subset < 1:
        p.error("--train-subset must be >= 1")
    if args.out is None:
        args.out = f"runs/{args.dataset}" + ("-lr-sweep" if args.lr_sweep else "")
    return args


def load(args):
    """The dataset's four arrays, the training images cut to --train-subset."""
    if args.dataset == "digits":
        arrays = load_digits()
    elif args.dataset == "fashion-mnist":
        arrays = load_fashion_mnist(args.data_dir, None)
    else:
        try:
            arrays = load_subset(SUBSET_FILE)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
    x_train, y_train, x_test, y_test = arrays
    n = args.train_subset
    if n is not None and n > len(x_train):
        sys.exit(
            f"error: --train-subset {n} > the {len(x_train)} training images of "
            f"{args.dataset}"
        )
    return x_train[:n], y_train[:n], x_test, y_test


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm

    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load(args)
    if len(x_train) < args.batch_size:
        sys.exit(
            f"error: --batch-size {args.batch_size} > {len(x_train)} training images"
        )
    side = -(-x_train.shape[1] // args.stem_stride) // 4  # after the two pools
    if side < 1:
        sys.exit(
            f"error: --stem-stride {args.stem_stride} leaves nothing of "
            f"{x_train.shape[1]}x{x_train.shape[2]} images after two 2x2 pools"
        )
    out = pathlib.Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out {out}: {e}")
    factors = args.lr_sweep or (1.0,)
    arms = arms_for(args.optimizers)
    print(
        f"{args.dataset}: {len(x_train)} train / {len(x_test)} test images "
        f"{x_train.shape[1:]}; CNN width {args.width}, stem stride "
        f"{args.stem_stride}, hidden {args.hidden}; {args.seeds} seed(s) x "
        f"{len(arms)} arms ({', '.join(a for a, _, _ in arms)})"
        + (f" x {len(factors)} learning rates" if args.lr_sweep else "")
        + f"; {args.epochs} epoch(s), batch {args.batch_size}, {args.schedule} "
        f"learning rate (sgd {args.sgd_lr:g}, adam {args.adam_lr:g})",
        flush=True,
    )
    data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
    seeds = list(range(args.seeds))
    with tqdm(
        total=len(factors) * len(arms) * args.seeds * args.epochs,
        desc="epochs",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as progress:
        runs_by_factor = [
            train_arms(args, data, factor, progress) for factor in factors
        ]
    seconds = time.perf_counter() - start
    config = dict(vars(args))
    config["hyperparameters"] = {
        "sgd": {"learning_rate": args.sgd_lr, "momentum": MOMENTUM, "l2": L2},
        "adam": {"learning_rate": args.adam_lr, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
        "schedule": args.schedule,
    }
    config["split"] = {"train": len(x_train), "test": len(x_test)}
    title = f"{args.dataset}, {len(x_train)} train images, {args.epochs} epochs"
    results = {"config": config, "versions": versions(), "seconds": round(seconds)}
    if args.lr_sweep:
        sweep = summarize_sweep(runs_by_factor, args.optimizers, seeds)
        table = format_sweep(sweep, len(seeds))
        results |= {"sweep": sweep, "runs": [r for rs in runs_by_factor for r in rs]}
        files = ("sweep.json", "lr_sweep.png")
        plot_sweep(sweep, out / files[1], title)
    else:
        (runs,) = runs_by_factor
        summary = summarize(runs, args.optimizers, seeds)
        table = format_table(summary, len(seeds))
        results |= {"summary": summary, "runs": runs}
        files = ("results.json", "curves.png")
        plot_curves(runs, args.optimizers, out / files[1], title)
    (out / files[0]).write_text(json.dumps(_finite(results), indent=1))
    print(f"\n{args.dataset}, {seconds:.0f} s in all\n{table}")
    print(f"\nwrote {out / files[0]} and {out / files[1]}")
    return results


if __name__ == "__main__":
    main()
