"""What ``infer_output_axes`` costs, as a ratio to one ``jax.make_jaxpr``.

    python -m benchmarks.inference            # GPT-2 small, 996 leaves, nn.scan
    python -m benchmarks.inference --tiny     # seconds: smoke test

Run it from the repository root. Inference traces the model once (one
``make_jaxpr``) and then walks the jaxpr; the target is a total at most twice
one ``make_jaxpr`` of the same function. ``make_jaxpr`` caches traces by
function, so every round wraps the model in a fresh function for both timings,
and the two are interleaved round by round on this noisy machine. Parameters
and inputs are ``jax.ShapeDtypeStruct`` (nothing is allocated or run). The
decisions are static, so none of this is paid per training step
(``tests/infer/test_interpreter.py::test_decisions_are_static``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import optax_gc
from benchmarks import harness
from benchmarks.models import GPT2


class _ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(4)(h, h)
        h = nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1])(nn.gelu(h)), None


class ScannedLM(nn.Module):
    """24 transformer blocks under ``nn.scan(nn.remat(...))``: loops timed too."""

    layers: int = 24
    d: int = 64

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(1000, self.d)
        stack = nn.scan(
            nn.remat(_ScannedBlock),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = stack(name="layers")(embed(tokens), None)
        return embed.attend(nn.LayerNorm()(x))


def models(tiny: bool):
    """``{name: (module, tokens spec)}``: GPT-2 small, a 996-leaf GPT-2, and
    24 scanned blocks."""
    if tiny:
        return {"gpt2-tiny": (GPT2(2, 16, 2, 50, 8), (1, 8))}
    return {
        "gpt2-small (196 leaves, 124M)": (GPT2(), (1, 1024)),
        "gpt2-62-layers (996 leaves)": (GPT2(62, 64, 4, 1000, 64), (1, 64)),
        "nn.scan(nn.remat) x24": (ScannedLM(), (1, 64)),
    }


def measure(module, tokens_shape, rounds):
    tokens = jax.ShapeDtypeStruct(tokens_shape, jnp.int32)
    params = jax.eval_shape(module.init, jax.random.key(0), tokens)["params"]

    def fresh():
        return lambda p, t: module.apply({"params": p}, t)

    trace, infer = [], []
    for _ in range(rounds + 1):  # the first round warms up
        t0 = time.perf_counter()
        jax.make_jaxpr(fresh())(params, tokens)
        t1 = time.perf_counter()
        rule = optax_gc.infer_output_axes(fresh(), params, tokens)
        t2 = time.perf_counter()
        trace.append(t1 - t0)
        infer.append(t2 - t1)
    trace, infer = trace[1:], infer[1:]
    ratios = [b / a for a, b in zip(trace, infer, strict=True)]
    table = optax_gc.explain(params, output_axes=rule)
    return {
        "leaves": len(table),
        "make_jaxpr_s": statistics.median(trace),
        "infer_s": statistics.median(infer),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "summary": table.summary,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tiny", action="store_true", help="a tiny model, two rounds")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    rounds = 2 if args.tiny else args.rounds
    results = {}
    print(f"{'model':32s} {'leaves':>6s} {'make_jaxpr':>11s} {'infer':>8s} ratio")
    for name, (module, shape) in models(args.tiny).items():
        r = measure(module, shape, rounds)
        results[name] = r
        print(
            f"{name:32s} {r['leaves']:6d} {r['make_jaxpr_s']:10.3f}s "
            f"{r['infer_s']:7.3f}s {r['ratio']:5.2f}x  (target <= 2x)"
        )
        print(f"  {r['summary']}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"inference{'-tiny' if args.tiny else ''}.json"
    meta = {
        **harness.versions(),
        "rounds": rounds,
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
