"""mlx-steer benchmarks: where we stand, as ratios measured in one run.

Workloads (issue 6); each figure is the median of --runs runs after a warm-up,
with A/B variants interleaved run by run so that load from other processes
hits both sides alike:

  overhead    1. batch-1 decode tok/s: steered (lab) vs plain mlx-lm
                 (`mlx_lm.stream_generate`, steering blocks uninstalled), same
                 prompt and number of tokens (EOS banned on both sides)
  extraction  2. the 17 built-in concepts at every layer, cold (empty cache)
  calibration    choosing a concept's default block and strength from generated text
                 (mlx_steer/calibrate.py), per concept, next to its extraction
  compare     3. baseline + steered (2 rows, 50 tokens, one batch) vs one plain generation
  sweeps      4. layer sweep (baseline + 8 layers, 30 tokens) and strength sweep
                 (5 strengths, 30 tokens): one batch vs the same variants one by one
  coldstart   5. process start -> model loaded -> built-ins ready -> first steered
                 token, with a warm concept cache and an empty one (child processes)
  bandwidth   6. batch-1 decode tok/s against the memory-bandwidth limit (bytes of
                 weights read per token / measured read bandwidth), peak memory
  prefill        prefill tok/s of a ~400-token prompt by chunk size (128 ... 2048)
  shared         a layer sweep's prefill (baseline + 8 layers, one 400-token prompt)
                 with the shared prompt prefix computed once, against one row's
                 prefill and against every row prefilled (steering "generated" tokens,
                 then "all", which differs from position 1: shared by layer instead)
  preload        batch-1 decode in child processes: MLX's BLAS, OpenBLAS,
                 OpenBLAS + sgemv shim, + tcmalloc (the fast CPU path, Linux)
  step           ms per decode step at 8 rows (a layer sweep) against 1 steered row
  kernel         one block's gate + up products at 1 and 8 rows (us, GFLOP/s)
  blas           the BLAS behind the shim, in child processes: Debian's OpenBLAS, PyPI's
                 scipy-openblas32 and (--mkl PATH to libmkl_rt of PyPI's `mkl` wheel)
                 MKL: 400-token prefill, batch-1 and 16-row decode, greedy tokens
  reference   7. the same machine and GGUF through other tools, in child processes of the
                 `bench` extra's interpreter (`make bench-setup`; --reference-python):
                 the original lab's method in PyTorch + transformers (forward hooks,
                 one `generate` per variant, last-token vectors of one pair at 3
                 layers; scripts/bench_original.py) for workloads 2-4, and llama.cpp
                 (llama-cpp-python, control vectors; scripts/bench_llamacpp.py) for
                 batch-1 decode and 8 variants in turn. Needs overhead, extraction,
                 compare and sweeps in the same run (added when missing).

Usage (run it the way users run the lab, i.e. with the fast path preloaded):

    LD_PRELOAD=$(.venv/bin/python -m mlx_steer.fastpath) .venv/bin/python scripts/bench.py
    .venv/bin/python scripts/bench.py --only overhead,bandwidth --runs 5 --json out.json
    .venv/bin/python scripts/bench.py --model mlx-community/... --only overhead

CPU time per token (user+sys of the whole process, all threads) is reported
next to wall-clock speed: on a shared machine it is the steadier figure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

from bench_common import cpu_seconds, machine, sweep_layers

SECTIONS = ("overhead", "extraction", "calibration", "compare", "sweeps", "coldstart",
            "bandwidth", "prefill", "shared", "step", "kernel", "preload", "blas", "reference")
DEFAULT = ("overhead", "extraction", "calibration", "compare", "sweeps", "coldstart",
           "bandwidth", "prefill", "shared", "reference")
CALIBRATION_CONCEPTS = ("happy", "sad", "pirate")
NEEDED_BY_REFERENCE = ("overhead", "extraction", "compare", "sweeps")
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Write a long story about a dragon who learns to bake bread."
CONCEPT = "happy"

ROWS: list[dict] = []  # the table
OURS: dict = {}  # our figures that workload 7 compares with the references


def row(section: str, workload: str, ours: float | None, unit: str, *,
        reference: float | None = None, ref_label: str = "", ratio: float | None = None,
        target: str = "", ok: bool | None = None, note: str = "", **extra) -> dict:
    r = {"section": section, "workload": workload, "ours": ours, "unit": unit,
         "reference": reference, "reference_label": ref_label, "ratio": ratio,
         "target": target, "met": ok, "note": note, **extra}
    ROWS.append(r)
    return r


def med(xs):
    return statistics.median(xs) if xs else None


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: bool = True
                ) -> dict[str, list]:
    """Run each fn once (warm-up), then `runs` rounds of all of them in turn.

    A fn returns a number (its own measurement) or None (then its wall time is used).
    """
    if warmup:
        for f in fns.values():
            f()
    out: dict[str, list] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            v = f()
            out[k].append(time.perf_counter() - t if v is None else v)
    return out


# ---- shared pieces ---------------------------------------------------------------

def load_lab(name):
    import mlx_steer

    return mlx_steer.load(name)


def concept_or_none(lab):
    try:
        return lab.concept(CONCEPT)
    except Exception:  # a model without concepts yet: fall back to a crude direction
        return None


def demo_steers(lab, layers=None, strengths=None):
    """Steers of the 'happy' concept (built-in) or a crude contrast direction."""
    from mlx_steer import Steer

    c = concept_or_none(lab)
    L = lab.num_layers
    if c is not None:
        if strengths is not None:
            return [c.steer(c.layer, s) for s in strengths], c.layer
        return [c.steer(layer) for layer in layers], c.layer
    h = lab.hidden_states_batch(["I feel wonderful and joyful today!", "I feel neutral today."])
    layer = L // 2

    def vec(i):
        v = h[0][i, -1] - h[1][i, -1]
        return v / (float((v * v).sum()) ** 0.5 + 1e-9) * float(
            (h[1][i, 1:] ** 2).sum(-1).mean() ** 0.5)

    if strengths is not None:
        return [Steer(vec(layer), layer, s) for s in strengths], layer
    return [Steer(vec(i), i, 0.3) for i in layers], layer


def decode_once(lab, steer, n: int, plain: bool = False, prompt: str = PROMPT) -> dict:
    """One batch-1 greedy generation of exactly `n` tokens through mlx-lm's
    `stream_generate`; returns decode tok/s, CPU ms per token and tokens."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_steer.models import base
    from mlx_steer.steer import as_steers

    toks = lab.encode(prompt, chat=True)
    model = lab.model
    eos = sorted(lab.tokenizer.eos_token_ids)
    ban = mx.zeros((1, model.args.vocab_size))
    ban[:, eos] = -mx.inf

    def no_eos(tokens, logits):  # the same number of tokens whatever the steering
        return logits + ban

    if plain:
        base.uninstall(model)
        cache = make_prompt_cache(model)
    else:
        cache = base.make_caches(model, base.build_plans([as_steers(steer)], [len(toks)]))
    try:
        t0 = c0 = None
        k = 0
        for r in stream_generate(model, lab.tokenizer, mx.array(toks), max_tokens=n,
                                 sampler=lambda lp: mx.argmax(lp, axis=-1),
                                 logits_processors=[no_eos], prompt_cache=cache):
            k += 1
            if t0 is None:
                t0, c0 = time.perf_counter(), cpu_seconds()
        t1, c1 = time.perf_counter(), cpu_seconds()
    finally:
        if plain:
            base.install(model)
    return {"tps": (k - 1) / (t1 - t0), "cpu_ms": (c1 - c0) / (k - 1) * 1000, "tokens": k}


