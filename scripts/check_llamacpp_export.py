"""Does a default GGUF export steer llama.cpp the way mlx-steer steers?

For each concept (built-ins by default, at their CURRENT defaults: whatever block
and strength calibration recommends), this script

1. exports the default control vector the way a user does,
   `mlx-steer concepts export-gguf NAME out.gguf` (the recommended block at the
   recommended strength, through the CLI's own code path);
2. generates greedily in llama.cpp (llama-cpp-python, in the benchmark venv, on
   the embedded SmolLM2 GGUF) on N evaluation prompts (`prompt_set("evaluation")`),
   unsteered and with the exported file loaded as `llama-cli --control-vector`
   loads it (`direction.N` at block N, scale 1, blocks 1..n_layer);
3. generates the same prompt tokens with mlx-steer, unsteered and steered with
   `concept.steer()` (block, strength), in one batched decode: once with
   mlx-steer's default positions ("all": every position but the first, position 0
   being the chat template's first token) and once from position 0 (what
   llama.cpp's control vector does: every position);
4. reports, per concept: the concept's own score (`experiments.concept_score`:
   VADER for sentiment concepts) steered minus unsteered in llama.cpp and in
   mlx-steer, and token agreement over the first K tokens: llama.cpp steered vs
   mlx-steer steered, next to llama.cpp unsteered vs mlx-steer unsteered (the
   reference: llama.cpp runs the Q4_1 weights with quantised kernels, mlx-steer
   the same weights dequantised to float32, so even unsteered greedy text parts
   after a while).

Agreement: `prefix` = tokens equal before the first difference (mean over
prompts), `same` = fraction of the first K positions with equal tokens. A mapping
check runs llama.cpp also with the same vector one block lower, one block higher
and negated: mlx-steer's steered text should agree best with the exported file.

Usage (needs `make bench-setup`'s .venv-bench with llama-cpp-python and gguf;
run it with the project's venv):

    .venv/bin/python scripts/check_llamacpp_export.py --concepts happy,sad --prompts 8
    .venv/bin/python scripts/check_llamacpp_export.py --json out.json

The llama.cpp side runs as a child process of --bench-python (this same file
with --child), without LD_PRELOAD.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---- the child: llama.cpp ------------------------------------------------------------

def load_control_vector(path: str, n_embd: int, n_layer: int):
    """(data, blocks): the values llama.cpp's common loader builds from a control-vector
    GGUF, `direction.N` (N >= 1) at data[(N-1)*n_embd:], scale 1, zero-filled up to
    block n_layer - 1. (llama.cpp writes only the blocks that `data` covers and keeps
    what the context held for the others: a shorter array would leave an earlier
    vector's higher blocks in place.)"""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(path)
    dirs = {}
    for t in r.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix == "direction" and idx.isdigit() and int(idx) >= 1:
            dirs[int(idx)] = np.asarray(t.data, np.float32).reshape(-1)
    data = np.zeros((n_layer - 1) * n_embd, np.float32)
    for i, v in dirs.items():
        if v.size != n_embd:
            raise ValueError(f"{path}: direction.{i} has {v.size} values, n_embd is {n_embd}")
        data[(i - 1) * n_embd: i * n_embd] += v
    return data, sorted(dirs)


def child(spec: dict) -> dict:
    import ctypes

    import bench_llamacpp

    bench_llamacpp.EXTRA_BUFTS[0] = spec["extra_bufts"]
    eng = bench_llamacpp.Engine(Path(spec["model"]), spec["threads"])
    ll, np = eng.ll, eng.np
    eog = set(int(t) for t in eng.banned)
    K = spec["tokens"]

    def generate(prompt_tokens: list[int]) -> list[int]:
        ll.llama_memory_clear(ll.llama_get_memory(eng.ctx), True)
        eng._decode(prompt_tokens)
        out: list[int] = []
        for _ in range(K):
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(eng.ctx, -1),
                                           shape=(eng.n_vocab,))
            t = int(logits.argmax())
            if t in eog:
                break
            out.append(t)
            eng._decode([t])
        return out

    res: dict = {"n_layer": eng.n_layer, "n_embd": eng.n_embd,
                 "chat_tokens_equal": [eng.chat_tokens(p) == t
                                       for p, t in zip(spec["prompts"], spec["prompt_tokens"])],
                 "unsteered": [], "steered": {}}
    eng.set_cvec(None)
    res["unsteered"] = [generate(t) for t in spec["prompt_tokens"]]
    for name, path in spec["cvecs"].items():
        data, blocks = load_control_vector(path, eng.n_embd, eng.n_layer)
        rc = ll.llama_set_adapter_cvec(
            eng.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
            eng.n_embd, 1, eng.n_layer)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({rc})")
        res["steered"][name] = {"blocks": blocks,
                                "tokens": [generate(t) for t in spec["prompt_tokens"]]}
        eng.set_cvec(None)
    res["texts"] = {"unsteered": [eng.text(t) for t in res["unsteered"]],
                    **{n: [eng.text(t) for t in s["tokens"]]
                       for n, s in res["steered"].items()}}
    return res


