"""GC vs baseline: a small Flax CNN on real images, several seeds, one command.

    python -m benchmarks.train                          # digits, 5 seeds
    python -m benchmarks.train --dataset fashion-mnist  # needs the Debian
                                                        # package dataset-fashion-mnist

Run it from the repository root. The model is ``benchmarks.models.CNN``.

Each seed trains every optimizer twice, with and without Gradient
Centralization, from the same initialization and with the same data order:

* ``sgd``:          SGD, momentum 0.9, L2 5e-4 (the paper's setting) vs
                    ``optax_gc.gc_sgd`` with the same arguments;
* ``adam-grad``:    Adam vs ``optax_gc.gc_adam(location="gradient")``;
* ``adam-update``:  Adam vs ``optax_gc.gc_adam(location="update")``.

Both Adam rows share one baseline run per seed. Hyperparameters are the same
for GC and baseline; nothing is tuned per arm. Writes ``results.json`` (every
per-epoch metric of every run, the config and versions) and ``curves.png``
into ``--out`` and prints a table: mean ± std over seeds, and the paired
difference GC - baseline with its standard error.

Splits (fixed): digits, scikit-learn's 1,797 bundled 8x8 images, stratified
80/20 with ``random_state=0`` (1,437 train / 360 test); Fashion-MNIST, the
first ``--train-subset`` images of the official 60,000 training images
(default 20,000) and the official 10,000 test images.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import pathlib
import platform
import sys
import time

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
DEFAULTS = {  # per dataset: epochs, batch size, seeds
    "digits": {"epochs": 15, "batch_size": 32, "seeds": 5, "width": 16},
    "fashion-mnist": {"epochs": 15, "batch_size": 128, "seeds": 5, "width": 8},
}
OPTIMIZERS = ("sgd", "adam-grad", "adam-update")
SGD_LR, MOMENTUM, L2 = 0.05, 0.9, 5e-4
ADAM_LR = 1e-3


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
    """Reads one gzipped IDX file (unsigned bytes) into an array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
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


def load_fashion_mnist(data_dir: str, train_subset: int | None):
    root = pathlib.Path(data_dir)
    missing = [name for name in FASHION_FILES.values() if not (root / name).is_file()]
    if missing:
        sys.exit(
            f"error: Fashion-MNIST files not found in --data-dir {root}: "
            f"{', '.join(missing)}.\nInstall the Debian package "
            f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist puts "
            f"them in {FASHION_DIR}) or pass --data-dir pointing at the four IDX "
            f".gz files."
        )
    arrays = {k: read_idx(root / name) for k, name in FASHION_FILES.items()}
    n = len(arrays["x_train"]) if train_subset is None else train_subset
    x_train = (arrays["x_train"][:n] / 255.0).astype(np.float32)[..., None]
    x_test = (arrays["x_test"] / 255.0).astype(np.float32)[..., None]
    return (
        x_train,
        arrays["y_train"][:n].astype(np.int32),
        x_test,
        arrays["y_test"].astype(np.int32),
    )


# --- optimizers -----------------------------------------------------------------


def make_optimizer(name: str, gc: bool) -> optax.GradientTransformation:
    if name == "sgd":
        if gc:
            return optax_gc.gc_sgd(SGD_LR, MOMENTUM, weight_decay=L2)
        return optax.chain(optax.add_decayed_weights(L2), optax.sgd(SGD_LR, MOMENTUM))
    if not gc:
        return optax.adam(ADAM_LR)
    location = {"adam-grad": "gradient", "adam-update": "update"}[name]
    return optax_gc.gc_adam(ADAM_LR, location=location)


# --- training --------------------------------------------------------------------


def make_run_fns(model, tx, x_train, y_train, x_test, y_test, batch_size):
    """Jitted (init, one epoch, evaluate) for one optimizer; reused over seeds."""
    steps = len(x_train) // batch_size
    eval_chunk = min(len(x_test), 1000)
    n_eval = len(x_test) // eval_chunk * eval_chunk

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
        for i in range(0, n_eval, eval_chunk):
            chunk = slice(i, i + eval_chunk)
            chunk_loss, chunk_correct = eval_chunk_fn(
                params, batch_stats, x_test[chunk], y_test[chunk]
            )
            loss, correct = loss + chunk_loss, correct + chunk_correct
        return loss / n_eval, correct / n_eval

    return init, train_epoch, evaluate