def batch_decode_once(lab, rows, n: int) -> dict:
    """Batched greedy decode of `rows` (prompt, steer): decode rows*tok/s (prefill
    excluded, from the per-step progress callback) and CPU ms per step."""
    marks = []

    def progress(step, total):
        marks.append((time.perf_counter(), cpu_seconds()))

    lab.generate_batch_tokens(rows, max_tokens=n, progress=progress)
    (t0, c0), (t1, c1) = marks[0], marks[-1]
    steps = len(marks) - 1
    return {"rows_tps": len(rows) * steps / (t1 - t0), "cpu_ms_step": (c1 - c0) / steps * 1000}


# ---- 1. steering overhead -----------------------------------------------------

def bench_overhead(lab, args) -> dict:
    (steer,), _ = demo_steers(lab, strengths=[0.3])
    n = args.tokens
    res: dict[str, list[dict]] = {"plain": [], "installed": [], "steered": []}
    fns = {
        "plain": lambda: res["plain"].append(decode_once(lab, None, n, plain=True)),
        "installed": lambda: res["installed"].append(decode_once(lab, None, n)),
        "steered": lambda: res["steered"].append(decode_once(lab, steer, n)),
    }
    interleaved(fns, args.runs)
    m = {k: {"tps": med([x["tps"] for x in v[1:]]), "cpu_ms": med([x["cpu_ms"] for x in v[1:]])}
         for k, v in res.items()}  # v[0] is the warm-up
    ratio = m["plain"]["tps"] / m["steered"]["tps"]
    cpu_ratio = m["steered"]["cpu_ms"] / m["plain"]["cpu_ms"]
    row("1 overhead", f"batch-1 decode, steered (layer {steer.layer}), {n} tokens",
        m["steered"]["tps"], "tok/s", reference=m["plain"]["tps"], ref_label="plain mlx-lm",
        ratio=ratio, target="<= 1.03x", ok=ratio <= 1.03,
        note=f"CPU {m['steered']['cpu_ms']:.0f} vs {m['plain']['cpu_ms']:.0f} ms/token "
             f"({cpu_ratio:.3f}x)", cpu_ms=m["steered"]["cpu_ms"],
        cpu_ms_plain=m["plain"]["cpu_ms"], cpu_ratio=cpu_ratio)
    row("1 overhead", "batch-1 decode, blocks installed, no steering",
        m["installed"]["tps"], "tok/s", reference=m["plain"]["tps"], ref_label="plain mlx-lm",
        ratio=m["plain"]["tps"] / m["installed"]["tps"], target="<= 1.03x",
        ok=m["plain"]["tps"] / m["installed"]["tps"] <= 1.03,
        note=f"CPU {m['installed']['cpu_ms']:.0f} ms/token", cpu_ms=m["installed"]["cpu_ms"])
    OURS["steered_tps"] = m["steered"]["tps"]
    return m


# ---- 2. extraction ------------------------------------------------------------

def bench_extraction(lab, args) -> None:
    """All 17 built-in concepts at every layer, from an empty concept cache."""
    import mlx_steer

    if not hasattr(mlx_steer.Lab, "ensure_builtins"):  # placeholder until concepts land
        row("2 extraction", "17 built-ins, every layer, cold", None, "s",
            note="not available: this version has no Lab.ensure_builtins")
        return
    old = os.environ.get("MLX_STEER_HOME")
    times = []
    try:
        for i in range(max(1, args.extraction_runs)):
            with tempfile.TemporaryDirectory(prefix="mlx-steer-bench-") as home:
                os.environ["MLX_STEER_HOME"] = home
                fresh = mlx_steer.Lab(lab.model, lab.tokenizer, lab.name, lab.context_length)
                t = time.perf_counter()
                cs = fresh.ensure_builtins(progress=lambda done, total: None)
                times.append(time.perf_counter() - t)
    finally:
        if old is None:
            os.environ.pop("MLX_STEER_HOME", None)
        else:
            os.environ["MLX_STEER_HOME"] = old
    OURS["extraction_s"] = med(times)
    row("2 extraction", f"{len(cs)} built-ins x {lab.num_layers} layers, cold (incl. "
        "calibration of block and strength)", med(times), "s",
        note=f"{med(times) / len(cs):.2f} s per concept; runs: "
             + ", ".join(f"{t:.1f}" for t in times))

    # The same concepts without the calibration, and with the original's data
    # (each built-in's single seed pair, last token): every layer from one batched pass.
    from mlx_steer import activations, extract
    from mlx_steer.catalogue import builtin_spec

    specs = {c.name: builtin_spec(c.name) for c in cs}
    seed_texts = [t for sp in specs.values() for t in sp["seed_pair"]]

    def nocal():
        for name, sp in specs.items():
            extract.extract(lab, name, [tuple(x) for x in sp["pairs"]], calibrate=False,
                            chat=sp.get("template") == "chat")

    def seed():
        pooled, _ = activations.capture(lab, seed_texts)
        pooled[0::2] - pooled[1::2]  # the 17 vectors at every layer

    t = interleaved({"nocal": nocal, "seed": seed}, args.runs)
    OURS["extraction_nocal_s"], OURS["extraction_seed_s"] = med(t["nocal"]), med(t["seed"])
    row("2 extraction", f"{len(cs)} built-ins x {lab.num_layers} layers, no calibration",
        OURS["extraction_nocal_s"], "s", note="the pairs of each built-in, one batched pass "
        "per concept")
    row("2 extraction", f"{len(cs)} seed pairs (1 per concept) x {lab.num_layers} layers",
        OURS["extraction_seed_s"], "s", note=f"{len(seed_texts)} texts in one batched pass: "
        "the original's data")


# ---- calibration ------------------------------------------------------------------

@contextlib.contextmanager
def unshared():
    """Calibration as computed before prompt sharing, for the ratio: every row's
    prompt prefilled whole in the decode, and every scored sequence run whole."""
    from mlx_steer import experiments, generation, scoring

    saved = generation.prefill_batch, experiments.score
    generation.prefill_batch = functools.partial(saved[0], share=False)
    experiments.score = functools.partial(scoring.score, share=False)
    try:
        yield
    finally:
        generation.prefill_batch, experiments.score = saved


