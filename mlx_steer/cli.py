"""`mlx-steer`: steering experiments from the command line.

Every command takes `--model` (default: the embedded SmolLM2-135M-Instruct),
`--json` (machine-readable output on stdout) and `--quiet` (no progress bars).
Progress bars go to stderr. A bad argument prints one line on stderr and exits
with status 2; no traceback is shown (set MLX_STEER_DEBUG=1 to see one for an
unexpected error, which exits with status 1).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

from .steer import OPS

PROG = "mlx-steer"
REEXEC_GUARD = "MLX_STEER_REEXEC"  # set in the re-executed process: never loop
NO_PRELOAD = "MLX_STEER_NO_PRELOAD"  # set to 1 to skip the OpenBLAS re-exec
OPENBLAS_GLOB = "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"

DESCRIPTION = """\
Activation steering for MLX language models: add a concept vector ("happy",
"pirate", your own) to a model's residual stream at a layer and strength, and
compare what it writes with the unsteered model. Every variant of an experiment
is a row of one batched decode with the same seed, next to an unsteered
baseline row, and every row comes with metrics: VADER sentiment, marker-word
rate, perplexity under the unsteered model, repetition rate, KL divergence of
the first token vs the baseline, and the projection on the concept direction.

Strengths are RELATIVE by default: a fraction of the typical residual-stream
norm at the layer (0.1-0.5 is the useful band; near 1 the text breaks). Give
--raw to use a raw multiplier of the concept vector instead. Layers are 0-based
decoder blocks. Built-in concepts are extracted for a model on first use (a few
seconds each) and cached under $MLX_STEER_HOME (default ~/.cache/mlx-steer).
"""

EPILOG = """\
examples:
  mlx-steer generate --prompt "Tell me about your weekend." --concept happy
  mlx-steer sweep --prompt "Describe a city." --concept pirate --strengths 0.1,0.2,0.4
  mlx-steer sweep --prompt "Describe a city." --concept pirate --layers 4,8,12,16,20
  mlx-steer mix --prompt "Tell me about trains." --concepts happy:0.7,excited:0.3 --save
  mlx-steer generate --prompt "Write a birthday card." --concept happy --op ablate
  mlx-steer extract --name polite --pairs pairs.json
  mlx-steer extract --name polite --pairs pairs.json --method trained
  mlx-steer bake --out no-happy --ablate happy
  mlx-steer concepts list
  mlx-steer introspect --trials 20 --json
  mlx-steer eval --concept happy --concept pirate

speed on Linux: MLX's CPU wheel ships a slow reference BLAS. When Debian's
OpenBLAS (/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3) is installed and
LD_PRELOAD does not already name it, mlx-steer re-executes itself once with
LD_PRELOAD set to it before loading a model (several times faster), with the
sgemv shim of mlx_steer.fastpath when that builds. Set MLX_STEER_NO_PRELOAD=1
(or MLX_STEER_NO_FASTPATH=1) to prevent that.

several ranks (mlx.launch, see docs/SCALING.md): under `mlx.launch -n N ...`
sweep, mix and eval split their rows across the ranks; with --shard every
command runs the model sharded across them instead. Rank 0 alone prints.
"""


# ---- argument parsing -----------------------------------------------------------------


class UsageError(Exception):
    """A bad command line: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


MAX_LIST = 1024  # more layers than any model has: a longer list is a typo


