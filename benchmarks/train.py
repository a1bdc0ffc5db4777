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
import hashlib
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gc
from benchmarks import datasets, harness, report
from benchmarks.models import CNN, NORMS

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
SWEEP_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TITLES = {
    "sgd": "SGD, momentum 0.9, L2 5e-4",
    "adam-grad": "Adam, GC on the gradient",
    "adam-update": "Adam, GC on the update",
}


# --- optimizers -------------------------------------------------------------------


def peak_rate(name: str, args) -> float:
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
        # GroupNorm and no norm keep no batch statistics: the collection is empty.
        stats = updates.get("batch_stats", {})
        return loss, (stats, jnp.mean(logits.argmax(-1) == y))

    @jax.jit
    def init(key):
        variables = model.init(key, x_train[:1], train=False)
        params = variables["params"]
        return params, variables.get("batch_stats", {}), tx.init(params)

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


def train_one(fns, seed, epochs, n_train, progress, label):
    init, train_epoch, evaluate = fns
    params, batch_stats, opt_state = init(jax.random.key(seed))
    init_sha = harness.tree_sha256(params)
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
        arms.append(("adam", "adam", False))
        arms += [(f"{n}+gc", n, True) for n in adam_rows]
    return arms


def base_arm(name: str) -> str:
    return "sgd" if name == "sgd" else "adam"


def train_arms(args, data, factor=1.0, progress=None):
    """Every arm x seed at ``factor`` times the default learning rates."""
    model = CNN(
        width=args.width,
        stem_stride=args.stem_stride,
        hidden=args.hidden,
        norm=args.norm,
        groups=args.groups,
    )
    steps = len(data[0]) // args.batch_size * args.epochs
    fns = {}
    for arm, name, gc in arms_for(args.optimizers):
        lr = factor * peak_rate(name, args)
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


def pairs_for(optimizers) -> dict[str, report.Pair]:
    return {
        name: report.Pair(TITLES[name], base_arm(name), f"{name}+gc")
        for name in optimizers
    }


METRICS = ("train_loss", "test_acc")
COLUMNS = (
    report.Column("train_loss", "train loss", 1, ".4f"),
    report.Column("test_acc", "test acc %", 100, ".2f"),
)
PANELS = (
    report.Panel("train_loss", "train loss", log=True),
    report.Panel("test_acc", "test accuracy %", 100, focus=True, legend="lower right"),
    report.Panel("test_acc", "test accuracy, points", 100, difference=True),
)


def summarize(runs, optimizers, seeds):
    """Per optimizer: final train loss / test accuracy, baseline vs GC, paired diff."""
    return report.final_stats(runs, pairs_for(optimizers), METRICS, seeds)


def per_epoch_differences(runs, optimizers, seeds):
    """Per optimizer and epoch: the paired test-accuracy difference, in points."""
    pairs = pairs_for(optimizers)
    return report.curve_differences(runs, pairs, "test_acc", seeds, 100)


def format_table(summary, n_seeds):
    head, rows = report.stats_table(summary, COLUMNS, "optimizer")
    return report.markdown_table(head, rows) + (
        f"\n\nmean ± std over {n_seeds} seed(s); GC - baseline: mean of the per-seed "
        f"paired differences ± its standard error. Final epoch; train loss is "
        f"the mean minibatch loss over that epoch (training mode)."
    )


def plot_curves(runs, optimizers, path, title):
    """Per optimizer, baseline and GC per epoch: mean and a ±std band over seeds.

    The accuracy panels are scaled to the last 60% of the run, where the
    final differences are; the first epochs' lower accuracy runs off the panel.
    The last row is the paired test-accuracy difference GC - baseline ± its
    standard error.
    """
    pairs = pairs_for(optimizers)
    report.plot_pairs(runs, pairs, PANELS, "epoch", "epoch", path, title)


def summarize_sweep(runs_by_factor, optimizers, seeds):
    """{optimizer: [{learning_rate, train_loss: stats, test_acc: stats}]}."""
    out = {name: [] for name in optimizers}
    for runs in runs_by_factor:
        summary = summarize(runs, optimizers, seeds)
        for name in optimizers:
            lr = next(r["learning_rate"] for r in runs if r["arm"] == f"{name}+gc")
            out[name].append({"learning_rate": lr, **summary[name]})
    return out