# ---- the parent: mlx-steer -------------------------------------------------------------

def agreement(a: list[list[int]], b: list[list[int]], k: int) -> dict:
    """Mean common-prefix length and fraction of equal positions over the first k tokens."""
    prefix, same = [], []
    for x, y in zip(a, b):
        x, y = x[:k], y[:k]
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(n)
        same.append(sum(p == q for p, q in zip(x, y)) / k)
    return {"prefix": sum(prefix) / len(prefix), "same": sum(same) / len(same)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", default="happy,sad,angry,calm",
                    help="comma-separated concepts (built-ins or saved ones)")
    ap.add_argument("--prompts", type=int, default=8, help="evaluation prompts (first N)")
    ap.add_argument("--tokens", type=int, default=40, help="greedy tokens per generation (K)")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (default 1: its threads meet at a barrier after "
                         "every operation, which collapses on a busy machine)")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="let llama.cpp repack weights for its extra kernels (AMX on x86; "
                         "off by default: they crash where AMX is reported but not usable)")
    ap.add_argument("--bench-python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
                    help="a Python with llama-cpp-python and gguf")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        print(json.dumps(child(spec)))
        return 0

    import numpy as np

    import mlx_steer
    from mlx_steer import cli, experiments
    from mlx_steer.control_vector import write_control_vector
    from mlx_steer.prompts import prompt_set
    from bench_common import embedded_gguf

    names = [n.strip() for n in args.concepts.split(",") if n.strip()]
    prompts = prompt_set("evaluation", args.prompts)
    K = args.tokens
    lab = mlx_steer.load(None)
    concepts = {n: lab.concept(n) for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="cvec-"))
    cvecs = {}
    for n in names:
        out = tmp / f"{n}.gguf"
        rc = cli.main(["concepts", "export-gguf", n, str(out)])
        if rc != 0:
            raise SystemExit(f"export of {n} failed ({rc})")
        cvecs[n] = str(out)
        # The mapping check: the same strength one block lower / higher, and negated.
        c = concepts[n]
        for tag, layer, sign in (("below", c.layer - 1, 1), ("above", c.layer + 1, 1),
                                 ("negated", c.layer, -1)):
            if 1 <= layer < c.num_layers:
                raw = sign * c.relative_to_raw(layer, c.strength)
                path = tmp / f"{n}-{tag}.gguf"
                write_control_vector(path, {layer: c.vectors[layer] * np.float32(raw)},
                                     "llama", c.num_layers)
                cvecs[f"{n}-{tag}"] = str(path)
    toks = [lab.encode(p, chat=True) for p in prompts]
    spec = {"model": str(embedded_gguf()), "threads": args.threads, "tokens": K,
            "extra_bufts": args.extra_bufts,
            "prompts": prompts, "prompt_tokens": toks, "cvecs": cvecs}
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    p = subprocess.run([args.bench_python, str(Path(__file__).resolve()), "--child",
                        str(spec_path)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"llama.cpp child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    llama = json.loads(p.stdout.strip().splitlines()[-1])

    # mlx-steer: every row in one batched decode
    rows = [(t, None) for t in toks]
    for n in names:
        c = concepts[n]
        rows += [(t, c.steer()) for t in toks]
        rows += [(t, c.steer(positions=0)) for t in toks]
    res = lab.generate_batch_tokens(rows, max_tokens=K, temperature=0.0, seed=0)
    ours_tokens = [r.tokens for r in res]
    ours_texts = [r.text for r in res]
    P = len(toks)
    ours_un, ours_un_text = ours_tokens[:P], ours_texts[:P]

    def score(c, texts):
        rule = experiments.concept_eval(c)
        mk = experiments.concept_markers(c)
        vals = [experiments.concept_score(rule, experiments.text_metrics(t, mk))
                for t in texts]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    report = {"prompts": prompts, "tokens": K, "n_layer": llama["n_layer"],
              "chat_tokens_equal": all(llama["chat_tokens_equal"]),
              "unsteered_agreement": agreement(llama["unsteered"], ours_un, K),
              "concepts": {}}
    for j, n in enumerate(names):
        c = concepts[n]
        base = P * (1 + 2 * j)
        ours_s, ours_s0 = ours_tokens[base:base + P], ours_tokens[base + P:base + 2 * P]
        texts_s, texts_s0 = ours_texts[base:base + P], ours_texts[base + P:base + 2 * P]
        ll = llama["steered"][n]
        rule = experiments.concept_eval(c) or {}
        un_ll, un_ours = score(c, llama["texts"]["unsteered"]), score(c, ours_un_text)
        s_ll, s_ours, s_ours0 = (score(c, llama["texts"][n]), score(c, texts_s),
                                 score(c, texts_s0))

        def delta(a, b):
            return None if a is None or b is None else round(a - b, 4)

        report["concepts"][n] = {
            "layer": c.layer, "strength": c.strength,
            "steers": c.extra.get("steers"), "exported_blocks": ll["blocks"],
            "metric": rule.get("kind"),
            "score_unsteered": {"llama_cpp": un_ll, "mlx_steer": un_ours},
            "score_change": {"llama_cpp": delta(s_ll, un_ll),
                             "mlx_steer": delta(s_ours, un_ours),
                             "mlx_steer_from_position_0": delta(s_ours0, un_ours)},
            "agreement_steered": agreement(ll["tokens"], ours_s, K),
            "agreement_steered_from_position_0": agreement(ll["tokens"], ours_s0, K),
            # mlx-steer steered vs llama.cpp with the vector one block off or negated:
            # the export's own block and sign should agree best
            "agreement_mapping_check": {
                tag: agreement(llama["steered"][f"{n}-{tag}"]["tokens"], ours_s, K)
                for tag in ("below", "above", "negated") if f"{n}-{tag}" in llama["steered"]},
            "steered_changed_tokens": {
                "llama_cpp": agreement(ll["tokens"], llama["unsteered"], K)["same"],
                "mlx_steer": agreement(ours_s, ours_un, K)["same"]},
            "example": {"prompt": prompts[0], "llama_cpp": llama["texts"][n][0],
                        "mlx_steer": texts_s[0], "mlx_steer_from_position_0": texts_s0[0]},
        }
    report["example_unsteered"] = {"llama_cpp": llama["texts"]["unsteered"][0],
                                   "mlx_steer": ours_un_text[0]}
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def table(r: dict) -> str:
    u = r["unsteered_agreement"]
    lines = [f"{len(r['prompts'])} evaluation prompts, first {r['tokens']} greedy tokens; "
             f"prompt tokens equal in both: {r['chat_tokens_equal']}",
             f"unsteered, llama.cpp vs mlx-steer: common prefix {u['prefix']:.1f} tokens, "
             f"{u['same']:.0%} of positions equal",
             "concept  block  strength  metric     change llama.cpp  mlx-steer (from pos 0)"
             "   steered agreement: prefix / equal (from pos 0)"]
    for n, c in r["concepts"].items():
        a, a0 = c["agreement_steered"], c["agreement_steered_from_position_0"]
        ch = c["score_change"]

        def f(x):
            return "   n/a" if x is None else f"{x:+.3f}"

        lines.append(
            f"{n:8s} {c['layer']:5d}  {c['strength']:8.3g}  {str(c['metric']):9s}  "
            f"{f(ch['llama_cpp']):>16s}  {f(ch['mlx_steer'])} ({f(ch['mlx_steer_from_position_0'])})"
            f"   {a['prefix']:.1f} / {a['same']:.0%} ({a0['prefix']:.1f} / {a0['same']:.0%})")
        lines.append("         mapping check, mlx-steer steered vs llama.cpp with the vector "
                     + ", ".join(f"{t}: {x['prefix']:.1f} / {x['same']:.0%}"
                                 for t, x in c["agreement_mapping_check"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