def _int_list(text: str) -> list[int]:
    """'4,8,12', '0-29:4' or 'all' (kept as None). Sizes are checked before a range
    is expanded, so a short argument cannot ask for unbounded work."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                rng, _, step = part.partition(":")
                a, b = rng.split("-", 1)
                r = range(int(a), int(b) + 1, int(step or 1))
                if int(step or 1) < 1:
                    raise argparse.ArgumentTypeError(f"a range step must be >= 1, got {part!r}")
                n = (r.stop - r.start + r.step - 1) // r.step if r.stop > r.start else 0
                if len(out) + n > MAX_LIST:  # counted, not expanded (len() overflows)
                    raise argparse.ArgumentTypeError(
                        f"{part!r} has {n} values; at most {MAX_LIST} are allowed")
                out += list(r)
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected integers like 4,8,12 or 0-28:4, got {text!r:.80}") from None
        if len(out) > MAX_LIST:
            raise argparse.ArgumentTypeError(f"more than {MAX_LIST} values in the list")
    if not out:
        raise argparse.ArgumentTypeError(f"no layers in {text!r}")
    return out


def _layers(text: str) -> list[int] | str:
    return "all" if text.strip().lower() == "all" else _int_list(text)


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _floats(text: str) -> list[float]:
    vals = [_float(p) for p in text.split(",") if p.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.1,0.2,0.4, got {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _nonneg(text: str) -> float:
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _positions(text: str) -> str | int:
    if text in ("all", "prompt", "generated"):
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"positions must be all, prompt, generated or an integer >= 0, got {text!r}"
        ) from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"positions must be >= 0, got {v}")
    return v


def _weights(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, w = item.replace("=", ":").partition(":")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"expected name:weight items like happy:0.7,excited:0.3, got {item!r}")
        out.append((name.strip(), _float(w)))
    if not out:
        raise argparse.ArgumentTypeError("give at least one name:weight")
    return out


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    d = None if top else argparse.SUPPRESS  # sub-commands don't override the top level
    p.add_argument("--model", default=d, metavar="NAME",
                   help="model: embedded (default), mistral-7b, phi-3-mini, auto, a Hugging "
                        "Face repo id, an MLX folder or a llama .gguf file")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print machine-readable JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true",
                   default=False if top else argparse.SUPPRESS,
                   help="no progress bars on stderr")
    p.add_argument("--shard", action="store_true",
                   default=False if top else argparse.SUPPRESS,
                   help="under mlx.launch: shard the model across the ranks (mlx-lm's "
                        "tensor parallelism, else its pipeline stages) instead of "
                        "splitting the rows of an experiment")


def _steering(p: argparse.ArgumentParser, concept_required: bool = True,
              strength_help: str = "") -> None:
    src = p.add_mutually_exclusive_group(required=concept_required)
    src.add_argument("--concept", metavar="NAME",
                     help="a built-in or saved concept (see `mlx-steer concepts list`)")
    src.add_argument("--vector", metavar="FILE",
                     help="a steering vector file instead: .npy of shape (hidden,) (needs "
                          "--layer) or (layers, hidden), or a llama.cpp control vector .gguf")
    p.add_argument("--layer", type=int, metavar="L",
                   help="0-based decoder block to steer (default: the concept's recommended)")
    p.add_argument("--strength", type=_float, metavar="S", help=strength_help or (
        "relative strength: a fraction of the residual norm at the layer (default: the "
        "concept's recommended); with --raw, a raw multiplier of the vector"))
    p.add_argument("--raw", action="store_true",
                   help="--strength(s) are raw multipliers of the vector, not relative")
    p.add_argument("--positions", type=_positions, default="all", metavar="P",
                   help="tokens to steer: all (default), prompt, generated, or an integer k "
                        "(absolute positions >= k)")


def _sampling(p: argparse.ArgumentParser, max_tokens: int = 60, temperature: float = 0.0,
              ) -> None:
    p.add_argument("--max-tokens", type=_positive, default=max_tokens, metavar="N",
                   help=f"tokens to generate per row (default {max_tokens})")
    p.add_argument("--temperature", type=_nonneg, default=temperature, metavar="T",
                   help=f"sampling temperature, 0 = greedy (default {temperature:g})")
    p.add_argument("--seed", type=int, default=0, metavar="K",
                   help="sampling seed, the same for every row (default 0)")


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, formatter_class=fmt)
        _common(p)
        return p

    p = command("generate", "baseline and steered text side by side",
                "Generate from one prompt twice in one batch (same seed): unsteered and "
                "steered, printed side by side with their metrics.")
    p.add_argument("--prompt", required=True, help="the user message (chat template applied)")
    _steering(p)
    p.add_argument("--op", choices=OPS, default="add",
                   help="add the vector (default); ablate its direction (strength ignored; "
                        "default layer: every block and the embedding output); or cap the "
                        "component along it at --strength")
    _sampling(p)
    p.add_argument("--no-metrics", action="store_true",
                   help="skip the model-based metrics (perplexity, projection)")
    p.set_defaults(func=cmd_generate)

    p = command("sweep", "one concept over layers or strengths",
                "Sweep one concept over layers (each layer with its own vector, at one "
                "strength) or over strengths (at one layer; 0 is always included). Every "
                "variant plus the baseline is a row of one batched decode.")
    p.add_argument("--prompt", required=True, action="append",
                   help="the user message; repeat for several prompts (rows differ in prompt)")
    _steering(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--layers", type=_layers, metavar="LIST",
                      help="layers to sweep: 4,8,12, a range 0-28:4, or all")
    what.add_argument("--strengths", type=_floats, metavar="LIST",
                      help="strengths to sweep, e.g. 0.1,0.2,0.4 (relative unless --raw)")
    _sampling(p)
    p.add_argument("--no-metrics", action="store_true",
                   help="skip the model-based metrics (perplexity, projection)")
    p.set_defaults(func=cmd_sweep)

    p = command("mix", "generate with a weighted mix of concepts (and save it)",
                "Mix concepts (each layer's vector normalised to unit norm first unless "
                "--raw-mix, weights as shares), generate with the mix next to the baseline "
                "and each part alone, and optionally save it to the model's library.")
    p.add_argument("--prompt", required=True, action="append", help="the user message")
    p.add_argument("--concepts", required=True, type=_weights, metavar="LIST",
                   help="name:weight items, e.g. happy:0.7,excited:0.3")
    p.add_argument("--raw-mix", action="store_true",
                   help="weighted sum of the raw vectors (no normalisation)")
    p.add_argument("--layer", type=int, metavar="L",
                   help="layer (default: the heaviest part's recommended layer)")
    p.add_argument("--strength", type=_float, metavar="S",
                   help="relative strength (default: the parts' weighted recommended "
                        "strength); with --raw, a raw multiplier of the mixed vector")
    p.add_argument("--raw", action="store_true", help="--strength is a raw multiplier")
    p.add_argument("--positions", type=_positions, default="all", metavar="P",
                   help="tokens to steer: all, prompt, generated or an integer k")
    p.add_argument("--name", help="name of the mix (default: mix-happy70-excited30)")
    p.add_argument("--save", action="store_true", help="save the mix to the model's library")
    p.add_argument("--no-parts", action="store_true",
                   help="don't generate with each part alone")
    _sampling(p)
    p.set_defaults(func=cmd_mix)

    p = command("extract", "make a concept from contrast pairs in a file",
                "Extract a concept from (positive, negative) text pairs: a vector for "
                "every layer, a recommended layer and strength; saved to the model's "
                "library. The file is JSON ([[pos, neg], ...], [{\"positive\": ..., "
                "\"negative\": ...}], or {\"pairs\": ...} like the built-in specs), JSON "
                "lines, or tab-separated lines 'positive<TAB>negative'.")
    p.add_argument("--name", required=True, help="concept name (letters, digits, _ or -)")
    p.add_argument("--pairs", required=True, metavar="FILE", help="the pairs file")
    p.add_argument("--method", choices=("mean", "pca", "classic", "trained"), default="mean",
                   help="mean of differences (default), first principal component, the "
                        "first pair only, or a vector trained at one layer with a "
                        "bi-directional preference objective (slower; see --layer, --seed)")
    p.add_argument("--layer", type=int, metavar="L",
                   help="the block to recommend (and, with --method trained, to train at); "
                        "default: the block where the pairs separate best")
    p.add_argument("--seed", type=int, default=0, metavar="K",
                   help="seed of the trained method's minibatches (default 0)")
    p.add_argument("--read", choices=("last", "mean"), default="last",
                   help="read the last token (default) or the mean over tokens")
    p.add_argument("--chat", action="store_true",
                   help="wrap the texts in the chat template before reading")
    p.add_argument("--description", default="", help="a description to store")
    p.add_argument("--no-save", action="store_true", help="don't save it")
    p.add_argument("--force", action="store_true", help="replace a saved concept of that name")
    p.set_defaults(func=cmd_extract)

    p = command("bake", "write an MLX model folder with steering folded into the weights",
                "Fold steering into the weights and write an MLX model folder that plain "
                "`mlx_lm.load(folder)` opens without mlx-steer: --ablate removes a concept's "
                "direction at every block (the weights writing into the residual stream are "
                "orthogonalised), --add adds a concept at one block (a bias on that block's "
                "MLP down projection; llama-family models only). Weights act on every "
                "token, position 0 included. The folder carries mlx_steer_bake.json and a "
                "README saying what was baked.")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--ablate", action="append", default=[], metavar="NAME",
                   help="a concept whose direction to ablate everywhere (repeatable)")
    p.add_argument("--add", action="append", default=[], metavar="NAME[:S][@L]",
                   help="a concept to add at block L (default: recommended) with relative "
                        "strength S (default: recommended), e.g. happy:0.3@12 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_bake)

    p = command("concepts", "list, show, export, import or delete concepts",
                "Manage concepts: the 17 built-ins and the concepts saved for the model.")
    csub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    csub.required = True
    q = csub.add_parser("list", help="list concepts", formatter_class=fmt)
    _common(q)
    q.set_defaults(func=cmd_concepts_list)
    q = csub.add_parser("show", help="a concept's details", formatter_class=fmt)
    _common(q)
    q.add_argument("name")
    q.set_defaults(func=cmd_concepts_show)
    q = csub.add_parser("export-gguf", help="write a llama.cpp control vector",
                        formatter_class=fmt)
    _common(q)
    q.add_argument("name")
    q.add_argument("out", help="output .gguf path")
    q.add_argument("--layers", default="default", metavar="LIST",
                   help="default (the recommended layer at the recommended strength), all "
                        "(every layer's raw vector), or a list like 10,12,14")
    q.set_defaults(func=cmd_concepts_export)
    q = csub.add_parser("import-gguf", help="read a llama.cpp / repeng control vector",
                        formatter_class=fmt)
    _common(q)
    q.add_argument("file")
    q.add_argument("--name", help="concept name (default: the file's stem)")
    q.add_argument("--force", action="store_true", help="replace a saved concept")
    q.set_defaults(func=cmd_concepts_import)
    q = csub.add_parser("delete", help="delete a saved concept", formatter_class=fmt)
    _common(q)
    q.add_argument("name")
    q.set_defaults(func=cmd_concepts_delete)

    p = command("introspect", "the injected-thought detection test (Lindsey 2025)",
                "Inject word concept vectors from the newline before 'Trial 1' on and ask "
                "the model whether it detects an injected thought; run control trials "
                "without injection and yes/no control questions with and without it; grade "
                "by documented rules. Reports detection rate, false-positive rate and "
                "yes-bias shift with trial counts. Small models are not expected to pass.")
    p.add_argument("--trials", type=_count, default=20, metavar="N",
                   help="injected trials per strength (default 20)")
    p.add_argument("--control-trials", type=_count, metavar="N",
                   help="trials without injection (default: --trials)")
    p.add_argument("--yes-bias", type=_count, default=20, metavar="N",
                   help="control questions asked with and without injection (0-20, default "
                        "20)")
    p.add_argument("--layer", type=int, metavar="L",
                   help="injection layer (default: round(2/3 of the depth))")
    p.add_argument("--layer-fraction", type=_float, default=2 / 3, metavar="F",
                   help="depth fraction used when --layer is not given (default 0.667)")
    p.add_argument("--strength", type=_floats, metavar="S",
                   help="strength(s), e.g. 0.2 or 0.1,0.2: relative unless --raw (default: "
                        "raw 2, the paper's)")
    p.add_argument("--raw", action="store_true",
                   help="--strength is a raw multiple of the word vector (paper: 1,2,4,8)")
    p.add_argument("--words", metavar="LIST",
                   help="comma-separated concept words (default: the paper's 50)")
    p.add_argument("--baseline-words", type=_positive, metavar="N",
                   help="subtract the mean of the first N of the paper's 100 baseline words "
                        "(default: all; fewer is faster and noisier)")
    p.add_argument("--batch-size", type=_positive, default=16, metavar="B",
                   help="rows per batched decode (default 16)")
    p.add_argument("--transcripts", action="store_true",
                   help="print every response (text mode; --json always includes them)")
    _sampling(p, max_tokens=100, temperature=1.0)
    p.set_defaults(func=cmd_introspect)

    p = command("eval", "score concepts on several prompts against the baseline",
                "Steer each concept (recommended or given layer and strength) on several "
                "neutral prompts next to the baseline, all in one batch, and summarise the "
                "metrics as steered minus baseline.")
    p.add_argument("--concept", action="append", metavar="NAME",
                   help="a concept (repeat, or comma-separate; default happy); 'builtins' "
                        "for all 17")
    p.add_argument("--prompt", action="append", help="prompts (default: neutral prompts)")
    p.add_argument("--prompts", type=_positive, default=4, metavar="N",
                   help="how many of the packaged neutral prompts (default 4)")
    p.add_argument("--layer", type=int, metavar="L", help="layer for every concept")
    p.add_argument("--strength", type=_float, metavar="S",
                   help="relative strength for every concept (raw with --raw)")
    p.add_argument("--raw", action="store_true", help="--strength is a raw multiplier")
    p.add_argument("--prompted", action="store_true",
                   help="add each concept's prompting baseline (the prompt plus its style "
                        "instruction, unsteered) and the expression score of every row")
    _sampling(p, max_tokens=40)
    p.set_defaults(func=cmd_eval)

    p = command("serve", "an OpenAI-compatible server with steering per request",
                "Serve the model over HTTP with the OpenAI API's shapes (/v1/chat/completions, "
                "/v1/completions, /v1/models, /v1/concepts); a request's \"steering\" list "
                "steers it alone. Concurrent requests are decoded together (continuous "
                "batching).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_positive, default=8080, help="port (default 8080)")
    p.add_argument("--max-rows", type=_positive, default=8, metavar="N",
                   help="requests decoded together at most (default 8)")
    p.add_argument("--max-queue", type=_count, default=32, metavar="N",
                   help="requests waiting at most; more get a 429 (default 32)")
    p.add_argument("--max-request-bytes", type=_positive, default=1 << 20, metavar="N",
                   help="largest request body; larger get a 413 (default 1 MiB)")
    p.add_argument("--allow-raw-vectors", action="store_true",
                   help="accept raw steering vectors (hidden-size lists) in requests")
    p.set_defaults(func=cmd_serve)
    return parser


# ---- helpers ------------------------------------------------------------------------------


def _say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


class Bar:
    """A lazily opened tqdm bar on stderr, driven as progress(done, total)."""

    def __init__(self, args: argparse.Namespace, desc: str, unit: str = "step"):
        self.enabled = not getattr(args, "quiet", False)
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr,
                            leave=False, dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = min(done, total)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LABS: dict[str | None, Any] = {}


def _lab(args: argparse.Namespace):
    """The model, loaded once per process."""
    import mlx_steer

    name = getattr(args, "model", None)
    if name not in _LABS:
        if not getattr(args, "quiet", False) and sys.stderr.isatty():
            _say(f"loading {name or 'the embedded model'} …")
        _LABS[name] = mlx_steer.load(name, group=args.group if args.shard else None)
    return _LABS[name]


def _concept(lab, name: str, args: argparse.Namespace):
    """A concept by name; a built-in not yet extracted for this model shows a bar."""
    from .library import validate_name

    name = validate_name(name)
    if name in lab.builtins() and name not in lab.library:
        with Bar(args, f"extracting and calibrating {name}", "‰") as bar:
            return lab._builtin(name, progress=bar)
    return lab.concept(name)


def _vector_concept(lab, path: str, layer: int | None):
    """A Concept wrapping a vector file (.npy or .gguf control vector)."""
    import numpy as np

    from .concept import Concept
    from .errors import CorruptFileError, InvalidArgumentError
    from .extract import residual_norms

    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"no such vector file: {path}")
    stem = "".join(c for c in p.stem.lower() if c.isalnum() or c in "_-") or "vector"
    if p.suffix.lower() == ".gguf":
        c = Concept.from_gguf(p, lab, name=stem)
        if layer is not None:
            c.layer = c._layer(layer)
        return c
    if p.suffix.lower() != ".npy":
        raise InvalidArgumentError(f"{p.name}: a vector file must be .npy or .gguf")
    try:
        v = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's
        raise CorruptFileError(f"cannot read {p.name}: {e}") from None
    v = np.asarray(v, np.float32)
    if v.ndim == 1:
        if layer is None:
            raise InvalidArgumentError(f"{p.name} holds one vector: give --layer")
        if v.shape[0] != lab.hidden_size:
            raise InvalidArgumentError(
                f"{p.name} has {v.shape[0]} dimensions; this model's hidden size is "
                f"{lab.hidden_size}")
        vectors = np.zeros((lab.num_layers, lab.hidden_size), np.float32)
        vectors[lab_layer(lab, layer)] = v
    elif v.ndim == 2 and v.shape == (lab.num_layers, lab.hidden_size):
        vectors = v
    else:
        raise InvalidArgumentError(
            f"{p.name} has shape {v.shape}; expected ({lab.hidden_size},) or "
            f"({lab.num_layers}, {lab.hidden_size})")
    if not np.all(np.isfinite(vectors)):
        raise InvalidArgumentError(f"{p.name} contains NaN or infinite values")
    norms = residual_norms(lab)
    rel = np.linalg.norm(vectors, axis=1) / norms
    best = int(np.argmax(rel)) if layer is None else lab_layer(lab, layer)
    return Concept(name=stem, vectors=vectors, norms=norms, layer=best, strength=0.25,
                   model_fingerprint=lab.fingerprint, model_name=lab.name, method="file",
                   category="file", description=f"from {p.name}")


def lab_layer(lab, layer: int) -> int:
    from .errors import LayerOutOfRangeError

    if not 0 <= layer < lab.num_layers:
        raise LayerOutOfRangeError(
            f"layer {layer} is out of range: this model has {lab.num_layers} layers "
            f"(0 … {lab.num_layers - 1})")
    return layer


def _source(lab, args: argparse.Namespace):
    if args.layer is not None:
        lab_layer(lab, args.layer)
    if getattr(args, "vector", None):
        return _vector_concept(lab, args.vector, args.layer)
    return _concept(lab, args.concept, args)


def _check_raw(args: argparse.Namespace) -> None:
    if getattr(args, "raw", False) and getattr(args, "strength", None) is None \
            and getattr(args, "strengths", None) is None:
        raise UsageError("--raw needs --strength (a raw multiplier of the vector)")


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _emit(args: argparse.Namespace, obj: Any, text: Callable[[], str]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(text().rstrip("\n") + "\n")
    sys.stdout.flush()


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 10 ** -nd:
        return f"{v:.{nd}g}"
    return f"{v:.{nd}f}".rstrip("0").rstrip(".")


def _width() -> int:
    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 160))


def _wrap(text: str, width: int) -> list[str]:
    out: list[str] = []
    for para in (text.strip() or "(empty)").splitlines() or [""]:
        out += textwrap.wrap(para, width) or [""]
    return out


def _side_by_side(left: tuple[str, str], right: tuple[str, str]) -> str:
    w = (_width() - 3) // 2
    a, b = _wrap(left[1], w), _wrap(right[1], w)
    lines = [f"{left[0][:w]:<{w}} │ {right[0][:w]}", f"{'─' * w}─┼─{'─' * w}"]
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else ""
        y = b[i] if i < len(b) else ""
        lines.append(f"{x:<{w}} │ {y}")
    return "\n".join(lines)


METRIC_COLUMNS = (("sentiment", "sent"), ("marker_rate", "mark"), ("perplexity", "ppl"),
                  ("repetition_rate", "rep"), ("kl_divergence", "KL"),
                  ("projection", "proj"))


def _metric_line(r: dict) -> str:
    return "  ".join(f"{short} {_fmt(r.get(k))}" for k, short in METRIC_COLUMNS)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("─" * w for w in widths))
    return "\n".join(lines)


def _run_kw(args: argparse.Namespace, bar: Bar) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                progress=bar, score=not getattr(args, "no_metrics", False),
                group=None if args.shard else args.group)


def _steer_header(r: dict) -> str:
    return f"{r['concept']} · layer {r['layer']} · strength {_fmt(r['strength'])}"


# ---- commands -----------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from . import experiments as X

    _check_raw(args)
    lab = _lab(args)
    concept = _source(lab, args)
    with Bar(args, "generating", "token") as bar:
        rows = X.compare(lab, args.prompt, concept, args.layer, args.strength,
                         relative=not args.raw, positions=args.positions, op=args.op,
                         **_run_kw(args, bar))
    base, steered = rows[0], rows[1]
    obj = {"model": lab.name, "prompt": args.prompt, "concept": steered["concept"],
           "op": args.op, "layer": ("all" if args.op == "ablate" and args.layer is None
                                    else steered["layer"]),
           "strength": steered["strength"],
           "raw_strength": steered["raw_strength"], "positions": args.positions,
           "baseline": base["text"], "steered": steered["text"], "rows": rows}

    def text() -> str:
        return "\n".join([
            _side_by_side(("baseline", base["text"]), (_steer_header(steered),
                                                       steered["text"])),
            "", "baseline  " + _metric_line(base), "steered   " + _metric_line(steered)])

    _emit(args, obj, text)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from . import experiments as X

    _check_raw(args)
    lab = _lab(args)
    concept = _source(lab, args)
    with Bar(args, "sweep", "token") as bar:
        kw = _run_kw(args, bar)
        if args.layers is not None:
            layers = list(range(lab.num_layers)) if args.layers == "all" else args.layers
            for layer in layers:
                lab_layer(lab, layer)
            rows = X.layer_analysis(lab, args.prompt, concept, layers, args.strength,
                                    relative=not args.raw, positions=args.positions, **kw)
            kind = "layers"
        else:
            rows = X.strength_explorer(lab, args.prompt, concept, args.strengths, args.layer,
                                       relative=not args.raw, positions=args.positions, **kw)
            kind = "strengths"
    obj = {"model": lab.name, "experiment": kind, "concept": concept.name, "rows": rows}

    def text() -> str:
        cols = [("layer", "layer"), ("strength", "strength"), ("raw_strength", "raw")]
        cols += [(k, h) for k, h in METRIC_COLUMNS]
        if len(args.prompt) > 1:
            cols.insert(0, ("row", "row"))
        out = [f"{concept.name}: sweep over {kind}", _table(rows, cols), ""]
        for r in rows:
            who = "baseline" if r["is_baseline"] else \
                f"layer {r['layer']}, strength {_fmt(r['strength'])}"
            pre = f"[{r['row']}] {who}" + (f" · {r['prompt']}" if len(args.prompt) > 1 else "")
            out += [pre, textwrap.indent("\n".join(_wrap(r["text"], _width() - 4)), "    ")]
        return "\n".join(out)

    _emit(args, obj, text)
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from . import experiments as X
    from .library import validate_name

    _check_raw(args)
    if args.name is not None:
        validate_name(args.name)
    lab = _lab(args)
    parts = [(_concept(lab, n, args), w) for n, w in args.concepts]
    with Bar(args, "mix", "token") as bar:
        mixed, rows = X.mix(lab, args.prompt, parts, normalize=not args.raw_mix,
                            layer=args.layer, strength=args.strength, relative=not args.raw,
                            positions=args.positions, name=args.name, save=args.save,
                            include_parts=not args.no_parts, **_run_kw(args, bar))
    mrow = next(r for r in rows if r["kind"] == "mix")
    saved = mrow.get("saved")
    obj = {"model": lab.name, "concept": mixed.name, "parts": [[n, w] for n, w in args.concepts],
           "normalize": not args.raw_mix, "layer": mrow["layer"], "strength": mrow["strength"],
           "raw_strength": mrow["raw_strength"], "saved": saved, "text": mrow["text"],
           "rows": rows}

    def text() -> str:
        out = [f"{mixed.name} = {mixed.description}  (layer {mrow['layer']}, strength "
               f"{_fmt(mrow['strength'])}" + (", raw sum" if args.raw_mix else "") + ")"]
        for r in rows:
            who = {"baseline": "baseline", "mix": "mix"}.get(r["kind"], r["concept"])
            out += ["", f"{who}:  {_metric_line(r)}",
                    textwrap.indent("\n".join(_wrap(r["text"], _width() - 4)), "    ")]
        if saved:
            out += ["", f"saved as {mixed.name!r} ({saved})"]
        return "\n".join(out)

    _emit(args, obj, text)
    return 0


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(positive, negative) pairs from a JSON, JSON-lines or tab-separated file."""
    from .errors import CorruptFileError, InvalidArgumentError

    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"no such pairs file: {path}")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"cannot read {p.name}: {e}") from None

    def pair(item: Any) -> tuple[str, str]:
        if isinstance(item, dict):
            a = item.get("positive", item.get("pos"))
            b = item.get("negative", item.get("neg"))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            a, b = item
        else:
            a = b = None
        if not isinstance(a, str) or not isinstance(b, str):
            raise InvalidArgumentError(
                f"{p.name}: each pair must be [positive, negative] texts, got {item!r:.80}")
        return a, b

    text = raw.strip()
    items: list[Any]
    try:
        try:
            data = json.loads(text)
        except RecursionError:
            raise CorruptFileError(f"{p.name}: JSON nested too deeply") from None
        items = data.get("pairs") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise InvalidArgumentError(f"{p.name}: expected a list of pairs or {{\"pairs\": …}}")
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            items = [json.loads(ln) for ln in lines]
        except RecursionError:
            raise CorruptFileError(f"{p.name}: JSON nested too deeply") from None
        except json.JSONDecodeError:
            items = []
            for n, ln in enumerate(lines, 1):
                cells = ln.split("\t")
                if len(cells) != 2:
                    raise InvalidArgumentError(
                        f"{p.name} line {n}: expected JSON or 'positive<TAB>negative'"
                    ) from None
                items.append(cells)
    pairs = [pair(i) for i in items]
    if not pairs:
        raise InvalidArgumentError(f"{p.name} holds no pairs")
    return pairs