def sweep_brackets(sweep):
    """Per optimizer and arm, whether its best test accuracy is inside the rates.

    A best rate at either end of the sweep is not bracketed: a wider sweep
    could find a better one. A sweep of one rate brackets nothing and says
    nothing.
    """
    out = {}
    for name, rows in sweep.items():
        if len(rows) < 2:
            continue
        for arm in ("baseline", "gc"):
            accs = [row["test_acc"][f"{arm}_mean"] for row in rows]
            best = int(np.argmax(accs))
            out[f"{name} {arm}"] = {
                "best_learning_rate": rows[best]["learning_rate"],
                "bracketed": 0 < best < len(rows) - 1,
            }
    return out


def format_sweep(sweep, n_seeds):
    rows = []
    for name, sweep_rows in sweep.items():
        for row in sweep_rows:
            _, (cells,) = report.stats_table({name: row}, COLUMNS)
            rows.append([cells[0], f"{row['learning_rate']:g}", *cells[1:]])
    head, _ = report.stats_table({}, COLUMNS, "optimizer")
    lines = [report.markdown_table([head[0], "learning rate", *head[1:]], rows)]
    lines.append(
        f"\nmean ± std over {n_seeds} seed(s); GC - baseline: mean of the per-seed "
        f"paired differences ± its standard error. Final epoch; the peak "
        f"learning rate of the schedule."
    )
    for arm, b in sweep_brackets(sweep).items():
        if not b["bracketed"]:
            lines.append(
                f"{arm}: best at {b['best_learning_rate']:g}, the edge of the "
                f"sweep; widen --lr-sweep to bracket it"
            )
    return "\n".join(lines)


def _diverged(row, arm):
    loss = row["train_loss"][f"{arm}_mean"]
    return loss is None or not math.isfinite(loss)