def train_one(fns, seed, epochs, n_train, progress):
    init, train_epoch, evaluate = fns
    params, batch_stats, opt_state = init(jax.random.key(seed))
    rng = np.random.default_rng(seed)  # the same data order for every arm
    carry = (params, batch_stats, opt_state)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n_train).astype(np.int32)
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
        progress.set_postfix(
            loss=f"{float(train_loss):.4f}", test_acc=f"{float(test_acc):.4f}"
        )
        progress.update(1)
    return history


# --- reporting ---------------------------------------------------------------------


def summarize(runs, optimizers, seeds):
    """Per optimizer: final train loss / test accuracy, baseline vs GC, paired diff."""
    final = {(r["arm"], r["seed"]): r["history"][-1] for r in runs}
    summary = {}
    for name in optimizers:
        base_arm = "sgd" if name == "sgd" else "adam"
        row = {}
        for metric in ("train_loss", "test_acc"):
            base = np.array([final[(base_arm, s)][metric] for s in seeds])
            gc = np.array([final[(f"{name}+gc", s)][metric] for s in seeds])
            diff = gc - base
            n = len(seeds)
            row[metric] = {
                "baseline_mean": float(base.mean()),
                "baseline_std": float(base.std(ddof=1)) if n > 1 else 0.0,
                "gc_mean": float(gc.mean()),
                "gc_std": float(gc.std(ddof=1)) if n > 1 else 0.0,
                "diff_mean": float(diff.mean()),
                "diff_se": float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
            }
        summary[name] = row
    return summary


def format_table(summary, n_seeds):
    head = (
        "| optimizer | train loss, baseline | train loss, GC | GC - baseline "
        "| test acc %, baseline | test acc %, GC | GC - baseline |"
    )
    lines = [head, "|" + "---|" * 7]
    for name, row in summary.items():
        loss, acc = row["train_loss"], row["test_acc"]
        lines.append(
            f"| {name} "
            f"| {loss['baseline_mean']:.4f} ± {loss['baseline_std']:.4f} "
            f"| {loss['gc_mean']:.4f} ± {loss['gc_std']:.4f} "
            f"| {loss['diff_mean']:+.4f} ± {loss['diff_se']:.4f} "
            f"| {100 * acc['baseline_mean']:.2f} ± {100 * acc['baseline_std']:.2f} "
            f"| {100 * acc['gc_mean']:.2f} ± {100 * acc['gc_std']:.2f} "
            f"| {100 * acc['diff_mean']:+.2f} ± {100 * acc['diff_se']:.2f} |"
        )
    lines.append(
        f"\nmean ± std over {n_seeds} seed(s); GC - baseline: mean of the per-seed "
        f"paired differences ± its standard error. Final epoch."
    )
    return "\n".join(lines)