def cmd_extract(args: argparse.Namespace) -> int:
    from .errors import InvalidArgumentError
    from .library import validate_name

    name = validate_name(args.name)
    pairs = read_pairs(args.pairs)
    lab = _lab(args)
    if not args.no_save and not args.force and name in lab.library:
        raise InvalidArgumentError(
            f"a concept {name!r} is already saved for this model; give --force to replace it")
    with Bar(args, f"extracting and calibrating {name}", "‰") as bar:
        if args.layer is not None:
            lab_layer(lab, args.layer)
        c = lab.extract(name, pairs, method=args.method, read=args.read, chat=args.chat,
                        progress=bar, description=args.description, layer=args.layer,
                        seed=args.seed)
    path = None if args.no_save else lab.save_concept(c)
    obj = {"model": lab.name, "name": c.name, "layer": c.layer, "strength": c.strength,
           "raw_strength": c.relative_to_raw(c.layer, c.strength), "method": c.method,
           "read": c.read, "pairs": len(c.pairs), "saved": path,
           "layer_scores": c.extra.get("layer_scores"),
           "calibration": c.extra.get("calibration"), "steers": c.extra.get("steers"),
           "trained": c.extra.get("trained")}
    _emit(args, obj, lambda: (
        f"{c.name}: {len(c.pairs)} pairs, method {c.method}; recommended layer {c.layer}, "
        f"strength {_fmt(c.strength)} (relative)" + (f"\nsaved to {path}" if path else
                                                     "\nnot saved")))
    return 0