def plot_sweep(sweep, path, title):
    """Per optimizer, baseline and GC at the last epoch against the learning rate.

    A rate at which an arm diverged (a non-finite training loss in some seed)
    is left out of that arm's curves and marked "diverged" on the axis.
    """
    plt, fig, axes = report.figure(len(sweep))
    for col, (name, rows) in enumerate(sweep.items()):
        lrs = [row["learning_rate"] for row in rows]
        for row_i, panel in enumerate(PANELS[:2]):  # no difference row
            ax = axes[row_i, col]
            metric, scale = panel.metric, panel.scale
            for arm, label, color in (
                ("baseline", "baseline", report.BASELINE_COLOR),
                ("gc", "GC", report.GC_COLOR),
            ):
                kept = [row for row in rows if not _diverged(row, arm)]
                mean = [scale * row[metric][f"{arm}_mean"] for row in kept]
                std = [scale * (row[metric][f"{arm}_std"] or 0) for row in kept]
                x = [row["learning_rate"] for row in kept]
                ax.errorbar(x, mean, yerr=std, color=color, label=label, marker="o")
            for row in rows:
                gone = [a for a in ("baseline", "gc") if _diverged(row, a)]
                if gone:
                    text = "diverged" if len(gone) == 2 else f"{gone[0]} diverged"
                    ax.annotate(
                        text,
                        (row["learning_rate"], 0.02),
                        xycoords=("data", "axes fraction"),
                        rotation=90,
                        ha="center",
                        fontsize=8,
                    )
            ax.set_xscale("log")
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=45, fontsize=8)
            ax.minorticks_off()
            if panel.log:
                ax.set_yscale("log")
            if row_i == 0:
                ax.set_title(TITLES[name])
            ax.set_xlabel("peak learning rate")
            ax.set_ylabel(panel.label)
            ax.grid(alpha=0.3)
            ax.legend()
    report.save(plt, fig, path, f"{title}: last epoch, mean ± std over seeds")


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
        "--norm",
        choices=NORMS,
        default="batch",
        help="normalization after every conv: batch (default), group or none",
    )
    p.add_argument(
        "--groups",
        type=int,
        default=4,
        help="GroupNorm's number of groups, with --norm group (4); it must "
        "divide --width",
    )
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
    p.add_argument(
        "--out",
        help="results folder (default: runs/<dataset>[-lr-sweep][-<norm>norm]"
        "[-batch<size>])",
    )
    p.add_argument(
        "--replot",
        metavar="RESULTS",
        type=pathlib.Path,
        help="train nothing: redraw the figure of a results.json or sweep.json "
        "beside it",
    )
    p.add_argument(
        "--data-dir",
        default=datasets.FASHION_DIR,
        help=f"folder of the official Fashion-MNIST IDX files ({datasets.FASHION_DIR})",
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
    for key in (
        "epochs",
        "seeds",
        "batch_size",
        "width",
        "stem_stride",
        "hidden",
        "groups",
    ):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.norm == "group" and args.width % args.groups:
        p.error(f"--groups {args.groups} must divide --width {args.width}")
    for key in ("sgd_lr", "adam_lr"):
        if not (getattr(args, key) > 0 and math.isfinite(getattr(args, key))):
            p.error(f"--{key.replace('_', '-')} must be a positive number")
    if args.train_subset is not None and args.train_subset < 1:
        p.error("--train-subset must be >= 1")
    if args.out is None:
        args.out = f"runs/{args.dataset}" + ("-lr-sweep" if args.lr_sweep else "")
        if args.norm != "batch":
            args.out += f"-{args.norm}norm"
        if args.batch_size != DEFAULTS[args.dataset]["batch_size"]:
            args.out += f"-batch{args.batch_size}"
    return args


def load(args):
    """The dataset's four arrays, the training images cut to --train-subset."""
    try:
        if args.dataset == "digits":
            arrays = datasets.load_digits()
        elif args.dataset == "fashion-mnist":
            arrays = datasets.load_fashion_mnist(args.data_dir)
        else:
            arrays = datasets.load_subset()
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


def _title(config, n_train):
    return (
        f"{config['dataset']}, {n_train} train images, "
        f"{config.get('norm', 'batch')} norm, batch {config['batch_size']}, "
        f"{config['epochs']} epoch(s)"
    )


def replot(path: pathlib.Path) -> pathlib.Path:
    """Redraws the figure of a results file written by this script, beside it."""
    results = report.read_results(path)
    config = results["config"]
    title = _title(config, config["split"]["train"])
    if "sweep" in results:
        figure = path.parent / "lr_sweep.png"
        plot_sweep(results["sweep"], figure, title)
    else:
        figure = path.parent / "curves.png"
        plot_curves(results["runs"], list(results["summary"]), figure, title)
    return figure


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        print(f"wrote {replot(args.replot)}")
        return None
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
    out = report.results_folder(args.out)
    factors = args.lr_sweep or (1.0,)
    arms = arms_for(args.optimizers)
    print(
        f"{args.dataset}: {len(x_train)} train / {len(x_test)} test images "
        f"{x_train.shape[1:]}; CNN width {args.width}, stem stride "
        f"{args.stem_stride}, hidden {args.hidden}, {args.norm} norm"
        + (f" ({args.groups} groups)" if args.norm == "group" else "")
        + f"; {args.seeds} seed(s) x "
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
        desc="epochs of all runs",
        unit="epoch",
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
    title = _title(config, len(x_train))
    results = {
        "config": config,
        "versions": harness.versions(),
        "seconds": round(seconds),
    }
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
        per_epoch = per_epoch_differences(runs, args.optimizers, seeds)
        results |= {
            "summary": summary,
            "test_acc_diff_per_epoch": per_epoch,
            "runs": runs,
        }
        files = ("results.json", "curves.png")
        plot_curves(runs, args.optimizers, out / files[1], title)
    report.write_json(out / files[0], results)
    print(f"\n{args.dataset}, {seconds:.0f} s in all\n{table}")
    if not args.lr_sweep:
        print("\ntest accuracy, GC - baseline per epoch (points, mean over seeds):")
        for name, diffs in per_epoch.items():
            print(f"  {name}: " + ", ".join(f"{d:+.2f}" for d in diffs))
    print(f"\nwrote {out / files[0]} and {out / files[1]}")
    return results


if __name__ == "__main__":
    main()