def bench_calibration(lab, args) -> None:
    """Seconds per concept: extraction without calibration, and the calibration
    (one batched decode of the grid + teacher-forced scoring), interleaved; and the
    calibration computed without prompt sharing (`unshared`), for the ratio."""
    from mlx_steer import calibrate, extract
    from mlx_steer.catalogue import builtin_spec

    concepts = {n: extract.extract(lab, n, [tuple(x) for x in builtin_spec(n)["pairs"]],
                                   calibrate=False) for n in CALIBRATION_CONCEPTS}
    cpu: dict[str, list] = {"extract": [], "calibrate": [], "unshared": []}
    alphas = (calibrate.ALPHAS if args.calibration_alphas is None
              else [float(a) for a in args.calibration_alphas.split(",")])
    chosen: dict[str, set] = {}

    def cal(name):
        c = calibrate.calibrate(lab, concepts[name], alphas=alphas,
                                instruction=builtin_spec(name)["instruction"],
                                progress=lambda d, t: None)
        chosen.setdefault(name, set()).add((c.layer, c.strength, c.steers))

    def cal_unshared(name):
        with unshared():
            cal(name)

    def timed(kind, fn):
        def f():
            c0, t0 = cpu_seconds(), time.perf_counter()
            for name in CALIBRATION_CONCEPTS:
                fn(name)
            cpu[kind].append((cpu_seconds() - c0) / len(CALIBRATION_CONCEPTS))
            return (time.perf_counter() - t0) / len(CALIBRATION_CONCEPTS)
        return f

    t = interleaved({
        "extract": timed("extract", lambda n: extract.extract(
            lab, n, [tuple(x) for x in builtin_spec(n)["pairs"]], calibrate=False)),
        "calibrate": timed("calibrate", cal),
        "unshared": timed("unshared", cal_unshared),
    }, args.runs, warmup=False)
    rows = len(calibrate.candidate_blocks(lab.num_layers)) * len(alphas) + 1
    grid = (f"{rows * calibrate.N_PROMPTS} rows ({calibrate.N_PROMPTS} prompts x "
            f"({len(calibrate.candidate_blocks(lab.num_layers))} blocks x "
            f"{len(alphas)} strengths {'/'.join(f'{a:g}' for a in alphas)} + unsteered)), "
            f"{calibrate.MAX_TOKENS} tokens")
    OURS["calibration_s"] = med(t["calibrate"])
    row("calibration", "extraction per concept, no calibration", med(t["extract"]), "s",
        note=f"{', '.join(CALIBRATION_CONCEPTS)}; CPU {med(cpu['extract']):.1f} s")
    row("calibration", "calibration per concept", med(t["calibrate"]), "s", target="<= 10 s",
        ok=med(t["calibrate"]) <= 10, note=f"{grid}; CPU {med(cpu['calibrate']):.1f} s "
        "(user+sys, all threads); runs: " + ", ".join(f"{x:.1f}" for x in t["calibrate"]))
    same = all(len(v) == 1 for v in chosen.values())
    row("calibration", "calibration per concept without prompt sharing", med(t["unshared"]),
        "s", note=f"ratio shared/unshared {med(t['calibrate']) / med(t['unshared']):.2f} "
        f"(CPU {med(cpu['calibrate']) / med(cpu['unshared']):.2f}); same defaults chosen "
        f"both ways: {'yes' if same else 'NO'}; runs: "
        + ", ".join(f"{x:.1f}" for x in t["unshared"]))


# ---- 3. compare ------------------------------------------------------------------

def bench_compare(lab, args) -> None:
    (steer,), _ = demo_steers(lab, strengths=[0.3])
    n = 50
    out = {}

    def batched():
        out["b"] = lab.generate_batch_tokens([(PROMPT, None), (PROMPT, steer)], max_tokens=n)

    def one():
        out["o"] = lab.generate(PROMPT, None, max_tokens=n)

    t = interleaved({"batched": batched, "one": one}, args.runs)
    b, o = med(t["batched"]), med(t["one"])
    OURS["compare_s"], OURS["compare_layer"] = b, steer.layer
    toks = [len(r.tokens) for r in out["b"]]
    same = out["b"][0].text == out["o"]
    row("3 compare", f"baseline + steered, {n} tokens, one batch", b, "s", reference=o,
        ref_label="one plain generation", ratio=b / o, target="(vs original: <= 0.6x)",
        note=f"rows {toks} tokens; baseline row == lone generation: {same}; "
             f"vs two generations {b / (2 * o):.2f}x")


# ---- 4. sweeps ---------------------------------------------------------------------

def bench_sweeps(lab, args) -> None:
    L = lab.num_layers
    layers = sweep_layers(L)
    lsteers, _ = demo_steers(lab, layers=layers)
    ssteers, slayer = demo_steers(lab, strengths=[0.1, 0.2, 0.3, 0.4, 0.5])
    n = 30
    OURS.update(sweep_layers=layers, strength_layer=slayer)
    for key, name, steers, target in (
            ("layer_sweep_s", f"layer sweep: baseline + {len(lsteers)} layers", [None] + lsteers,
             "(vs original: <= 0.25x)"),
            ("strength_sweep_s", f"strength sweep: 5 strengths at layer {slayer}", ssteers,
             "(vs original: <= 0.3x)")):
        rows = [(PROMPT, s) for s in steers]
        out = {}

        def batched(rows=rows):
            out["b"] = [r.text for r in lab.generate_batch_tokens(rows, max_tokens=n)]

        def alone(rows=rows):
            out["a"] = [lab.generate(p, s, max_tokens=n) for p, s in rows]

        t = interleaved({"batched": batched, "alone": alone}, args.runs)
        b, a = med(t["batched"]), med(t["alone"])
        OURS[key] = b
        row("4 sweeps", f"{name}, {n} tokens, one batch", b, "s", reference=a,
            ref_label="same variants one by one", ratio=b / a, target=target,
            note=f"{len(rows)} rows: {len(rows) * n / b:.1f} rows*tok/s batched vs "
                 f"{len(rows) * n / a:.1f}; rows == one by one: {out['b'] == out['a']}")
    # The 8 layer variants alone (no baseline row): what llama.cpp runs in turn in workload 7.
    rows8 = [(PROMPT, s) for s in lsteers]

    def batched8():
        lab.generate_batch_tokens(rows8, max_tokens=n)

    t8 = interleaved({"batched": batched8}, args.runs)
    OURS["sweep8_s"] = med(t8["batched"])
    row("4 sweeps", f"layer sweep: {len(rows8)} layers, no baseline, {n} tokens, one batch",
        OURS["sweep8_s"], "s", note=f"{len(rows8) * n / OURS['sweep8_s']:.1f} rows*tok/s "
        "(compared with llama.cpp in workload 7)")