def _add_spec(text: str) -> tuple[str, float | None, int | None]:
    """NAME[:STRENGTH][@LAYER] of `bake --add`."""
    rest, _, layer = text.partition("@")
    name, _, strength = rest.partition(":")
    try:
        return (name.strip(), float(strength) if strength.strip() else None,
                int(layer) if layer.strip() else None)
    except ValueError:
        raise UsageError(f"--add expects NAME[:STRENGTH][@LAYER], got {text!r}") from None


def cmd_bake(args: argparse.Namespace) -> int:
    from .bake import NOTE

    if not args.ablate and not args.add:
        raise UsageError("give at least one --ablate or --add concept")
    specs = [_add_spec(t) for t in args.add]
    lab = _lab(args)
    steers = [_concept(lab, name, args).ablate(positions=0) for name in args.ablate]
    for name, strength, layer in specs:
        if layer is not None:
            lab_layer(lab, layer)
        steers.append(_concept(lab, name, args).steer(layer, strength, positions=0))
    path = lab.bake(steers, args.out, overwrite=args.overwrite)
    note = json.loads((path / NOTE).read_text())
    obj = {"model": lab.name, "path": str(path), "ablate": args.ablate,
           "add": [{"concept": n, "strength": s, "layer": la} for n, s, la in specs],
           "note": note}
    _emit(args, obj, lambda: (
        f"wrote {path} ({len(note['operations'])} operation(s) baked); open it with "
        f"mlx_lm.load({str(path)!r})"))
    return 0


