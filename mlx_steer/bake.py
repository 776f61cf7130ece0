"""Fold steering into a model's weights: an MLX folder plain `mlx_lm.load` opens.

What can be folded (anything else is refused with a typed error):

- `op="ablate"` at `layer="all"`: every weight that writes into the residual
  stream is orthogonalised against v̂ — the token embedding (E ← E − (E v̂) v̂ᵀ),
  each attention output and MLP down projection (W ← W − v̂ (v̂ᵀ W), biases
  alike). Then no write has a component along v̂, so the stream never has one:
  the same as runtime ablation at `layer="all"` (the embedding output, the middle
  of every block and every block output; ablating block outputs alone would
  differ, because each MLP reads the stream after attention has written to it).
  Several directions must be mutually orthogonal (the projections then commute).
  A model whose output head is tied to the embedding gets an untied head with
  the original embedding, so only the stream changes, as at runtime.
- `op="add"` at one int block (several allowed, at different or equal blocks):
  a constant bias on that block's MLP down projection, so the block output is
  h + attn + mlp + δ. Only where the architecture's config can switch MLP biases
  on (`mlp_bias`, llama family: Llama, Mistral, SmolLM); the other MLP biases
  are written as zeros. Elsewhere it is refused: mlx-lm would not load a bias
  the architecture does not declare.

Weights act on every token, position 0 included, so a baked model equals
runtime steering with `positions=0`; steers with `positions="all"` (which skip
position 0, the attention sink) are baked as if they had `positions=0`, and
the note says so. Position rules "prompt", "generated" or k > 0 cannot be
baked. Caps are not linear in the weights and are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import InvalidArgumentError, UnsupportedModelError
from .models.base import ResidualWriters
from .steer import Steer, SteerLike, as_steers, check_steers

if TYPE_CHECKING:
    from .lab import Lab

NOTE = "mlx_steer_bake.json"
ORTHOGONAL_TOL = 1e-4


def plan(lab: "Lab", steer: SteerLike) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """(unit directions to ablate everywhere, summed additions per block) or a typed error."""
    steers = as_steers(steer)
    if not steers:
        raise InvalidArgumentError("nothing to bake: give at least one steer")
    check_steers(steers, lab.num_layers, lab.hidden_size, lab.fingerprint)
    units: list[np.ndarray] = []
    adds: dict[int, np.ndarray] = {}
    for s in steers:
        if s.positions not in ("all", 0):
            raise InvalidArgumentError(
                f"positions={s.positions!r} cannot be baked: weights act on every token "
                '(use positions="all" or 0)')
        if s.op == "cap":
            raise InvalidArgumentError("a cap is not linear in the weights and cannot be baked")
        if s.op == "ablate":
            if s.layer != "all":
                raise InvalidArgumentError(
                    f"ablation at layer={s.layer!r} cannot be baked: only ablation at every "
                    'block (layer="all") is a change of weights')
            units.append(s.unit.astype(np.float64))
        elif isinstance(s.layer, int) and s.layer >= 0:
            if not s.is_noop:
                adds[s.layer] = adds.get(s.layer, 0) + s.delta.astype(np.float64)
        else:
            raise InvalidArgumentError(
                f"an addition at layer={s.layer!r} cannot be baked: give one int block "
                "per addition (the embedding output has no bias)")
    for i in range(len(units)):
        for j in range(i):
            if abs(float(units[i] @ units[j])) > ORTHOGONAL_TOL:
                raise InvalidArgumentError(
                    "ablated directions must be mutually orthogonal to be baked (cosine "
                    f"{float(units[i] @ units[j]):.3g}); orthogonalise them first")
    return units, adds


def _project_rows(w: mx.array, units: list[np.ndarray]) -> mx.array:
    """Rows of w (…, D) without their components along the units: w − (w v̂) v̂ᵀ."""
    dt = w.dtype
    out = w.astype(mx.float32)
    for u in units:
        uu = mx.array(u.astype(np.float32))
        out = out - (out @ uu)[..., None] * uu
    return out.astype(dt)


def _project_outputs(w: mx.array, units: list[np.ndarray]) -> mx.array:
    """A (D, in) weight whose outputs lose their components along the units:
    W − v̂ (v̂ᵀ W)."""
    dt = w.dtype
    out = w.astype(mx.float32)
    for u in units:
        uu = mx.array(u.astype(np.float32))
        out = out - uu[:, None] * (uu @ out)[None]
    return out.astype(dt)


def baked_weights(lab: "Lab", steer: SteerLike) -> tuple[dict[str, mx.array], dict, dict]:
    """(weights, config, note) of the baked model; the loaded model is not changed."""
    units, adds = plan(lab, steer)
    writers = ResidualWriters(lab.model)
    weights = dict(tree_flatten(lab.model.parameters()))
    config = dataclasses.asdict(lab.model.args)
    if units:
        if writers.tied:
            weights["lm_head.weight"] = weights[writers.embedding]
            config["tie_word_embeddings"] = False
        weights[writers.embedding] = _project_rows(weights[writers.embedding], units)
        for names in writers.blocks:
            for name in names:
                weights[f"{name}.weight"] = _project_outputs(weights[f"{name}.weight"], units)
                if f"{name}.bias" in weights:
                    weights[f"{name}.bias"] = _project_rows(weights[f"{name}.bias"], units)
    if adds:
        if writers.mlp_biases is None:
            raise UnsupportedModelError(
                f"{lab.model_type} declares no MLP bias, so an addition cannot be folded "
                "into its weights; bake only ablations, or steer at runtime")
        dtype = weights[f"{writers.blocks[0][1]}.weight"].dtype
        if not config.get("mlp_bias"):
            for biases in writers.mlp_biases:
                for name, size in biases.items():
                    weights[name] = mx.zeros((size,), dtype)
            config["mlp_bias"] = True
        for layer, delta in adds.items():
            name = f"{writers.blocks[layer][1]}.bias"
            b = weights[name].astype(mx.float32) + mx.array(delta.astype(np.float32))
            weights[name] = _project_rows(b, units).astype(dtype)
    mx.eval(weights)
    note = _note(lab, as_steers(steer))
    return weights, config, note


def _version() -> str:
    try:
        return importlib.metadata.version("mlx-steer")
    except importlib.metadata.PackageNotFoundError:
        return "(source tree)"


def _note(lab: "Lab", steers: list[Steer]) -> dict:
    ops = []
    for s in steers:
        ops.append({
            "op": s.op, "layer": list(s.layer) if isinstance(s.layer, tuple) else s.layer,
            "strength": s.strength, "positions_requested": s.positions,
            "vector_norm": float(np.linalg.norm(s.vector)),
            "vector_sha256": hashlib.sha256(s.vector.tobytes()).hexdigest(),
        })
    return {
        "format": "mlx-steer-baked/1",
        "baked_with": f"mlx-steer {_version()}",
        "source_model": lab.name,
        "source_fingerprint": lab.fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "operations": ops,
        "positions": "every token, position 0 included (= runtime steering with positions=0)",
        "how": "ablations: embedding, attention o_proj and MLP down_proj orthogonalised "
               "against each direction (output head untied when it was tied); additions: "
               "a bias on that block's MLP down_proj (config mlp_bias=true)",
    }


def save(lab: "Lab", steer: SteerLike, path: str | Path, overwrite: bool = False) -> Path:
    """Write the baked model folder at `path` (atomically); return it."""
    from mlx_lm.utils import make_shards, save_config

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise InvalidArgumentError(f"{path} exists and is not empty (pass overwrite=True)")
    weights, config, note = baked_weights(lab, steer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        shards = make_shards(weights)
        fmt = ("model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1
               else "model.safetensors")
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                 "weight_map": {}}
        for i, shard in enumerate(shards):
            name = fmt.format(i + 1, len(shards))
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "mlx"})
            index["weight_map"].update({k: name for k in shard})
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        save_config(config, tmp / "config.json")
        lab.tokenizer.save_pretrained(str(tmp))
        (tmp / NOTE).write_text(json.dumps(note, indent=2))
        (tmp / "README.md").write_text(_readme(note))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _readme(note: dict) -> str:
    lines = [f"# {note['source_model']} with steering baked in", "",
             f"Written by {note['baked_with']} on {note['created']}; open it with "
             "`mlx_lm.load(path)`. Folded into the weights:", ""]
    for o in note["operations"]:
        what = ("ablation of a direction at every block and the embedding output"
                if o["op"] == "ablate" else
                f"addition at block {o['layer']} (strength {o['strength']:g})")
        lines.append(f"- {what}; |v| = {o['vector_norm']:.4g}, sha256 {o['vector_sha256'][:16]}")
    lines += ["", f"Positions: {note['positions']}.", "", f"How: {note['how']}.",
              f"Details: `{NOTE}`.", ""]
    return "\n".join(lines)