# ---- 5. cold start ----------------------------------------------------------------

COLD_CHILD = textwrap.dedent("""
    import json, sys, time
    t = {"python_up": time.time()}
    import mlx_steer
    t["imported"] = time.time()
    lab = mlx_steer.load(sys.argv[1] or None)
    t["loaded"] = time.time()
    if hasattr(lab, "ensure_builtins"):
        lab.ensure_builtins(progress=lambda d, n: None)
        steer = lab.concept("happy").steer()
    else:
        import numpy as np
        steer = mlx_steer.Steer(np.ones(lab.hidden_size, np.float32), lab.num_layers // 2, 0.5)
    t["builtins"] = time.time()
    next(iter(lab.stream("Tell me about your weekend.", steer, max_tokens=4)))
    t["first_token"] = time.time()
    print("BENCH " + json.dumps(t))
""")


def cold_start_once(model: str | None, home: str) -> dict:
    env = {**os.environ, "MLX_STEER_HOME": home, "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", COLD_CHILD, model or ""], env=env,
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {p.stderr[-2000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("BENCH "))
    return {k: v - t0 for k, v in json.loads(line[6:]).items()}


def bench_coldstart(lab, args) -> None:
    warm_home = tempfile.mkdtemp(prefix="mlx-steer-bench-warm-")
    cold_start_once(args.model, warm_home)  # fills the warm cache (and the OS file cache)
    res = {"warm": [], "empty": []}
    for i in range(args.runs):
        res["warm"].append(cold_start_once(args.model, warm_home))
        if i < args.cold_empty_runs:  # each extracts every built-in: minutes
            with tempfile.TemporaryDirectory(prefix="mlx-steer-bench-empty-") as h:
                res["empty"].append(cold_start_once(args.model, h))
    for kind, rs in res.items():
        if not rs:
            continue
        m = {k: med([r[k] for r in rs]) for k in rs[0]}
        target = "<= 3 s" if kind == "warm" else ""
        row("5 cold start", f"process start -> first steered token, {kind} concept cache",
            m["first_token"], "s", target=target,
            ok=(m["first_token"] <= 3.0) if kind == "warm" else None,
            note=f"python up {m['python_up']:.2f}, import {m['imported']:.2f}, "
                 f"loaded {m['loaded']:.2f}, built-ins {m['builtins']:.2f}, "
                 f"first token {m['first_token']:.2f} s", stages=m)


# ---- 6. bandwidth -------------------------------------------------------------------

def read_bandwidth(gib: float = 1.0) -> dict:
    """Read bandwidth (GB/s) of a numpy sum over a large float32 array: 1 and all threads."""
    import numpy as np

    a = np.ones(int(gib * 2**30) // 4, np.float32)
    a.sum()

    def best(fn, k=3):
        out = []
        for _ in range(k):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return min(out)

    one = a.nbytes / best(lambda: a.sum()) / 1e9
    n = os.cpu_count() or 1
    parts = np.array_split(a, n)

    def par():
        ts = [threading.Thread(target=p.sum) for p in parts]
        [t.start() for t in ts]
        [t.join() for t in ts]

    allt = a.nbytes / best(par) / 1e9
    del a
    return {"one_thread": one, "all_threads": allt, "threads": n}


def weight_bytes_per_token(lab) -> int:
    """Bytes of parameters read for one decoded token (embedding: one row, unless tied)."""
    from mlx.utils import tree_flatten

    total = sum(v.nbytes for _, v in tree_flatten(lab.model.parameters()))
    tied = getattr(lab.model.args, "tie_word_embeddings", False)
    if not tied:
        emb = sum(v.nbytes for k, v in tree_flatten(lab.model.parameters())
                  if k.startswith("model.embed_tokens."))
        total -= emb
    return total


def twin_bytes_per_token(lab) -> int | None:
    """Bytes read per token when the fast path's quantised twins are registered: the
    twins' bytes, scales and biases in place of their float32 matrices (else None)."""
    from mlx_steer.fastpath import twins

    live = twins._LIVE.get(id(lab.model))
    if not live:
        return None
    f32 = sum(w.nbytes for w, *_ in live)
    return weight_bytes_per_token(lab) - f32 + sum(q.nbytes + s.nbytes + b.nbytes
                                                   for _, q, s, b in live)


def bench_bandwidth(lab, args, decode: dict | None = None) -> None:
    import mlx.core as mx

    if decode is None:
        rs = [decode_once(lab, None, args.tokens, plain=True) for _ in range(args.runs + 1)][1:]
        decode = {"plain": {"tps": med([r["tps"] for r in rs]),
                            "cpu_ms": med([r["cpu_ms"] for r in rs])}}
    bw = read_bandwidth()
    per_tok = weight_bytes_per_token(lab)
    best_bw = max(bw["one_thread"], bw["all_threads"])
    limit = best_bw * 1e9 / per_tok
    tps = decode["plain"]["tps"]
    row("6 bandwidth", "batch-1 decode vs memory-bandwidth limit", tps, "tok/s",
        reference=limit, ref_label=f"{per_tok / 1e6:.0f} MB/token at {best_bw:.1f} GB/s",
        ratio=tps / limit, target=">= 0.50", ok=tps / limit >= 0.5,
        note=f"read bandwidth {bw['one_thread']:.1f} GB/s (1 thread), "
             f"{bw['all_threads']:.1f} GB/s ({bw['threads']} threads); CPU "
             f"{decode['plain']['cpu_ms']:.0f} ms/token = "
             f"{per_tok / 1e6 / decode['plain']['cpu_ms']:.1f} GB/s per busy core",
        bandwidth=bw, bytes_per_token=per_tok)
    twin = twin_bytes_per_token(lab)
    if twin:
        tlimit = best_bw * 1e9 / twin
        row("6 bandwidth", "batch-1 decode vs the limit for the bytes actually read "
            "(quantised twins)", tps, "tok/s", reference=tlimit,
            ref_label=f"{twin / 1e6:.0f} MB/token at {best_bw:.1f} GB/s", ratio=tps / tlimit,
            target=">= 0.50", ok=tps / tlimit >= 0.5,
            note=f"{twin / 1e6 * tps / 1e3:.1f} GB/s read: compute-bound (rebuilding the "
                 "weights, MLX's per-op work), not bandwidth-bound", bytes_per_token=twin)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    row("6 bandwidth", "peak memory", mx.get_peak_memory() / 2**20, "MiB (MLX)",
        note=f"process peak RSS {rss:.0f} MiB (all workloads so far)", rss_mib=rss)


# ---- prefill chunk sizes --------------------------------------------------------------

def bench_prefill(lab, args) -> None:
    import mlx.core as mx
    from mlx_steer.models import base

    text = " ".join(["The history of bread baking spans thousands of years, from flatbreads "
                     "in ancient Egypt to sourdough in medieval Europe."] * 24)
    toks = lab.encode(text)[:400]
    x = mx.array(toks)[None]

    def prefill(step):
        def f():
            caches = base.make_caches(lab.model)
            done = 0
            while done < len(toks):
                n = min(step, len(toks) - done)
                out = lab.model(x[:, done:done + n], cache=caches)
                mx.eval([c.state for c in caches] + [out])
                done += n
        return f

    steps = (128, 256, 512, 2048)
    t = interleaved({s: prefill(s) for s in steps}, args.runs)
    best = min(steps, key=lambda s: med(t[s]))
    for s in steps:
        row("prefill", f"{len(toks)}-token prompt, chunks of {s}", len(toks) / med(t[s]),
            "tok/s", reference=len(toks) / med(t[2048]), ref_label="chunks of 2048 (mlx-lm)",
            ratio=med(t[2048]) / med(t[s]), note="fastest" if s == best else "")


# ---- shared prompt prefix -------------------------------------------------------------

def bench_shared(lab, args) -> None:
    """A layer sweep (baseline + 8 layers) over one ~400-token prompt: the batch's
    prefill shared (the prompt prefix computed once; with positions="all", where no
    prefix is common, the blocks before each row's steered one), vs one row's prefill
    and vs every row prefilled (the batch path before sharing)."""
    import mlx.core as mx
    import numpy as np
    from mlx_steer import Steer, generation, prefix
    from mlx_steer.steer import as_steers

    text = " ".join(["The history of bread baking spans thousands of years, from flatbreads "
                     "in ancient Egypt to sourdough in medieval Europe."] * 24)
    toks = lab.encode(text)[:400]
    steers, _ = demo_steers(lab, layers=sweep_layers(lab.num_layers))
    for positions in ("generated", "all"):
        rows = [[]] + [[Steer(s.vector, s.layer, s.strength, positions)] for s in steers]
        T = [toks] * len(rows)
        groups, solo = prefix.plan(T, rows)
        layered, solo = prefix.layer_plan(T, rows, solo)
        out = {}

        def shared(rows=rows, T=T):
            c, lg = generation.prefill_batch(lab.model, T, rows)
            mx.eval(lg, [x.state for x in c])
            out["shared"] = np.array(lg)

        def unshared(rows=rows, T=T):  # every row prefilled, left-padded (no sharing)
            c, lg = generation.prefill_batch(lab.model, T, rows, share=False)
            mx.eval(lg, [x.state for x in c])
            out["unshared"] = np.array(lg)

        def one():
            c, lg = generation.prefill_batch(lab.model, [toks], [as_steers(None)])
            mx.eval(lg, [x.state for x in c])

        t = interleaved({"one": one, "shared": shared, "unshared": unshared}, args.runs)
        o, sh, un = med(t["one"]), med(t["shared"]), med(t["unshared"])
        diff = float(np.abs(out["shared"] - out["unshared"]).max())
        same = bool((out["shared"].argmax(-1) == out["unshared"].argmax(-1)).all())
        row("shared", f"layer sweep, {len(rows)} rows (positions={positions!r}), "
            f"{len(toks)}-token shared prompt: prefill", sh, "s", reference=o,
            ref_label="one row's prefill", ratio=sh / o,
            target="<= 1.3x" if positions == "generated" else "",
            ok=(sh / o <= 1.3) if positions == "generated" else None,
            note=f"groups {[(len(g.rows), g.shared) for g in groups]}, by layer "
                 f"{[g.diverge for g in layered]}, {len(solo)} rows alone; "
                 f"every row prefilled: {un:.2f} s ({un / o:.2f}x one row); last logits vs "
                 f"every row prefilled: max |diff| {diff:.2g}, same argmax {same}")


# ---- the fast path: preloads in child processes ------------------------------------------

PRELOAD_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import bench
    lab = bench.load_lab(sys.argv[2] or None)
    n, runs = int(sys.argv[3]), int(sys.argv[4])
    rs = [bench.decode_once(lab, None, n, plain=False) for _ in range(runs + 1)][1:]
    batches = {}
    if sys.argv[5] == "1":
        steers = bench.demo_steers(lab, layers=range(2, lab.num_layers - 3, 3))[0]
        for B in (2, 9):
            rows = [(bench.PROMPT, s) for s in ([None] + steers)[:B]]
            batches[B] = [bench.batch_decode_once(lab, rows, 24) for _ in range(runs + 1)][1:]
    from mlx_steer import fastpath
    print("BENCH " + json.dumps({"runs": rs, "batches": batches, "loaded": fastpath.loaded()}))
""")


def own_tmp(name: str) -> str:
    """A TMPDIR of its own for a child configuration, inside this run's: MLX caches its
    compiled CPU kernels there by name, and only children with the shim compile them with
    -march=native, so configurations must not share them."""
    d = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / (
        "cfg-" + "".join(c if c.isalnum() else "-" for c in name))
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def bench_preload(lab, args) -> None:
    from mlx_steer import fastpath

    if not sys.platform.startswith("linux"):
        row("preload", "fast CPU path", None, "tok/s", note="Linux only")
        return
    ob, tc = fastpath.openblas(), fastpath.tcmalloc()
    shim = fastpath.build()
    # (libraries, extra environment, also time batched decode)
    cfgs = {"MLX bundled BLAS": ([], {}, False)}
    if ob:
        cfgs["OpenBLAS"] = ([ob], {}, True)
        if shim:
            cfgs["OpenBLAS + shim, few-row kernel off"] = (
                [shim, ob], {"MLX_STEER_SHIM_SMALLM": "0"}, True)
            cfgs["OpenBLAS + shim"] = ([shim, ob], {}, True)
            if tc:
                cfgs["OpenBLAS + shim + tcmalloc"] = ([shim, ob, tc], {}, True)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("LD_PRELOAD", "MLX_STEER_SHIM_SMALLM")}
    res: dict[str, list] = {k: [] for k in cfgs}
    bres: dict[str, dict] = {k: {} for k in cfgs}
    for _ in range(args.preload_rounds):  # rounds interleave the configurations
        for name, (libs, extra, batched) in cfgs.items():
            env = {**base_env, **extra, "TMPDIR": own_tmp(name)}
            if libs:
                env["LD_PRELOAD"] = ":".join(map(str, libs))
            p = subprocess.run([sys.executable, "-c", PRELOAD_CHILD, str(Path(__file__).parent),
                                args.model or "", str(args.tokens), str(args.runs),
                                "1" if batched else "0"],
                               env=env, capture_output=True, text=True, timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"{name}: {p.stderr[-2000:]}")
            line = next(x for x in p.stdout.splitlines() if x.startswith("BENCH "))
            got = json.loads(line[6:])
            res[name] += got["runs"]
            for B, rs in got["batches"].items():
                bres[name].setdefault(B, []).extend(rs)
    ref = med([r["tps"] for r in res["MLX bundled BLAS"]])
    for name, rs in res.items():
        tps, cpu = med([r["tps"] for r in rs]), med([r["cpu_ms"] for r in rs])
        row("preload", f"batch-1 decode, {name}", tps, "tok/s", reference=ref,
            ref_label="MLX bundled BLAS", ratio=tps / ref,
            note=f"CPU {cpu:.0f} ms/token; best run {max(r['tps'] for r in rs):.1f} tok/s",
            cpu_ms=cpu, runs=rs)
    for B in ("2", "9"):
        if B not in bres.get("OpenBLAS", {}):
            continue
        bref = med([r["rows_tps"] for r in bres["OpenBLAS"][B]])
        for name, per in bres.items():
            if B not in per:
                continue
            rs = per[B]
            tps = med([r["rows_tps"] for r in rs])
            row("preload", f"{B}-row batched decode, {name}", tps, "rows*tok/s",
                reference=bref, ref_label="OpenBLAS", ratio=tps / bref,
                note=f"CPU {med([r['cpu_ms_step'] for r in rs]):.0f} ms/step", runs=rs)


# ---- one decode step: 8 rows against 1 -------------------------------------------------------

def bench_step(lab, args) -> None:
    """Milliseconds per decode step (the model's forward for one token per row, evaluated)
    at 1 steered row and at 8 rows (baseline + 7 steered layers), interleaved."""
    import mlx.core as mx
    from mlx_steer import generation

    steers, _ = demo_steers(lab, layers=sweep_layers(lab.num_layers))
    toks = lab.encode(PROMPT, chat=True)
    n = 16

    def steps(rows, loop=False, greedy=True):
        samplers = [generation.make_sampler(0.0) for _ in rows]

        def f():
            caches, logits = generation.prefill_batch(lab.model, [toks] * len(rows), rows)
            y = mx.argmax(logits, -1)
            mx.eval(y)
            ts, cs = [], []
            for _ in range(n):
                t, c = time.perf_counter(), cpu_seconds()
                logits = lab.model(y[:, None], cache=caches)[:, -1, :]
                if loop:  # what generation.batch does per step besides the forward
                    y = generation.next_tokens(logits, samplers, greedy)
                    y.tolist()
                else:
                    y = mx.argmax(logits, -1)
                    mx.eval(y)
                ts.append(time.perf_counter() - t)
                cs.append(cpu_seconds() - c)
            cpu[id(f)] = cpu.get(id(f), []) + [med(cs[2:]) * 1000]
            return med(ts[2:]) * 1000
        f.cpu = lambda: med(cpu.get(id(f), [None])[1:])  # the warm-up's left out
        return f

    one = [[steers[len(steers) // 2]]]
    eight = ([[]] + [[s] for s in steers])[:8]
    cpu: dict[int, list] = {}
    fns = {"1": steps(one), "8": steps(eight), "8u": steps([[]] * 8),
           "1l": steps(one, True), "8l": steps(eight, True),
           "8ls": steps(eight, True, greedy=False)}
    t = interleaved(fns, args.runs)
    m1, m8, m8u, m1l, m8l, m8ls = (med(t[k]) for k in ("1", "8", "8u", "1l", "8l", "8ls"))
    c1, c8 = fns["1"].cpu(), fns["8"].cpu()
    row("step", "decode step, 8 rows (baseline + 7 steered layers) vs 1 steered row", m8,
        "ms", reference=m1, ref_label="1 row", ratio=m8 / m1, target="<= 1.5x",
        ok=m8 / m1 <= 1.5, note=f"CPU {c8:.1f} vs {c1:.1f} ms/step ({c8 / c1:.2f}x); "
        f"8 unsteered rows {m8u:.1f} ms ({m8u / m1:.2f}x); forward + argmax only, "
        f"median of {n - 2} steps", cpu_ms=c8, cpu_ms_1=c1)
    row("step", "rows*tok/s at 8 rows vs tok/s at 1 row (the same steps)", 8000 / m8,
        "rows*tok/s", reference=1000 / m1, ref_label="1 row", ratio=8 * m1 / m8,
        target=">= 5x", ok=8 * m1 / m8 >= 5, note=f"by CPU time {8 * c1 / c8:.2f}x")
    row("step", "the same with the batch loop's per-step work (the greedy tokens: "
        "argmax where certain, else log-softmax and samplers; tokens to the host)", m8l,
        "ms", reference=m1l, ref_label="1 row",
        ratio=m8l / m1l, note=f"forward alone: 8 rows {m8:.1f} ms, 1 row {m1:.1f} ms; 8 rows "
        f"through their samplers (no greedy shortcut) {m8ls:.1f} ms")


def bench_kernel(lab, args) -> None:
    """One block's gate and up products (x @ W.T) at 1 and 8 rows: the matmul rate the
    decode step gets (through the shim's quantised twins where they apply)."""
    import mlx.core as mx
    import numpy as np

    mlp = lab.model.layers[lab.num_layers // 6].mlp
    rng = np.random.default_rng(0)

    def product(rows):
        x = mx.array(rng.standard_normal((rows, lab.hidden_size)).astype(np.float32))

        def f():
            t = time.perf_counter()
            for _ in range(100):
                mx.eval(mlp.gate_proj(x), mlp.up_proj(x))
            return (time.perf_counter() - t) / 100 * 1e6
        return f

    t = interleaved({1: product(1), 8: product(8)}, max(args.runs, 5))
    macs = 2 * mlp.gate_proj.weight.size
    for rows in (1, 8):
        us = med(t[rows])
        row("step", f"gate + up products of one block, {rows} row(s)", us, "us",
            note=f"{2 * macs * rows / us / 1e3:.0f} GFLOP/s; median of {len(t[rows])} x 100 calls")


# ---- which BLAS behind the shim (the fast path without root) ------------------------------

BLAS_CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import mlx.core as mx
    import bench
    from mlx_steer import fastpath, generation
    from mlx_steer.models import base
    lab = bench.load_lab(sys.argv[2] or None)
    runs = int(sys.argv[3])
    text = " ".join(["The history of bread baking spans thousands of years, from flatbreads "
                     "in ancient Egypt to sourdough in medieval Europe."] * 24)
    toks = lab.encode(text)[:400]
    def prefill():
        caches = base.make_caches(lab.model)
        t = time.perf_counter()
        mx.eval(generation.prefill(lab.model, mx.array(toks)[None], caches))
        return len(toks) / (time.perf_counter() - t)
    pre = [prefill() for _ in range(runs + 1)][1:]
    dec = [bench.decode_once(lab, None, 32)["tps"] for _ in range(runs + 1)][1:]
    rows = [(bench.PROMPT, None)] * 16
    b16 = [bench.batch_decode_once(lab, rows, 12)["rows_tps"] for _ in range(runs + 1)][1:]
    greedy = lab.generate_batch_tokens([(bench.PROMPT, None), ("Name a fruit.", None)],
                                       max_tokens=12)
    print("BENCH " + json.dumps({"prefill": pre, "decode": dec, "b16": b16,
                                 "tokens": [r.tokens for r in greedy],
                                 "describe": fastpath.describe()}))
""")


def bench_blas(lab, args) -> None:
    """Debian's OpenBLAS vs PyPI's scipy-openblas32 vs MKL's wheel (--mkl), each behind
    the shim with tcmalloc, in child processes interleaved round by round: prefill of a
    400-token prompt (sgemm), batch-1 decode, 16-row decode (above the few-row kernel)."""
    from mlx_steer import fastpath

    if not sys.platform.startswith("linux"):
        row("blas", "BLAS candidates", None, "tok/s", note="Linux only")
        return
    shim, tc = fastpath.build(), fastpath.tcmalloc()
    tail = [tc] if tc else []
    cfgs = {}
    debian = fastpath.openblas()
    if debian and shim:
        cfgs["Debian OpenBLAS"] = ([shim, debian, *tail], {})
    env_pypi = {fastpath.BLAS_ENV: "pypi"}
    pypi = fastpath.pypi_openblas()
    if pypi and shim:
        cfgs["PyPI scipy-openblas32"] = ([shim, pypi, *tail], env_pypi)
    if args.mkl and shim:
        cfgs["PyPI mkl (libmkl_rt)"] = ([shim, Path(args.mkl), *tail],
                                        {**env_pypi, "MKL_THREADING_LAYER": "GNU",
                                         "MKL_NUM_THREADS": str(args.mkl_threads)})
    if not cfgs:
        row("blas", "BLAS candidates", None, "tok/s", note="no candidate BLAS or no shim")
        return
    base_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    res: dict[str, dict[str, list]] = {k: {"prefill": [], "decode": [], "b16": []}
                                       for k in cfgs}
    tokens, described = {}, {}
    for _ in range(args.preload_rounds):
        for name, (libs, extra) in cfgs.items():
            env = {**base_env, **extra, "LD_PRELOAD": ":".join(map(str, libs)),
                   "TMPDIR": own_tmp(name)}
            p = subprocess.run([sys.executable, "-c", BLAS_CHILD, str(Path(__file__).parent),
                                args.model or "", str(args.runs)],
                               env=env, capture_output=True, text=True, timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"{name}: {p.stderr[-2000:]}")
            got = json.loads(next(x for x in p.stdout.splitlines()
                                  if x.startswith("BENCH "))[6:])
            for k in res[name]:
                res[name][k] += got[k]
            tokens[name], described[name] = got["tokens"], got["describe"]
    ref = next(iter(cfgs))
    for key, what, unit in (("prefill", "prefill, 400-token prompt", "tok/s"),
                            ("decode", "batch-1 decode, 32 tokens", "tok/s"),
                            ("b16", "16-row batched decode", "rows*tok/s")):
        r0 = med(res[ref][key])
        for name in cfgs:
            v = med(res[name][key])
            row("blas", f"{what}, {name} + shim", v, unit, reference=r0, ref_label=ref,
                ratio=v / r0, note=f"greedy tokens == {ref}'s: "
                f"{tokens[name] == tokens[ref]}; {described[name]}", runs=res[name][key])


# ---- 7. the original's method and llama.cpp -----------------------------------------------

def reference_python(args) -> str:
    if args.reference_python:
        return args.reference_python
    bench_venv = ROOT / ".venv-bench" / "bin" / "python"
    return str(bench_venv) if bench_venv.exists() else sys.executable


def bench_reference(lab, args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_llamacpp
    import bench_original

    py = reference_python(args)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    orig = llama = None
    try:
        if "original" not in args.references:
            raise LookupError("left out (--references)")
        say("[reference: the original's method in PyTorch (minutes)]")
        orig = bench_original.run_in_child(
            ["extraction", "compare", "sweeps", "decode"], runs=args.runs,
            layers=OURS.get("sweep_layers"), strength_layer=OURS.get("strength_layer"),
            compare_layer=OURS.get("compare_layer"), pair="seed", python=py)["results"]
    except LookupError:
        pass
    except Exception as e:  # not installed, or it failed: say so in the table
        row("7 vs original", "the original lab's method (PyTorch + transformers)", None, "",
            note=f"not measured: {str(e)[:300]}")
    try:
        if "llama" not in args.references:
            raise LookupError("left out (--references)")
        say("[reference: llama.cpp]")
        llama = bench_llamacpp.run_in_child(["decode", "decode_steered", "variants"],
                                            runs=args.runs, tokens=args.tokens, python=py)
    except LookupError:
        pass
    except Exception as e:
        row("7 vs llama.cpp", "llama.cpp on the same GGUF (llama-cpp-python)", None, "",
            note=f"not measured: {str(e)[:300]}")

    def vs(label, key, ref, target_ratio, note=""):
        ours = OURS.get(key)
        if ours is None or ref is None:
            return row("7 vs original", label, ours, "s", note="not measured (needs "
                       f"{key.split('_')[0]} in the same run)")
        r = ours / ref
        row("7 vs original", label, ours, "s", reference=ref, ref_label="original's method",
            ratio=r, target=f"<= {target_ratio}x", ok=r <= target_ratio, note=note)

    if orig:
        ex = orig["extraction"]
        shared = orig["extraction_shared"]["median_s"]
        vs(f"extraction: 17 built-ins x {lab.num_layers} layers (all pairs, calibrated) "
           f"vs the original's 17 x {len(ex['layers'])} layers (1 pair)", "extraction_s",
           ex["median_s"], 0.5,
           note=f"original: {ex['forwards']} forward passes; with one pass per concept for "
                f"its 3 layers {shared:.2f} s")
        vs("extraction, all pairs, no calibration vs the original's 3 layers",
           "extraction_nocal_s", ex["median_s"], 0.5)
        vs(f"extraction, the original's data (1 pair per concept), all {lab.num_layers} layers "
           "vs its 3 layers", "extraction_seed_s", ex["median_s"], 0.5,
           note=f"vs its one-pass variant: {OURS.get('extraction_seed_s', 0) / shared:.2f}x")
        vs("compare: baseline + steered, 50 tokens", "compare_s", orig["compare"]["median_s"],
           0.6, note="original: 2 generates")
        vs(f"layer sweep: baseline + {len(orig['layer_sweep']['layers'])} layers, 30 tokens",
           "layer_sweep_s", orig["layer_sweep"]["median_s"], 0.25,
           note=f"original: {orig['layer_sweep']['generates']} generates")
        vs("strength sweep: 5 strengths, 30 tokens", "strength_sweep_s",
           orig["strength_sweep"]["median_s"], 0.3, note="original: 5 generates")
        d = orig["decode"]
        if OURS.get("steered_tps"):
            row("7 vs original", "batch-1 decode (reference: PyTorch `generate`, plain)",
                OURS["steered_tps"], "tok/s", reference=d["median_tps"],
                ref_label="PyTorch", ratio=OURS["steered_tps"] / d["median_tps"],
                note=f"PyTorch {d['median_cpu_ms']:.0f} CPU ms/token")
    if llama:
        dec, var = llama["decode"], llama["variants"]
        if OURS.get("steered_tps"):
            r = OURS["steered_tps"] / dec["decode_tps"]
            row("7 vs llama.cpp", "batch-1 decode, ours steered vs llama.cpp plain",
                OURS["steered_tps"], "tok/s", reference=dec["decode_tps"],
                ref_label="llama.cpp", ratio=r, target=">= 0.5x", ok=r >= 0.5,
                note=f"llama.cpp steered (control vector) "
                     f"{llama['decode_steered']['decode_tps']:.1f} tok/s; its weights "
                     f"{llama.get('bandwidth', {}).get('bytes_per_token', 0) / 1e6:.0f} "
                     "MB/token" + (f"; {llama['meta']['extra_bufts_note']}"
                                   if llama.get("meta", {}).get("extra_bufts_note") else ""))
        if OURS.get("sweep8_s"):
            speed = var["seconds"] / OURS["sweep8_s"]
            row("7 vs llama.cpp", f"{len(var['layers'])} layer variants, "
                f"{var['tokens_per_variant']} tokens: ours one batch vs llama.cpp in turn",
                OURS["sweep8_s"], "s", reference=var["seconds"], ref_label="llama.cpp",
                ratio=OURS["sweep8_s"] / var["seconds"], target=">= 2x faster",
                ok=speed >= 2.0, note=f"{speed:.2f}x faster")


# ---- report -----------------------------------------------------------------------------

def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(meta: dict) -> str:
    lines = [f"mlx-steer benchmarks — {meta['model']} on {meta['cpu']} "
             f"({meta['cores']} cores), MLX {meta['mlx']} on {meta['device']}, "
             f"{meta['fastpath']}; median of {meta['runs']} runs "
             f"after a warm-up; load average {meta['load_before']:.1f} -> {meta['load_after']:.1f}",
             "",
             "| # | workload | ours | unit | reference | ratio | target | met | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        ref = "" if r["reference"] is None else f"{fmt(r['reference'])} ({r['reference_label']})"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['section']} | {r['workload']} | {fmt(r['ours'])} | {r['unit']} | "
                     f"{ref} | {ratio} | {r['target']} | {met} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name (default: embedded SmolLM2)")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the results as JSON to PATH (or stdout; the table then "
                         "goes to stderr)")
    ap.add_argument("--only", default=",".join(DEFAULT),
                    help=f"comma-separated sections: {', '.join(SECTIONS)} or 'all'")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per batch-1 decode")
    ap.add_argument("--calibration-alphas", default=None, metavar="LIST",
                    help="strengths of the calibration grid (default: calibrate.ALPHAS), "
                         "e.g. 0.1,0.2,0.3,0.4")
    ap.add_argument("--extraction-runs", type=int, default=1,
                    help="cold extraction runs (each takes a while)")
    ap.add_argument("--cold-empty-runs", type=int, default=1,
                    help="cold starts with an empty concept cache (each extracts all "
                         "built-ins; 0 to skip)")
    ap.add_argument("--reference-python", default=None, metavar="PATH",
                    help="interpreter with the `bench` extra for workload 7 (default: "
                         ".venv-bench/bin/python when present, else this one)")
    ap.add_argument("--references", default="original,llama",
                    help="the tools workload 7 compares with: original (PyTorch), llama "
                         "(llama.cpp); with llama alone it needs only overhead and sweeps")
    ap.add_argument("--preload-rounds", type=int, default=2,
                    help="rounds over the preload (and blas) configurations")
    ap.add_argument("--mkl", default=None, metavar="PATH",
                    help="libmkl_rt.so of PyPI's `mkl` wheel, measured in section blas")
    ap.add_argument("--mkl-threads", type=int, default=1,
                    help="MKL_NUM_THREADS for --mkl (the PyPI OpenBLAS runs on 1 thread too)")
    args = ap.parse_args(argv)
    only = SECTIONS if args.only == "all" else tuple(s.strip() for s in args.only.split(","))
    bad = set(only) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections: {', '.join(sorted(bad))}")
    if "reference" in only:  # its ratios need our side from the same run
        needed = NEEDED_BY_REFERENCE if "original" in args.references else (
            "overhead", "sweeps")
        only = tuple(x for x in needed if x not in only) + only
        only = tuple(x for x in only if x != "reference") + ("reference",)

    # MLX compiles its fused CPU kernels at run time and caches them by name under
    # $TMPDIR/mlx, whatever flags built them (the shim adds -march=native): a fresh folder
    # per run, so that every run measures the kernels its own setting compiles.
    jit_tmp = tempfile.mkdtemp(prefix="mlx-steer-bench-")
    os.environ["TMPDIR"] = jit_tmp
    try:
        return _run(args, only)
    finally:
        shutil.rmtree(jit_tmp, ignore_errors=True)


def _run(args, only) -> int:
    import mlx.core as mx
    from mlx_steer import fastpath

    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    lab = load_lab(args.model)
    meta = {**machine(), "model": lab.name, "runs": args.runs, "mlx": mx.__version__,
            "device": str(mx.default_device()),
            "fastpath": fastpath.describe(), "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "shim_native": os.environ.get("MLX_STEER_SHIM_NATIVE", "1") != "0",
            "load_seconds": time.perf_counter() - t, "load_before": load_before,
            "command": " ".join([Path(sys.executable).name] + sys.argv)}
    if "extraction" in only or "compare" in only or "sweeps" in only or "overhead" in only:
        concept_or_none(lab)  # built-in 'happy' extracted before any timing
    decode = None
    for s in only:
        t = time.perf_counter()
        try:
            if s == "overhead":
                decode = bench_overhead(lab, args)
            elif s == "bandwidth":
                bench_bandwidth(lab, args, decode)
            else:
                globals()[f"bench_{s}"](lab, args)
        except Exception as e:  # one broken section must not lose the others' figures
            import traceback

            traceback.print_exc()
            row(s, f"section {s} failed", None, "", note=f"{type(e).__name__}: {e}"[:300])
        print(f"[{s}: {time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f}]",
              file=sys.stderr, flush=True)
    meta["load_after"] = os.getloadavg()[0]
    table = markdown(meta)
    if args.json == "-":
        print(table, file=sys.stderr)
        print(json.dumps({"meta": meta, "rows": ROWS}, indent=2, default=str))
    else:
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=2,
                                                  default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