def _concept_info(lab, name: str) -> dict:
    from .errors import MlxSteerError
    from .library import BUILTINS, Library

    saved = name in lab.library
    builtin = name in BUILTINS
    info: dict[str, Any] = {"name": name, "source": "library" if saved else "builtin",
                            "builtin": builtin, "layer": None, "strength": None,
                            "category": None, "description": None, "extracted": saved}
    c = None
    if saved:
        try:
            c = lab.library.load(name)
        except MlxSteerError as e:  # one unreadable concept: listed, marked, the rest shown
            info.update(source="library (unreadable)", extracted=False, error=str(e))
    elif builtin:
        cache = Library(lab.fingerprint, lab.name, sub="builtin")
        if name in cache:
            try:
                c = cache.load(name)
                info["extracted"] = True
            except Exception:  # noqa: BLE001 - a stale cache is re-extracted on use
                c = None
    if c is not None:
        info.update(layer=c.layer, strength=c.strength, category=c.category,
                    description=c.description)
    elif builtin:
        from .library import builtin_spec

        spec = builtin_spec(name)
        info.update(category=spec.get("category"), description=spec.get("description"))
    return info


def cmd_concepts_list(args: argparse.Namespace) -> int:
    lab = _lab(args)
    infos = [_concept_info(lab, n) for n in lab.concepts()]
    obj = {"model": lab.name, "concepts": infos}

    def text() -> str:
        cols = [("name", "name"), ("source", "source"), ("category", "category"),
                ("layer", "layer"), ("strength", "strength")]
        rows = [dict(i, strength=i["strength"], layer=i["layer"] if i["extracted"] else None)
                for i in infos]
        bad = [f"{i['name']}: {i['error']}" for i in infos if i.get("error")]
        return (_table(rows, cols) + "\n\n(– : a built-in not yet extracted for this model; "
                "it is extracted on first use)" + "".join(f"\nunreadable {b}" for b in bad))

    _emit(args, obj, text)
    return 0


