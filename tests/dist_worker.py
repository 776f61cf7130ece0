"""One rank of the distributed tests, started by `mlx.launch` (see test_distributed.py).

    python dist_worker.py MODE MODEL_DIR OUT_DIR

Each rank writes what it saw to OUT_DIR/<mode>-rank<r>.json; the test compares.
Modes: shard (tensor-sharded steered logits vs the whole model), pipeline (the
same on pipeline stages, and an experiment on them), grid (a
distributed experiment grid vs the local one), fail (rank 1 raises in its share),
hang (rank 1 never answers; a short timeout must end the run).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

import mlx_steer
from mlx_steer import Concept, Steer, distributed
from mlx_steer import experiments as X

PROMPT = "hello there"


def concept(lab, name="happy"):
    rng = np.random.default_rng(7)  # the same vectors on every rank
    vecs = rng.normal(size=(lab.num_layers, lab.hidden_size)).astype(np.float32)
    return Concept(name, vecs, np.full(lab.num_layers, 8.0, np.float32), 2, 0.5,
                   lab.fingerprint)


def shard(model_dir, group):
    whole = mlx_steer.load(model_dir)
    sharded = mlx_steer.load(model_dir, group=group)
    v = np.random.default_rng(3).normal(size=whole.hidden_size).astype(np.float32)
    steer = [Steer(v, 1, 4.0), Steer(-v, 2, 1.5, positions="generated")]
    a, b = whole.trace(PROMPT, steer, prompt_len=3), sharded.trace(PROMPT, steer, prompt_len=3)
    plain = whole.trace(PROMPT)
    q = sharded.model.layers[0].self_attn.q_proj.weight.shape
    return {
        "q_proj_rows": [int(q[0]), int(whole.model.layers[0].self_attn.q_proj.weight.shape[0])],
        "logits_diff": float(np.abs(a.logits - b.logits).max()),
        "hidden_diff": float(np.abs(a.hidden - b.hidden).max()),
        "steering_effect": float(np.abs(a.logits - plain.logits).max()),
        "text_whole": whole.generate(PROMPT, steer, max_tokens=12),
        "text_sharded": sharded.generate(PROMPT, steer, max_tokens=12),
        "batch_sharded": sharded.generate_batch([(PROMPT, steer), ("other text", None)],
                                                max_tokens=12),
        "batch_whole": whole.generate_batch([(PROMPT, steer), ("other text", None)],
                                            max_tokens=12),
    }


def pipeline(model_dir, group):
    """The same checks on pipeline stages, plus a whole experiment on the stages."""
    from mlx_steer.models import base

    whole = mlx_steer.load(model_dir)
    staged = mlx_steer.load(model_dir, group=group, sharding="pipeline")
    v = np.random.default_rng(3).normal(size=whole.hidden_size).astype(np.float32)
    steer = [Steer(v, 0, 0.5), Steer(-v, 3, 0.5, positions="generated")]
    a, b = whole.trace(PROMPT, steer, prompt_len=3), staged.trace(PROMPT, steer, prompt_len=3)
    plain = whole.trace(PROMPT)
    span = base.layer_span(staged.model)
    hb_w = whole.hidden_states_batch([PROMPT, "other text"], steer=steer)
    hb_s = staged.hidden_states_batch([PROMPT, "other text"], steer=steer)
    c = concept(whole)
    return {
        "span": [span.start, span.stop], "num_layers": staged.num_layers,
        "logits_diff": float(np.abs(a.logits - b.logits).max()),
        "hidden_diff": float(np.abs(a.hidden - b.hidden).max()),
        "batch_hidden_diff": max(float(np.abs(x - y).max()) for x, y in zip(hb_w, hb_s)),
        "steering_effect": float(np.abs(a.logits - plain.logits).max()),
        "text_whole": whole.generate(PROMPT, steer, max_tokens=12),
        "text_sharded": staged.generate(PROMPT, steer, max_tokens=12),
        "batch_sharded": staged.generate_batch([(PROMPT, steer), ("other text", None)],
                                               max_tokens=12),
        "batch_whole": whole.generate_batch([(PROMPT, steer), ("other text", None)],
                                            max_tokens=12),
        "grid_whole": X.layer_analysis(whole, PROMPT, c, [0, 1, 2, 3], 1.0, max_tokens=6),
        "grid_sharded": X.layer_analysis(staged, PROMPT, c, [0, 1, 2, 3], 1.0, max_tokens=6),
    }


def grids(lab, group, **kw):
    c = concept(lab)
    out = {"rows_run": []}  # rows this rank decoded in each distributed grid
    real = lab.generate_batch_tokens

    def counted(requests, *a, **k):
        counted.rows += len(requests)
        return real(requests, *a, **k)

    lab.generate_batch_tokens = counted
    for name, fn in {
        "strengths": lambda g: X.strength_explorer(
            lab, [PROMPT, "a second prompt"], c, [0.5, 1.0, 2.0], layer=1, group=g, **kw),
        "layers": lambda g: X.layer_analysis(lab, PROMPT, c, [0, 1, 2, 3], 1.0,
                                             group=g, **kw),
        "mix": lambda g: X.mix(lab, PROMPT, [(c, 0.7), (concept(lab, "calm"), 0.3)],
                               group=g, **kw)[1],
    }.items():
        counted.rows = 0
        dist = fn(group)
        out["rows_run"].append([counted.rows, len(dist)])
        out[name] = {"distributed": dist, "local": fn(None)}
    return out


def main(mode, model_dir, out_dir):
    group = distributed.world()
    r = distributed.rank(group)
    result = {"rank": r, "size": distributed.size(group)}
    try:
        if mode == "shard":
            result.update(shard(model_dir, group))
        elif mode == "pipeline":
            result.update(pipeline(model_dir, group))
        else:
            lab = mlx_steer.load(model_dir)
            if mode == "grid":
                result["grids"] = grids(lab, group, max_tokens=8)
            elif mode == "fail":
                if r == 1:
                    def boom(*a, **k):
                        raise RuntimeError("simulated failure")
                    lab.generate_batch_tokens = boom
                result["records"] = X.strength_explorer(lab, PROMPT, concept(lab), [1.0, 2.0],
                                                        layer=1, max_tokens=4, group=group)
            elif mode == "hang":
                if r == 1:
                    lab.generate_batch_tokens = lambda *a, **k: time.sleep(120)
                result["records"] = X.strength_explorer(lab, PROMPT, concept(lab), [1.0, 2.0],
                                                        layer=1, max_tokens=4, group=group,
                                                        timeout=3)
    except Exception as e:
        result["error"] = {"type": type(e).__name__, "message": str(e)}
        raise
    finally:
        Path(out_dir, f"{mode}-rank{r}.json").write_text(json.dumps(result))
    if r == 0:
        print(json.dumps(result.get("records", "done")))


if __name__ == "__main__":
    main(*sys.argv[1:4])