def plot_curves(runs, optimizers, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(optimizers), figsize=(4.2 * len(optimizers), 6.5), squeeze=False
    )
    for col, name in enumerate(optimizers):
        base_arm = "sgd" if name == "sgd" else "adam"
        for arm, label, color in (
            (base_arm, "baseline", "tab:gray"),
            (f"{name}+gc", "GC", "tab:red"),
        ):
            hist = [r["history"] for r in runs if r["arm"] == arm]
            epochs = np.arange(1, len(hist[0]) + 1)
            for row, metric in enumerate(("train_loss", "test_acc")):
                values = np.array([[h[metric] for h in run] for run in hist])
                mean, std = values.mean(0), values.std(0)
                ax = axes[row, col]
                ax.plot(epochs, mean, color=color, label=label)
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)
                ax.set_xlabel("epoch")
                ax.set_ylabel(
                    {"train_loss": "train loss", "test_acc": "test accuracy"}[metric]
                )
                if metric == "train_loss":
                    ax.set_yscale("log")
                    ax.set_title(name)
                ax.grid(alpha=0.3)
                ax.legend()
    fig.suptitle(f"{title}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dataset", choices=list(DEFAULTS), default="digits")
    p.add_argument("--epochs", type=int, help="default: 15")
    p.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default 5)")
    p.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated subset of {','.join(OPTIMIZERS)}",
    )
    p.add_argument("--batch-size", type=int, help="default: 32 digits, 128 fashion")
    p.add_argument(
        "--width", type=int, help="first conv's channels (16 digits, 8 fashion-mnist)"
    )
    p.add_argument("--out", help="results folder (default: runs/<dataset>)")
    p.add_argument("--data-dir", default=FASHION_DIR, help="Fashion-MNIST IDX folder")
    p.add_argument(
        "--train-subset",
        type=int,
        help="use the first N training images (fashion-mnist default 20000; "
        "digits default: all)",
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        p.error(f"--optimizers: unknown {bad}; choose from {', '.join(OPTIMIZERS)}")
    args.optimizers = names
    for key in ("epochs", "seeds", "batch_size", "width"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.dataset == "fashion-mnist" and args.train_subset is None:
        args.train_subset = 20000
    if args.out is None:
        args.out = f"runs/{args.dataset}"
    return args


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm

    if args.dataset == "digits":
        x_train, y_train, x_test, y_test = load_digits()
        if args.train_subset is not None:
            x_train, y_train = (
                x_train[: args.train_subset],
                y_train[: args.train_subset],
            )
    else:
        x_train, y_train, x_test, y_test = load_fashion_mnist(
            args.data_dir, args.train_subset
        )
    if len(x_train) < args.batch_size:
        sys.exit(
            f"error: --batch-size {args.batch_size} > {len(x_train)} training images"
        )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.dataset}: {len(x_train)} train / {len(x_test)} test images "
        f"{x_train.shape[1:]}, {args.seeds} seed(s), {args.epochs} epoch(s), "
        f"batch {args.batch_size}, optimizers {', '.join(args.optimizers)}",
        flush=True,
    )

    arms = []  # (arm name, optimizer name, gc)
    if "sgd" in args.optimizers:
        arms += [("sgd", "sgd", False), ("sgd+gc", "sgd", True)]
    adam_rows = [n for n in args.optimizers if n != "sgd"]
    if adam_rows:
        arms.append(("adam", "adam-grad", False))
        arms += [(f"{n}+gc", n, True) for n in adam_rows]

    model = CNN(width=args.width, stem_stride=1 if args.dataset == "digits" else 2)
    data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
    seeds = list(range(args.seeds))
    runs, start = [], time.perf_counter()
    for arm, name, gc in arms:
        fns = make_run_fns(model, make_optimizer(name, gc), *data, args.batch_size)
        for seed in seeds:
            t0 = time.perf_counter()
            with tqdm(
                total=args.epochs,
                desc=f"{arm:>16} seed {seed}",
                leave=True,
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar:
                history = train_one(fns, seed, args.epochs, len(x_train), bar)
            runs.append(
                {
                    "arm": arm,
                    "optimizer": name,
                    "gc": gc,
                    "seed": seed,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "history": history,
                }
            )

    summary = summarize(runs, args.optimizers, seeds)
    table = format_table(summary, len(seeds))
    print(f"\n{args.dataset}, {time.perf_counter() - start:.0f} s in all\n{table}")
    config = {k: v for k, v in vars(args).items()}
    config["hyperparameters"] = {
        "sgd": {"learning_rate": SGD_LR, "momentum": MOMENTUM, "l2": L2},
        "adam": {"learning_rate": ADAM_LR, "b1": 0.9, "b2": 0.999, "eps": 1e-8},
    }
    config["split"] = {"train": len(x_train), "test": len(x_test)}
    results = {
        "config": config,
        "versions": versions(),
        "summary": summary,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_curves(
        runs,
        args.optimizers,
        out / "curves.png",
        f"{args.dataset}, {len(x_train)} train images",
    )
    print(f"\nwrote {out / 'results.json'} and {out / 'curves.png'}")
    return results


if __name__ == "__main__":
    main()