def cmd_concepts_show(args: argparse.Namespace) -> int:
    import numpy as np

    from .experiments import concept_eval, concept_markers

    lab = _lab(args)
    c = _concept(lab, args.name, args)
    vn = np.linalg.norm(c.vectors, axis=1)
    obj = {"model": lab.name, "name": c.name, "layer": c.layer, "strength": c.strength,
           "raw_strength": c.relative_to_raw(c.layer, c.strength), "method": c.method,
           "read": c.read, "template": c.template, "category": c.category,
           "description": c.description, "pairs": len(c.pairs),
           "markers": concept_markers(c), "eval": concept_eval(c),
           "num_layers": c.num_layers, "hidden_size": c.hidden_size,
           "vector_norms": vn.tolist(), "residual_norms": c.norms.tolist(),
           "relative_norms": (vn / np.maximum(c.norms, 1e-12)).tolist(),
           "layer_scores": c.extra.get("layer_scores"),
           "calibration": c.extra.get("calibration"), "steers": c.extra.get("steers"),
           "mix": c.extra.get("mix")}

    def text() -> str:
        lines = [f"{c.name} ({c.category}): {c.description}",
                 f"recommended: layer {c.layer}, strength {_fmt(c.strength)} relative "
                 f"(raw {_fmt(obj['raw_strength'])})",
                 f"method {c.method}, read {c.read}, template {c.template}, "
                 f"{len(c.pairs)} pairs"]
        if obj["markers"]:
            lines.append("markers: " + ", ".join(obj["markers"]))
        if obj["eval"]:
            lines.append(f"evaluation: {obj['eval']}")
        if obj["calibration"]:
            cal = obj["calibration"]
            said = "expresses the concept" if obj["steers"] else "not steering"
            lines.append(f"calibration ({said}; instruction: {cal['instruction']}):")
            lines.append(_table(cal["grid"], [("layer", "layer"), ("strength", "α"),
                                              ("expression", "expression"),
                                              ("projection", "projection"),
                                              ("ppl_ratio", "ppl ×"),
                                              ("distinct2_ratio", "distinct-2 ×"),
                                              ("coherent", "coherent")]))
        rows = [{"layer": i, "vector": float(vn[i]), "residual": float(c.norms[i]),
                 "ratio": float(obj["relative_norms"][i]),
                 "score": (obj["layer_scores"] or [None] * c.num_layers)[i]}
                for i in range(c.num_layers)]
        lines += ["", _table(rows, [("layer", "layer"), ("vector", "‖v‖"),
                                    ("residual", "median ‖h‖"), ("ratio", "‖v‖/‖h‖"),
                                    ("score", "separation")])]
        return "\n".join(lines)

    _emit(args, obj, text)
    return 0


