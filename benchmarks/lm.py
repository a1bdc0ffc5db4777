"""GC vs AdamW on a small byte-level transformer language model, one command.

    python -m benchmarks.lm                  # 3 seeds x 3 arms, about 6
                                             # minutes on 2 CPU cores
    python -m benchmarks.lm --replot runs/lm/results.json  # redraw curves.png
    python -m benchmarks.lm --layers 6 --d-model 384 --heads 6 --ctx 256 \\
        --batch-size 64 --steps 5000 --eval-every 250     # a GPU-sized run

Run it from the repository root. It measures whether Gradient Centralization
(Yong et al., ECCV 2020, arXiv 2004.01461) changes how well AdamW trains a
small transformer language model: the held-out loss in nats per byte (and
bits per byte, nats / ln 2) and the training loss, per seed, paired against
the baseline that started from the same parameters and saw the same batches.

Data: the Python standard library's own ``*.py`` sources, read as bytes
(``benchmarks.datasets.load_stdlib_corpus``; about 730 files, 12 MB on Python
3.11), without installed packages, test suites and byte-code caches. The split
is by file: a file is held out iff ``int(sha256(relative POSIX path), 16) % 10
== 0`` (about 10% of the files), so no held-out file is ever trained on and a
file keeps its side of the split on every Python version. Other Python
versions have other files; ``results.json`` records the Python version, the
folder and a fingerprint of every file's path and contents (``--data-dir``
reads another folder of sources). On Python 3.11 about 16% of the held-out
bytes are generated codec tables (``encodings/cp737.py``, ...) with
near-twins in training, so absolute held-out losses are optimistic; every arm
is scored on the same windows.

Training batches: each seed's numpy generator (``default_rng(seed)``) draws
``--steps`` x ``--batch-size`` window starts uniformly from the training bytes;
a window is ``--ctx`` + 1 consecutive bytes, the model reads the first
``--ctx`` and predicts the next byte at every position. Evaluation: a fixed
set of ``--eval-windows`` non-overlapping windows of the held-out bytes,
window i starting at byte ``i * (held-out bytes // windows)``; every one of
the ``--ctx`` predicted bytes of every window is scored (512 x 64 = 32,768
bytes by default), every ``--eval-every`` steps and after the last step. The
training loss at an evaluation is the mean minibatch loss over the steps
since the previous one.

Model: ``benchmarks.models.TransformerLM``, a pre-LN decoder-only transformer
over bytes (vocabulary 256): token and learned position embeddings, blocks
stacked with ``nn.scan`` (causal ``nn.MultiHeadDotProductAttention``, MLP 4d
with gelu), a final LayerNorm and an untied output head. Default 2 layers,
d_model 64, 4 heads, context 64 (137,216 parameters), batch 32, 1,000
steps: about 41 ms a step, evaluations included, on 2 CPU cores (372 s for
the whole default run).

Arms, each seed training all three from the same initialization on the same
batches (nothing tuned per arm; standard small-GPT choices):

* ``adamw``:           ``optax.adamw``, the baseline;
* ``adamw-grad+gc``:   ``optax_gc.gc_adamw(location="gradient")``: GC on the
                       raw gradient, before the moments;
* ``adamw-update+gc``: ``optax_gc.gc_adamw(location="update")``: GC on the
                       final step, the decoupled decay included.

All three get the same arguments: peak learning rate ``--lr`` (3e-3) with
linear warm-up from 0 over the first 5% of the steps and cosine decay to 10% of
the peak at the last step (``optax.warmup_cosine_decay_schedule``), b1 0.9,
b2 0.95, eps 1e-8, decoupled weight decay 0.1 on the kernels only (a mask
that leaves embeddings, biases and LayerNorm parameters undecayed), no
gradient clipping, float32. GC's output axes come from
``optax_gc.infer_output_axes`` on the model; the ``optax_gc.explain`` table is
printed at the start and stored in ``results.json``: q/k/v, out, MLP and head
kernels are centralized over their fan-in, the stacked layer axis is kept,
and embeddings, biases and LayerNorm parameters are left alone.

Outputs in ``--out`` (default ``runs/lm``): ``results.json`` (the config with
every hyperparameter, versions, the data's fingerprint and sizes, the explain
table, per run the initial-parameter and batch-order fingerprints and the
whole history, the summary, the held-out bits/byte difference GC - adamw
at every evaluation, seconds) and ``curves.png`` (held-out bits/byte
and training loss against the step, baseline vs each GC arm, mean ± std over
seeds). The printed table gives, per GC arm, the final held-out nats/byte,
bits/byte and training loss: mean ± std over seeds for the baseline and the
arm, and the paired difference GC - baseline ± its standard error.

Scaling up: every size is an option (``--layers --d-model --heads --ctx
--batch-size --steps --seeds --lr --eval-every --eval-windows``); on a GPU
raise them together, e.g. as above. The default run is sized for 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
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
from benchmarks import datasets, harness, report
from benchmarks.models import TransformerLM

BASELINE = "adamw"
GC_ARMS = {"adamw-grad+gc": "gradient", "adamw-update+gc": "update"}
ARMS = (BASELINE, *GC_ARMS)
DEFAULTS = {
    "layers": 2,
    "d_model": 64,
    "heads": 4,
    "ctx": 64,
    "batch_size": 32,
    "steps": 1000,
    "seeds": 3,
    "lr": 3e-3,
    "eval_every": 100,
    "eval_windows": 512,
}
B1, B2, EPS, WEIGHT_DECAY = 0.9, 0.95, 1e-8, 0.1
WARMUP_FRACTION, END_FRACTION = 0.05, 0.1
EVAL_CHUNK = 64  # held-out windows per evaluation call
TITLES = {
    "adamw-grad+gc": "AdamW, GC on the gradient",
    "adamw-update+gc": "AdamW, GC on the update",
}
METRICS = {
    "heldout_nats": "held-out nats/byte",
    "heldout_bits": "held-out bits/byte",
    "train_loss": "train loss (nats/byte)",
}


# --- optimizers -------------------------------------------------------------------


def decay_mask(params):
    """Weight decay on kernels only: not on embeddings, biases, LayerNorms."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def warmup_steps(steps: int) -> int:
    return min(max(1, round(WARMUP_FRACTION * steps)), steps - 1)


