"""What GC costs: time against a memory-roofline proxy, against the alternatives
users would pick, inside optimizers and a full train step; compile time; memory.

    python -m benchmarks.overhead                 # full run, a few minutes
    python -m benchmarks.overhead --tiny          # seconds: smoke test

Run it from the repository root.

Every timing is a jitted function, warmed up, timed with
``jax.block_until_ready``, median of ``--repeats`` runs, and the variants of one
table are interleaved call by call in one process, so that their ratios
survive a noisy machine. Gradient trees have real shapes in Flax layout with
random values: ResNet-50 (25.6M parameters, 161 leaves), a GPT-2-small-like
transformer (124M, DenseGeneral attention kernels), both from
``benchmarks.models``, and 1,000 small kernels. The train-step table times
``benchmarks.models.CNN``.
Writes the table and a JSON file (device, versions, shapes, every sample)
under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import platform
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gc
from benchmarks import harness
from benchmarks.models import CNN, GPT2_RULES, gpt2_small_shapes, resnet50_shapes

# --- gradient trees (real models' shapes are in benchmarks.models) ---------------


def small_kernels_shapes(n=1000):
    cycle = [(3, 3, 8, 8), (16, 16), (16,), (1, 1, 8, 16), (32, 8)]
    return {f"layer_{i:04d}/w": cycle[i % len(cycle)] for i in range(n)}


def adafactor_tree():
    """ResNet-50's leaves of at most 600K entries: 9.1M parameters, 158 leaves.

    Every kernel dimension from 128 on is factored by Adafactor; the largest
    kernels are left out to keep the table quick.
    """
    shapes = {k: v for k, v in resnet50_shapes().items() if math.prod(v) <= 600_000}
    n = sum(math.prod(v) for v in shapes.values())
    return f"ResNet-50 leaves <= 600K: {n / 1e6:.1f}M params", shapes


def tiny_shapes():
    return {"conv/kernel": (3, 3, 8, 16), "dense/kernel": (64, 10), "dense/bias": (10,)}


def make_tree(shapes, seed=0, dtype=jnp.float32):
    """A nested dict of random arrays with the given {"a/b": shape}."""
    rng = np.random.default_rng(seed)
    tree = {}
    for path, shape in shapes.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return tree


# --- GC formulations ----------------------------------------------------------


def _fan_in(x, output_axes=(-1,)):
    keep = {a % x.ndim for a in output_axes}
    return tuple(a for a in range(x.ndim) if a not in keep)


def copy_tree(tree):
    """Roofline proxy: one elementwise pass, 1 read + 1 write per element."""
    return jax.tree.map(lambda x: -x, tree)


def naive_tree(tree, output_axes=(-1,)):
    def f(x):
        if x.ndim < 2:
            return x
        return x - x.mean(axis=_fan_in(x, output_axes), keepdims=True)

    return jax.tree.map(f, tree)


def optax_centralize_tree(tree):
    return optax.centralize().update(tree, optax.EmptyState())[0]


def optax_gc_tree(tree, output_axes=-1):
    return optax_gc.centralize(output_axes=output_axes).update(tree, None)[0]


# --- the tables ---------------------------------------------------------------


def table_transforms(name, shapes, repeats, output_axes=-1):
    tree = make_tree(shapes)
    axes = (output_axes,) if isinstance(output_axes, int) else None
    fns = {
        "copy (roofline proxy)": jax.jit(copy_tree),
        "optax.centralize": jax.jit(optax_centralize_tree),
        "naive g - g.mean(fan_in)": jax.jit(
            functools.partial(naive_tree, output_axes=axes or (-1,))
        ),
        "optax_gc.centralize": jax.jit(
            functools.partial(optax_gc_tree, output_axes=output_axes)
        ),
    }
    medians, samples = harness.interleaved(fns, lambda _: (tree,), repeats)
    base = medians["copy (roofline proxy)"]
    rows = [(k, v, v / base) for k, v in medians.items()]
    return {
        "tree": name,
        "leaves": len(shapes),
        "params": sum(math.prod(s) for s in shapes.values()),
        "rows": rows,
        "baseline": "copy (roofline proxy)",
        "samples": samples,
    }


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3),
    "lion": lambda: optax.lion(1e-4),
}


def _optimizer_steps(base, gc_rules):
    """The bare optimizer and its three GC variants, each a donated step."""
    lr = {"adam": 1e-3, "adamw": 1e-3, "lion": 1e-4}[base]

    def make(tx):
        @functools.partial(jax.jit, donate_argnums=(0, 2))
        def step(params, grads, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return tx, step

    tx = OPTIMIZERS[base]
    gc = functools.partial(optax_gc.centralize, output_axes=gc_rules)
    update = (
        optax_gc.gc_adamw(lr, location="update", output_axes=gc_rules)
        if base == "adamw"
        else optax_gc.with_gc(tx(), location="update", output_axes=gc_rules)
    )
    return {
        f"optax.{base}": make(tx()),
        f"chain(centralize(), {base}) [gradient]": make(optax.chain(gc(), tx())),
        f"chain({base}, centralize()) [update, plain]": make(optax.chain(tx(), gc())),
        ("gc_adamw [update]" if base == "adamw" else f"with_gc({base}) [update]"): make(
            update
        ),
    }


def table_optimizer(name, shapes, repeats, gc_rules=-1, base="adam"):
    """One optimizer step (update + apply); params and state donated, grads fixed."""
    steps = _optimizer_steps(base, gc_rules)
    grads = make_tree(shapes, 1)
    calls, memory = {}, {}
    for label, (tx, step) in steps.items():
        params = make_tree(shapes, 0)
        state = tx.init(params)
        compiled = step.lower(params, grads, state).compile()
        memory[label] = harness.memory_stats(compiled, state)
        calls[label] = harness.stateful(
            lambda p, s, step=step: step(p, grads, s), (params, state)
        )
    medians, samples = harness.interleaved(
        {k: (lambda c=c: c()) for k, c in calls.items()}, lambda _: (), repeats
    )
    base_label = f"optax.{base}"
    rows = [(k, v, v / medians[base_label]) for k, v in medians.items()]
    return {
        "tree": name,
        "rows": rows,
        "baseline": base_label,
        "memory": memory,
        "samples": samples,
    }


def table_update_only(name, shapes, repeats):
    """GC on the gradient, the update alone (no apply, nothing donated)."""
    tree, grads = make_tree(shapes, 0), make_tree(shapes, 1)
    fns, states = {}, {}
    for label, tx in {
        "optax.adam": optax.adam(1e-3),
        "chain(centralize(), adam) [gradient]": optax.chain(
            optax_gc.centralize(), optax.adam(1e-3)
        ),
    }.items():
        states[label] = tx.init(tree)
        fns[label] = jax.jit(tx.update)
    medians, samples = harness.interleaved(
        fns, lambda label: (grads, states[label], tree), repeats
    )
    base = medians["optax.adam"]
    return {
        "tree": name,
        "rows": [(k, v, v / base) for k, v in medians.items()],
        "baseline": "optax.adam",
        "samples": samples,
    }


def table_train_step(repeats, tiny):
    """A full Flax CNN train step (forward + backward + adam) with and without GC."""
    width, batch, size = (4, 8, 8) if tiny else (16, 128, 28)
    model = CNN(width=width, stem_stride=1)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, 1))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def make(tx):
        @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
        def step(params, batch_stats, opt_state):
            def loss_fn(p):
                logits, upd = model.apply(
                    {"params": p, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
                return loss.mean(), upd["batch_stats"]

            grads, stats = jax.grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state

        return tx, step

    variants = {
        "adam": make(optax.adam(1e-3)),
        "chain(centralize(), adam)": make(
            optax.chain(optax_gc.centralize(), optax.adam(1e-3))
        ),
        "gc_adam (update)": make(optax_gc.gc_adam(1e-3, location="update")),
    }
    calls, memory = {}, {}
    for label, (tx, step) in variants.items():
        params = jax.tree.map(jnp.copy, variables["params"])
        stats = jax.tree.map(jnp.copy, variables["batch_stats"])
        state = tx.init(params)
        memory[label] = harness.memory_stats(
            step.lower(params, stats, state).compile(), state
        )
        calls[label] = harness.stateful(step, (params, stats, state))
    medians, samples = harness.interleaved(
        {k: (lambda c=c: c()) for k, c in calls.items()}, lambda _: (), repeats
    )
    base = medians["adam"]
    return {
        "param_bytes": harness.tree_bytes(variables["params"]),
        "tree": f"Flax CNN train step, batch {batch}x{size}x{size}, width {width}",
        "rows": [(k, v, v / base) for k, v in medians.items()],
        "baseline": "adam",
        "memory": memory,
        "samples": samples,
    }


def table_compile(shapes, repeats):
    """Trace + compile seconds of a fresh jit of each transform (no caching)."""
    tree = make_tree(shapes)

    def fresh(fn):
        # A new function object each time: jax caches on function identity.
        return lambda: jax.jit(lambda t: fn(t)).lower(tree).compile()

    fns = {
        "optax.centralize": fresh(optax_centralize_tree),
        "optax_gc.centralize": fresh(optax_gc_tree),
    }
    medians, samples = harness.interleaved(
        {k: (lambda f=f: f() and 0) for k, f in fns.items()},
        lambda _: (),
        repeats,
        warmup=1,
    )
    base = medians["optax.centralize"]
    return {
        "tree": f"{len(shapes)} small kernels: trace + compile",
        "rows": [(k, v, v / base) for k, v in medians.items()],
        "baseline": "optax.centralize",
        "samples": samples,
    }


COMPILE_VARIANTS = (
    "optax.adam",
    "chain(adam, centralize()) [update, plain]",
    "with_gc(adam) [update]",
)
"""The rows of :func:`table_compile_step`, each also with `` @ accelerator``."""

ACCELERATOR = " @ accelerator"


def _compile_tx(label):
    if label.startswith("optax.adam"):
        return optax.adam(1e-3)
    if label.startswith("chain("):
        return optax.chain(optax.adam(1e-3), optax_gc.centralize())
    return optax_gc.with_gc(optax.adam(1e-3), location="update")


def table_compile_step(name, shapes, repeats):
    """Trace + compile seconds of a donated update + apply step, fresh each time.

    Rows ending in ``@ accelerator`` are traced as for a GPU or TPU: on this
    CPU, ``harness.traced_for("gpu")`` makes the library's trace-time platform
    guess (``optax_gc._transform.lowering_platform``) answer ``"gpu"``, and
    the step is then compiled for the CPU as usual. So they measure the
    formulation an accelerator gets, compiled by XLA:CPU. Process CPU seconds
    (every compiler thread) are recorded beside the wall-clock ones.
    """
    params, grads = make_tree(shapes, 0), make_tree(shapes, 1)

    def compile_once(label):
        platform = "gpu" if label.endswith(ACCELERATOR) else None
        with harness.traced_for(platform):
            tx = _compile_tx(label)
            state = tx.init(params)

            @functools.partial(jax.jit, donate_argnums=(0, 2))
            def step(p, g, s):
                updates, s = tx.update(g, s, p)
                return optax.apply_updates(p, updates), s

            return step.lower(params, grads, state).compile()

    labels = [*COMPILE_VARIANTS, *(v + ACCELERATOR for v in COMPILE_VARIANTS)]
    medians, samples, cpu = harness.interleaved_compile(
        {label: functools.partial(compile_once, label) for label in labels}, repeats
    )
    base = medians["optax.adam"]
    return {
        "tree": f"{name}: trace + compile of a donated step",
        "rows": [(k, v, v / base) for k, v in medians.items()],
        "baseline": "optax.adam",
        "cpu_seconds": cpu,
        "samples": samples,
    }


def fmt_compile(result):
    """The compile table, with the ratios the targets read."""
    sec = {name: s for name, s, _ in result["rows"]}
    cpu = result["cpu_seconds"]
    adam, chain, ours = COMPILE_VARIANTS
    lines = [
        f"\n## {result['tree']}",
        "",
        "| variant | wall | x adam | x chain | CPU s | CPU x adam | CPU x chain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sec:
        suffix = ACCELERATOR if name.endswith(ACCELERATOR) else ""
        a, c = adam + suffix, chain + suffix
        lines.append(
            f"| {name} | {sec[name]:.2f} s | {sec[name] / sec[a]:.3f} "
            f"| {sec[name] / sec[c]:.3f} | {cpu[name]:.2f} | "
            f"{cpu[name] / cpu[a]:.3f} | {cpu[name] / cpu[c]:.3f} |"
        )
    return "\n".join(lines)


def table_adafactor(name, shapes):
    """Temporary memory of Adafactor with GC on the update, three ways."""
    params = make_tree(shapes, 0)
    variants = {
        "optax.adafactor": optax.adafactor(1e-2),
        "chain(adafactor, centralize()) [update, plain]": optax.chain(
            optax.adafactor(1e-2), optax_gc.centralize()
        ),
        "with_gc(adafactor) [update]": optax_gc.with_gc(
            optax.adafactor(1e-2), location="update"
        ),
    }
    memory = {}
    for label, tx in variants.items():

        @functools.partial(jax.jit, donate_argnums=(0, 2))
        def step(p, g, s, tx=tx):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        state = tx.init(params)
        compiled = step.lower(params, params, state).compile()
        memory[label] = harness.memory_stats(compiled, state)
    return {
        "tree": f"{name}: adafactor temporary memory",
        "param_bytes": harness.tree_bytes(params),
        "memory": memory,
        "rows": [],
        "baseline": "optax.adafactor",
    }


def fmt_adafactor(result):
    lines = [
        f"\n## {result['tree']}",
        "",
        "| variant | temp | x param bytes |",
        "|---|---:|---:|",
    ]
    for name, m in result["memory"].items():
        temp = m.get("temp_size_in_bytes")
        if temp is None:
            lines.append(f"| {name} | n/a | n/a |")
            continue
        lines.append(
            f"| {name} | {temp / 2**20:.2f} MiB | {temp / result['param_bytes']:.3f} |"
        )
    return "\n".join(lines)


# --- targets ------------------------------------------------------------------


class Target(NamedTuple):
    """One target of the overhead issues, read from one kind of table.

    ``numerator`` is a row label, or a tag in brackets that every matching
    row's label carries (``"[update]"``); ``denominator`` is a row label, or
    ``None`` for the table's baseline. ``measure`` is ``"time"`` (the ratio of
    median seconds) or ``"temp"`` (the numerator's temporary memory minus the
    denominator's, over the parameter bytes). ``baselines`` limits a target to
    tables with one of these baselines.
    """

    table: str
    numerator: str
    denominator: str | None
    target: float
    what: str
    measure: str = "time"
    baselines: tuple[str, ...] = ()


TARGETS = (
    Target(
        "transforms",
        "optax_gc.centralize",
        "naive g - g.mean(fan_in)",
        1.0,
        "{tree}: centralize / naive",
    ),
    Target(
        "transforms",
        "optax_gc.centralize",
        "copy (roofline proxy)",
        1.25,
        "{tree}: centralize / copy (stretch)",
    ),
    Target("optimizer", "[update]", None, 1.35, "{tree}: {row} / {base}"),
    Target(
        "optimizer",
        "[gradient]",
        None,
        1.05,
        "{tree}: {row} / {base}, step",
        baselines=("optax.adam",),
    ),
    Target(
        "update_only",
        "chain(centralize(), adam) [gradient]",
        "optax.adam",
        1.05,
        "{tree}: {row} / adam, update only",
    ),
    Target(
        "train_step", "gc_adam (update)", "adam", 1.05, "train step: {row} / adam, time"
    ),
    Target(
        "train_step",
        "gc_adam (update)",
        "adam",
        0.05,
        "train step: {row} temp - adam's, x param bytes",
        measure="temp",
    ),
    Target(
        "compile_step",
        "with_gc(adam) [update]",
        "optax.adam",
        1.6,
        "{tree}: compile, {row} / {base}",
    ),
    Target(
        "compile_step",
        "with_gc(adam) [update]",
        "chain(adam, centralize()) [update, plain]",
        1.0,
        "{tree}: compile, {row} / {base}",
    ),
    Target(
        "compile_step",
        "with_gc(adam) [update]" + ACCELERATOR,
        "chain(adam, centralize()) [update, plain]" + ACCELERATOR,
        1.05,
        "{tree}: compile, {row} / {base}",
    ),
    Target(
        "adafactor",
        "with_gc(adafactor) [update]",
        "chain(adafactor, centralize()) [update, plain]",
        0.0,
        "{tree}: {row} temp - {base}'s, x param bytes",
        measure="temp",
    ),
)


def _measure(result, target, row, over):
    if target.measure == "time":
        seconds = {name: sec for name, sec, _ in result["rows"]}
        return seconds[row] / seconds[over]
    memory = result["memory"]
    temp = memory[row].get("temp_size_in_bytes")
    if temp is None:  # a backend without memory analysis
        return None
    return (temp - memory[over]["temp_size_in_bytes"]) / result["param_bytes"]


def targets(results, table=TARGETS):
    """Every target in ``table`` met by the results: ``(what, measured, target)``."""
    out = []
    for res in results:
        tree = res["tree"].split(":")[0]
        for t in table:
            if t.table != res.get("kind"):
                continue
            if t.baselines and res["baseline"] not in t.baselines:
                continue
            over = t.denominator or res["baseline"]
            tagged = t.numerator.startswith("[")
            names = [name for name, _, _ in res["rows"]] or list(res.get("memory", {}))
            rows = [
                name
                for name in names
                if (t.numerator in name if tagged else name == t.numerator)
            ]
            for row in rows:
                value = _measure(res, t, row, over)
                if value is not None:
                    what = t.what.format(tree=tree, row=row, base=over)
                    out.append((what, value, t.target))
    return out


def fmt_targets(rows):
    lines = [
        "\n## Targets",
        "",
        "| ratio | measured | target | met |",
        "|---|---:|---:|---|",
    ]
    for what, value, target in rows:
        met = "yes" if value <= target else "**no**"
        lines.append(f"| {what} | {value:.3f} | ≤ {target:.2f} | {met} |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------


def fmt_table(result):
    lines = [
        f"\n## {result['tree']}",
        "",
        f"| variant | median | x {result['baseline']} |",
        "|---|---:|---:|",
    ]
    for name, seconds, ratio in result["rows"]:
        unit = f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"
        lines.append(f"| {name} | {unit} | {ratio:.3f} |")
    if "memory" in result:
        lines += [
            "",
            "| variant | peak (args+out+temp-alias) | temp | opt state |",
            "|---|---:|---:|---:|",
        ]
        for name, m in result["memory"].items():
            peak = m.get("peak_estimate_bytes")
            temp = m.get("temp_size_in_bytes")
            lines.append(
                f"| {name} | {peak / 2**20:.2f} MiB | {temp / 2**20:.2f} MiB "
                f"| {m['opt_state_bytes'] / 2**20:.2f} MiB |"
                if peak is not None
                else f"| {name} | n/a | n/a | {m['opt_state_bytes'] / 2**20:.2f} MiB |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="tiny trees, few repeats")
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    repeats = 3 if args.tiny else args.repeats

    if args.tiny:
        trees = {"tiny": (tiny_shapes(), -1)}
        compile_shapes = small_kernels_shapes(20)
    else:
        trees = {"ResNet-50": (resnet50_shapes(), -1)}
        if not args.skip_gpt2:
            trees["GPT-2 small"] = (gpt2_small_shapes(), GPT2_RULES)
        compile_shapes = small_kernels_shapes(1000)

    device = jax.devices()[0]
    header = (
        f"device: {device.device_kind} ({jax.default_backend()}), "
        f"{jax.device_count()} device(s); jax {jax.__version__}, "
        f"optax {optax.__version__}, optax_gc {optax_gc.__version__}; "
        f"{platform.machine()}, {repeats} repeats, median"
    )
    print(header, flush=True)
    results = []
    first = next(iter(trees))
    for name, (shapes, axes) in trees.items():
        n = sum(math.prod(s) for s in shapes.values())
        label = f"{name}: {n / 1e6:.1f}M params, {len(shapes)} leaves"
        transform_axes = -1 if callable(axes) else axes
        res = table_transforms(label, shapes, repeats, transform_axes)
        res["kind"] = "transforms"
        if callable(axes):  # GPT-2: our per-leaf rules vs plain -1
            tree = make_tree(shapes)
            rules_fn = jax.jit(functools.partial(optax_gc_tree, output_axes=axes))
            med, _ = harness.interleaved(
                {"copy": jax.jit(copy_tree), "rules": rules_fn},
                lambda _, tree=tree: (tree,),
                repeats,
            )
            res["rows"].append(
                (
                    "optax_gc.centralize (transformer path_rules)",
                    med["rules"],
                    med["rules"] / med["copy"],
                )
            )
        results.append(res)
        print(fmt_table(res), flush=True)
        for base in ("adam", "adamw", "lion"):
            res = table_optimizer(
                f"{name}: {base} update + apply, donated buffers",
                shapes,
                repeats,
                axes,
                base,
            )
            res["kind"] = "optimizer"
            results.append(res)
            print(fmt_table(res), flush=True)
        if name == first:
            res = table_update_only(f"{name}: adam update alone", shapes, repeats)
            res["kind"] = "update_only"
            results.append(res)
            print(fmt_table(res), flush=True)
    res = table_train_step(repeats, args.tiny)
    res["kind"] = "train_step"
    results.append(res)
    print(fmt_table(res), flush=True)
    state = optax_gc.centralize().init(make_tree(trees[next(iter(trees))][0]))
    state_bytes = harness.tree_bytes(state)
    print(f"\noptax_gc.centralize() state: {state!r}, {state_bytes} bytes")
    res = table_compile(compile_shapes, 1 if args.tiny else max(5, repeats // 3))
    results.append(res)
    print(fmt_table(res), flush=True)
    name, (shapes, _) = first, trees[first]
    res = table_compile_step(name, shapes, 1 if args.tiny else max(5, repeats // 6))
    res["kind"] = "compile_step"
    results.append(res)
    print(fmt_compile(res), flush=True)
    tree = ("tiny", tiny_shapes()) if args.tiny else adafactor_tree()
    res = table_adafactor(*tree)
    res["kind"] = "adafactor"
    results.append(res)
    print(fmt_adafactor(res), flush=True)

    goals = targets(results)
    print(fmt_targets(goals), flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"overhead-{jax.default_backend()}{'-tiny' if args.tiny else ''}.json"
    path.write_text(
        json.dumps(
            {
                "header": header,
                "device": str(device),
                "device_kind": device.device_kind,
                "backend": jax.default_backend(),
                "versions": harness.versions(),
                "argv": sys.argv[1:] if argv is None else argv,
                "shapes": {
                    name: {k: list(v) for k, v in s.items()}
                    for name, (s, _) in trees.items()
                },
                "tables": [{k: v for k, v in r.items()} for r in results],
                "targets": [
                    {"ratio": w, "measured": v, "target": t, "met": v <= t}
                    for w, v, t in goals
                ],
            },
            indent=1,
        )
    )
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