def cmd_concepts_export(args: argparse.Namespace) -> int:
    layers: Any = args.layers
    if layers not in ("default", "all"):
        try:
            layers = _int_list(layers)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--layers: {e}") from None
    lab = _lab(args)
    c = _concept(lab, args.name, args)
    path = c.to_gguf(args.out, layers)
    _emit(args, {"name": c.name, "path": str(path), "layers": layers},
          lambda: f"wrote {path}")
    return 0


def cmd_concepts_import(args: argparse.Namespace) -> int:
    from .concept import Concept
    from .errors import InvalidArgumentError
    from .library import validate_name

    if not Path(args.file).is_file():
        raise InvalidArgumentError(f"no such file: {args.file}")
    name = validate_name(args.name or "".join(
        ch for ch in Path(args.file).stem.lower() if ch.isalnum() or ch in "_-") or "imported")
    lab = _lab(args)
    if name in lab.library and not args.force:
        raise InvalidArgumentError(
            f"a concept {name!r} is already saved for this model; give --force or --name")
    c = Concept.from_gguf(args.file, lab, name=name)
    path = lab.save_concept(c)
    _emit(args, {"name": c.name, "layer": c.layer, "strength": c.strength,
                 "saved": str(path)},
          lambda: f"imported {c.name!r}: layer {c.layer}, strength {_fmt(c.strength)} "
                  f"(relative)\nsaved to {path}")
    return 0


def cmd_concepts_delete(args: argparse.Namespace) -> int:
    from .errors import ConceptNotFoundError
    from .library import BUILTINS, validate_name

    name = validate_name(args.name)
    lab = _lab(args)
    if name not in lab.library:
        extra = " (built-in concepts cannot be deleted)" if name in BUILTINS else ""
        raise ConceptNotFoundError(f"no saved concept {name!r} for {lab.name}{extra}")
    lab.delete_concept(name)
    _emit(args, {"deleted": name}, lambda: f"deleted {name!r}")
    return 0