def make_schedule(lr: float, steps: int):
    """Linear warm-up from 0, then cosine decay to END_FRACTION * lr at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps(steps), steps, end_value=END_FRACTION * lr
    )


def make_optimizer(arm: str, schedule, rule) -> optax.GradientTransformation:
    """The arm's AdamW; the GC arms differ from the baseline only in GC."""
    kwargs = dict(b1=B1, b2=B2, eps=EPS, weight_decay=WEIGHT_DECAY, mask=decay_mask)
    if arm == BASELINE:
        return optax.adamw(schedule, **kwargs)
    return optax_gc.gc_adamw(
        schedule, **kwargs, location=GC_ARMS[arm], output_axes=rule
    )


# --- data -------------------------------------------------------------------------


def batch_order(seed: int, n_bytes: int, steps: int, batch_size: int, ctx: int):
    """Every step's window starts, ``(steps, batch_size)`` int32, from the seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_bytes - ctx, size=(steps, batch_size), dtype=np.int32)


def eval_starts(n_bytes: int, windows: int) -> np.ndarray:
    """Evenly spaced window starts: window i at ``i * (n_bytes // windows)``."""
    return (np.arange(windows) * (n_bytes // windows)).astype(np.int32)


def _windows(data, starts, length):
    return data[starts[:, None] + jnp.arange(length)[None, :]].astype(jnp.int32)


def _byte_losses(model, params, tokens):
    """Nats per predicted byte, ``(batch, ctx)``: byte t+1 from bytes 0..t."""
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


# --- training ---------------------------------------------------------------------


def make_fns(model, ctx):
    """Jitted (init, evaluate) shared by the arms: ``evaluate`` sums nats."""

    @jax.jit
    def init(key):
        return model.init(key, jnp.zeros((1, ctx), jnp.int32))["params"]

    @jax.jit
    def eval_chunk(params, data, starts):
        return _byte_losses(model, params, _windows(data, starts, ctx + 1)).sum()

    def evaluate(params, data, starts):
        total = sum(
            eval_chunk(params, data, starts[i : i + EVAL_CHUNK])
            for i in range(0, len(starts), EVAL_CHUNK)
        )
        return float(total) / (len(starts) * ctx)

    return init, evaluate


def make_step(model, tx, ctx):
    """One jitted AdamW step on the windows at ``starts``; params/state donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, data, starts):
        tokens = _windows(data, starts, ctx + 1)
        loss, grads = jax.value_and_grad(
            lambda p: _byte_losses(model, p, tokens).mean()
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train_one(args, fns, step, tx, seed, data, progress, label):
    """One arm, one seed: history of evaluations, init and order fingerprints."""
    init, evaluate = fns
    train, held_out, held_starts = data
    params = init(jax.random.key(seed))
    init_sha = harness.tree_sha256(params)  # before the first step donates it
    order = batch_order(seed, len(train.host), args.steps, args.batch_size, args.ctx)
    order_sha = hashlib.sha256(order.tobytes()).hexdigest()[:16]
    opt_state = tx.init(params)
    history, losses = [], []
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, train.device, order[i])
        losses.append(loss)
        progress.update(1)
        done = i + 1
        if done % args.eval_every == 0 or done == args.steps:
            nats = evaluate(params, held_out, held_starts)
            train_loss = float(np.mean(jax.device_get(losses), dtype=np.float64))
            losses = []
            history.append(
                {
                    "step": done,
                    "train_loss": train_loss,
                    "heldout_nats": nats,
                    "heldout_bits": nats / math.log(2),
                }
            )
            progress.set_postfix_str(
                f"{label} step {done}: held-out {nats / math.log(2):.3f} bits/byte"
            )
    return history, init_sha, order_sha


class _Bytes:
    """A byte array on the host and on the device."""

    def __init__(self, array: np.ndarray):
        self.host = array
        self.device = jnp.asarray(array)


def make_model(args) -> TransformerLM:
    return TransformerLM(
        layers=args.layers, d_model=args.d_model, heads=args.heads, ctx=args.ctx
    )


def output_axes_rule(model: TransformerLM, batch_size: int):
    """``(abstract params, rule)``: GC's output axes read from the model's jaxpr.

    The tokens are passed to ``infer_output_axes`` as an argument (data), not
    closed over (which would make them a constant).
    """
    tokens = jax.ShapeDtypeStruct((batch_size, model.ctx), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    rule = optax_gc.infer_output_axes(
        lambda p, t: model.apply({"params": p}, t), params, tokens
    )
    return params, rule


def train_all(args, corpus, rule, progress):
    model = make_model(args)
    fns = make_fns(model, args.ctx)
    train = _Bytes(corpus.train)
    held_out = _Bytes(corpus.held_out).device
    data = (train, held_out, eval_starts(len(corpus.held_out), args.eval_windows))
    schedule = make_schedule(args.lr, args.steps)
    arms = {}
    for arm in args.arms:
        tx = make_optimizer(arm, schedule, rule)
        arms[arm] = (tx, make_step(model, tx, args.ctx))
    runs = []
    for seed in range(args.seeds):
        for arm, (tx, step) in arms.items():
            label = f"{arm} seed {seed}"
            t0 = time.perf_counter()
            history, init_sha, order_sha = train_one(
                args, fns, step, tx, seed, data, progress, label
            )
            seconds = time.perf_counter() - t0
            runs.append(
                {
                    "arm": arm,
                    "gc_location": GC_ARMS.get(arm),
                    "seed": seed,
                    "init_sha256": init_sha,
                    "batch_order_sha256": order_sha,
                    "seconds": round(seconds, 2),
                    "history": history,
                }
            )
            final = history[-1]
            progress.write(
                f"{label:>24}: held-out {final['heldout_nats']:.4f} nats/byte "
                f"({final['heldout_bits']:.4f} bits/byte), train loss "
                f"{final['train_loss']:.4f} ({seconds:.1f} s)"
            )
    return runs


# --- reporting --------------------------------------------------------------------


def pairs_for(gc_arms) -> dict[str, report.Pair]:
    return {arm: report.Pair(TITLES[arm], BASELINE, arm) for arm in gc_arms}


COLUMNS = tuple(report.Column(metric, label) for metric, label in METRICS.items())
PANELS = (
    report.Panel("heldout_bits", METRICS["heldout_bits"], focus=True),
    report.Panel("train_loss", METRICS["train_loss"], focus=True),
    report.Panel("heldout_bits", "held-out bits/byte", difference=True),
)


def summarize(runs, gc_arms, seeds):
    """Per GC arm: final metrics paired per seed with the adamw baseline."""
    return report.final_stats(runs, pairs_for(gc_arms), METRICS, seeds)


def per_eval_differences(runs, gc_arms, seeds):
    """Per GC arm and evaluation: held-out bits/byte, GC - adamw, mean of seeds."""
    return report.curve_differences(runs, pairs_for(gc_arms), "heldout_bits", seeds)


def format_table(summary, n_seeds, steps):
    head, rows = report.stats_table(summary, COLUMNS, "GC arm")
    return report.markdown_table(head, rows) + (
        f"\n\nmean ± std over {n_seeds} seed(s); baseline: adamw; GC - baseline: "
        f"mean of the per-seed paired differences ± its standard error. After "
        f"step {steps}; train loss is the mean minibatch loss over the last "
        f"evaluation interval."
    )


def plot_curves(runs, gc_arms, path, title):
    """Per GC arm: held-out bits/byte and train loss vs step, with the baseline."""
    report.plot_pairs(runs, pairs_for(gc_arms), PANELS, "step", "step", path, title)


def explain_rows(table):
    return [
        {
            "path": r.path,
            "shape": r.shape,
            "kept": r.kept,
            "fan_in": r.fan_in,
            "units": r.units,
            "why": r.why,
        }
        for r in table
    ]


# --- main -------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lm",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    helps = {
        "layers": "transformer blocks",
        "d_model": "model width; a multiple of --heads",
        "heads": "attention heads",
        "ctx": "context: bytes the model reads per window",
        "batch_size": "windows per step",
        "steps": "optimizer steps per run (>= 2)",
        "seeds": "seeds 0..N-1",
        "eval_every": "evaluate every N steps (and after the last); <= --steps",
        "eval_windows": "held-out windows scored at each evaluation",
    }
    for key, text in helps.items():
        p.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            default=DEFAULTS[key],
            help=f"{text} ({DEFAULTS[key]})",
        )
    p.add_argument(
        "--lr",
        type=float,
        default=DEFAULTS["lr"],
        help=f"peak learning rate of every arm ({DEFAULTS['lr']:g})",
    )
    p.add_argument(
        "--arms",
        default=",".join(GC_ARMS),
        help=f"comma-separated GC arms, a subset of {','.join(GC_ARMS)} (default: "
        f"both); the {BASELINE} baseline always runs",
    )
    p.add_argument(
        "--data-dir",
        help=f"folder of Python sources (default: this Python's standard library, "
        f"{datasets.stdlib_dir()})",
    )
    p.add_argument("--out", default="runs/lm", help="results folder (runs/lm)")
    p.add_argument(
        "--replot",
        metavar="RESULTS",
        type=pathlib.Path,
        help="train nothing: redraw curves.png beside a results.json of this script",
    )
    args = p.parse_args(argv)
    for key in helps:
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.steps < 2:
        p.error("--steps must be >= 2 (warm-up, then decay)")
    if args.d_model % args.heads:
        p.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if args.eval_every > args.steps:
        p.error(f"--eval-every {args.eval_every} > --steps {args.steps}")
    names = [n.strip() for n in args.arms.split(",") if n.strip()]
    bad = [n for n in names if n not in GC_ARMS]
    if bad or not names:
        p.error(
            f"--arms: {'unknown ' + ', '.join(bad) if bad else 'none given'}; "
            f"choose from {', '.join(GC_ARMS)}"
        )
    args.gc_arms = [n for n in GC_ARMS if n in names]
    args.arms = [BASELINE, *args.gc_arms]
    return args


def load(args):
    try:
        corpus = datasets.load_stdlib_corpus(args.data_dir)
    except (FileNotFoundError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    span = args.ctx + 1
    if len(corpus.train) <= span:
        sys.exit(
            f"error: the {len(corpus.train)} training bytes of {corpus.root} are "
            f"fewer than one window of --ctx {args.ctx} + 1"
        )
    if len(corpus.held_out) < args.eval_windows * span:
        sys.exit(
            f"error: the {len(corpus.held_out)} held-out bytes of {corpus.root} hold "
            f"fewer than --eval-windows {args.eval_windows} windows of --ctx "
            f"{args.ctx} + 1 bytes"
        )
    return corpus


def data_record(corpus, args):
    return {
        "name": "Python standard library sources (*.py)",
        "root": corpus.root,
        "python": platform.python_version(),
        "sha256": corpus.sha256,
        "excluded_components": sorted(datasets.STDLIB_EXCLUDED),
        "split": "held out iff int(sha256(relative POSIX path, UTF-8), 16) % 10 == 0",
        "file_separator": datasets.FILE_SEPARATOR.decode(),
        "train_files": len(corpus.train_paths),
        "held_out_files": len(corpus.held_out_paths),
        "train_bytes": len(corpus.train),
        "held_out_bytes": len(corpus.held_out),
        "held_out_paths": list(corpus.held_out_paths),
        "eval": {
            "windows": args.eval_windows,
            "window_bytes": args.ctx + 1,
            "stride": len(corpus.held_out) // args.eval_windows,
            "scored_bytes": args.eval_windows * args.ctx,
        },
    }


def hyperparameters(args):
    return {
        "optimizer": "optax.adamw / optax_gc.gc_adamw, same arguments",
        "peak_learning_rate": args.lr,
        "schedule": "optax.warmup_cosine_decay_schedule",
        "warmup_steps": warmup_steps(args.steps),
        "init_learning_rate": 0.0,
        "end_learning_rate": END_FRACTION * args.lr,
        "b1": B1,
        "b2": B2,
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "weight_decay_mask": "kernels only (no embeddings, biases, LayerNorms)",
        "gradient_clipping": None,
        "dtype": "float32",
        "gc_output_axes": "optax_gc.infer_output_axes on the model",
    }


def _title(config):
    return (
        f"byte-level LM on Python sources, {config['layers']} layers x "
        f"{config['d_model']}, ctx {config['ctx']}, batch {config['batch_size']}, "
        f"{config['steps']} steps"
    )


def replot(path: pathlib.Path) -> pathlib.Path:
    """Redraws the figure of a results file written by this script, beside it."""
    results = report.read_results(path)
    config, runs = results["config"], results["runs"]
    gc_arms = [arm for arm in GC_ARMS if any(r["arm"] == arm for r in runs)]
    figure = path.parent / "curves.png"
    plot_curves(runs, gc_arms, figure, _title(config))
    return figure


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        print(f"wrote {replot(args.replot)}")
        return None
    from tqdm import tqdm

    start = time.perf_counter()
    corpus = load(args)
    out = report.results_folder(args.out)
    model = make_model(args)
    params, rule = output_axes_rule(model, args.batch_size)
    table = optax_gc.explain(params, output_axes=rule)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    print(
        f"{corpus.root}: {len(corpus.train_paths)} train files "
        f"({len(corpus.train):,} bytes) / {len(corpus.held_out_paths)} held-out "
        f"files ({len(corpus.held_out):,} bytes), Python "
        f"{platform.python_version()}; TransformerLM {args.layers} layers, d_model "
        f"{args.d_model}, {args.heads} heads, ctx {args.ctx} ({n_params:,} "
        f"parameters); {args.seeds} seed(s) x {len(args.arms)} arms "
        f"({', '.join(args.arms)}); {args.steps} steps of batch {args.batch_size}, "
        f"peak lr {args.lr:g}\n\nGC's output axes (optax_gc.infer_output_axes):\n"
        f"{table}\n",
        flush=True,
    )
    with tqdm(
        total=len(args.arms) * args.seeds * args.steps,
        desc="steps",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as progress:
        runs = train_all(args, corpus, rule, progress)
    seeds = list(range(args.seeds))
    summary = summarize(runs, args.gc_arms, seeds)
    text = format_table(summary, len(seeds), args.steps)
    per_eval = per_eval_differences(runs, args.gc_arms, seeds)
    config = {k: v for k, v in vars(args).items() if k not in ("gc_arms", "replot")}
    config["data_dir"] = corpus.root
    plot_curves(runs, args.gc_arms, out / "curves.png", _title(config))
    seconds = time.perf_counter() - start
    config["hyperparameters"] = hyperparameters(args)
    config["parameters"] = n_params
    results = {
        "config": config,
        "versions": harness.versions(),
        "data": data_record(corpus, args),
        "explain": str(table),
        "explain_rows": explain_rows(table),
        "summary": summary,
        "heldout_bits_diff_per_eval": per_eval,
        "runs": runs,
        "seconds": round(seconds),
    }
    report.write_json(out / "results.json", results)
    print(f"\nstdlib LM, {seconds:.0f} s in all\n{text}")
    steps = [h["step"] for h in runs[0]["history"]]
    print(f"\nheld-out bits/byte, GC - adamw at steps {steps} (mean over seeds):")
    for arm, diffs in per_eval.items():
        print(f"  {arm}: " + ", ".join(f"{d:+.4f}" for d in diffs))
    print(f"\nwrote {out / 'results.json'} and {out / 'curves.png'}")
    return results


if __name__ == "__main__":
    main()