def cmd_introspect(args: argparse.Namespace) -> int:
    from . import introspection as I

    _check_raw(args)
    if not 0 < args.layer_fraction < 1:
        raise UsageError("--layer-fraction must be between 0 and 1")
    if args.yes_bias > len(I.protocol()["control_questions"]):
        raise UsageError(f"--yes-bias is at most {len(I.protocol()['control_questions'])}")
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    if args.words is not None and not words:
        raise UsageError("--words is empty")
    lab = _lab(args)
    if args.layer is not None:
        lab_layer(lab, args.layer)
    strengths = args.strength if args.strength is not None else list(I.DEFAULT_STRENGTHS)
    relative = args.strength is not None and not args.raw
    with Bar(args, "introspection", "row") as bar:
        report = I.run(lab, trials=args.trials, layer=args.layer,
                       layer_fraction=args.layer_fraction, strengths=strengths,
                       relative=relative, control_trials=args.control_trials,
                       yes_bias=args.yes_bias, max_tokens=args.max_tokens,
                       temperature=args.temperature, seed=args.seed,
                       batch_size=args.batch_size, words=words,
                       baseline_words=(I.protocol()["baseline_words"][:args.baseline_words]
                                       if args.baseline_words else None),
                       progress=bar)

    def text() -> str:
        r = report
        pct = lambda v: "–" if v is None else f"{v:.0%}"  # noqa: E731
        yb = r["yes_bias"]
        lines = [
            f"injected-thought detection · {r['model']} · layer {r['layer']}/{r['num_layers']} "
            f"· strengths {', '.join(_fmt(s) for s in r['strengths'])} "
            f"({'relative' if r['relative'] else 'raw'}) · T={_fmt(r['temperature'])}",
            f"detection rate       {r['detections']}/{r['trials']} = {pct(r['detection_rate'])}",
            f"false-positive rate  {r['false_positives']}/{r['control_trials']} = "
            f"{pct(r['false_positive_rate'])}",
            f"yes-bias shift       {pct(yb['injected_yes_rate'])} with injection vs "
            f"{pct(yb['control_yes_rate'])} without ({yb['questions']} questions)",
            f"affirmative {pct(r['affirmative_rate'])} · named {pct(r['named_rate'])} · "
            f"coherent {pct(r['coherence_rate'])} (injected trials)",
        ]
        for b in r["by_strength"]:
            lines.append(f"  strength {_fmt(b['strength'])}: {b['detections']}/{b['trials']} "
                         f"detected, mean relative strength "
                         f"{_fmt(b['mean_relative_strength'])}")
        lines += ["", textwrap.fill(r["verdict"], _width())]
        if args.transcripts:
            for t in r["transcripts"]:
                tag = t["kind"] + (f" [{t['word']}]" if t.get("word") else "")
                verdict = t.get("reason") or ("yes" if t.get("says_yes") else "no")
                lines += ["", f"{tag} → {verdict}",
                          textwrap.indent("\n".join(_wrap(t["response"], _width() - 4)),
                                          "    ")]
        return "\n".join(lines)

    _emit(args, report, text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import experiments as X
    from .prompts import neutral_prompts
    from .library import BUILTINS

    _check_raw(args)
    names: list[str] = []
    for item in args.concept or ["happy"]:
        for n in item.split(","):
            n = n.strip()
            if n == "builtins":
                names += list(BUILTINS)
            elif n:
                names.append(n)
    names = list(dict.fromkeys(names))
    prompts = args.prompt or neutral_prompts(args.prompts)
    lab = _lab(args)
    if args.layer is not None:
        lab_layer(lab, args.layer)
    concepts = [_concept(lab, n, args) for n in names]
    with Bar(args, "eval", "token") as bar:
        rows = X.evaluate(lab, concepts, prompts, args.layer, args.strength,
                          relative=not args.raw, prompted=args.prompted,
                          expression=args.prompted, **_run_kw(args, bar))
    summary = X.summarize(rows, by=("kind", "concept"))
    obj = {"model": lab.name, "prompts": prompts, "summary": summary, "rows": rows}

    def text() -> str:
        cols = [("concept", "concept"), ("n", "n"), ("concept_score_delta", "Δscore"),
                ("sentiment_delta", "Δsent"), ("marker_rate_delta", "Δmark"),
                ("perplexity", "ppl"), ("perplexity_delta", "Δppl"),
                ("repetition_rate", "rep"), ("kl_divergence", "KL")]
        if args.prompted:
            cols.insert(3, ("expression_delta", "Δexpr"))
        srows = [dict(s, concept="baseline" if s["kind"] == "baseline" else
                      f"{s['concept']} (prompted)" if s["kind"] == "prompted" else s["concept"])
                 for s in summary]
        return (f"{len(prompts)} prompts × {len(names)} concepts, {args.max_tokens} tokens, "
                "steered minus baseline\n" + _table(srows, cols))

    _emit(args, obj, text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(_lab(args), args.host, args.port, args.max_rows, args.max_queue,
          args.max_request_bytes, args.allow_raw_vectors,
          log_level="warning" if args.quiet else "info")
    return 0


# ---- entry point ----------------------------------------------------------------------------


def openblas_path() -> str | None:
    libs = sorted(glob.glob(OPENBLAS_GLOB))
    return libs[0] if libs else None


def preload_value() -> str | None:
    """The LD_PRELOAD value to use: mlx_steer.fastpath's (OpenBLAS, with its sgemv
    shim when it builds) where that module exists, else OpenBLAS alone; None if
    OpenBLAS is not installed or the fast path is disabled."""
    try:
        from . import fastpath
    except ImportError:
        fastpath = None
    if fastpath is not None:
        try:
            if not fastpath.supported():
                return None
            value = fastpath.preload_env().get("LD_PRELOAD")
            if value:
                return value
        except Exception:  # noqa: BLE001 - fall back to plain OpenBLAS
            pass
    lib = openblas_path()
    if lib is None:
        return None
    current = os.environ.get("LD_PRELOAD", "")
    return f"{lib}:{current}" if current else lib


def maybe_reexec(argv: list[str]) -> None:
    """On Linux, re-execute once with OpenBLAS in LD_PRELOAD (see --help)."""
    if not sys.platform.startswith("linux") or os.environ.get(REEXEC_GUARD) \
            or os.environ.get("_MLX_STEER_REEXEC") \
            or os.environ.get(NO_PRELOAD, "") not in ("", "0"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or openblas_path() is None:
        return
    value = preload_value()
    if not value:
        return
    env = dict(os.environ)
    env[REEXEC_GUARD] = "1"
    env["_MLX_STEER_REEXEC"] = "1"  # mlx_steer.fastpath.reexec's guard, too
    env["LD_PRELOAD"] = value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "mlx_steer.cli", *argv], env)
    except OSError:
        return  # carry on without it


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status. `argv=None` reads sys.argv (and may
    re-execute the process with OpenBLAS preloaded)."""
    from .errors import MlxSteerError

    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except UsageError as e:
        _say(f"{PROG}: error: {e}")
        return 2
    except SystemExit as e:  # --help / --version
        return int(e.code or 0)
    if argv is None:
        maybe_reexec(args_list)
    try:
        from . import distributed

        args.group = distributed.world()  # several ranks when started by mlx.launch
        if not distributed.is_lead(args.group):
            sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
            args.quiet = True
        return int(args.func(args) or 0)
    except UsageError as e:
        _say(f"{PROG}: error: {e}")
        return 2
    except MlxSteerError as e:
        _say(f"{PROG}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - never a traceback unless asked
        if os.environ.get("MLX_STEER_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        _say(f"{PROG}: internal error: {type(e).__name__}: {msg} "
             "(set MLX_STEER_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
