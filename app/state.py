"""Process-wide state of the lab: the one loaded model, the model lock, the model picker.

The model is a `st.cache_resource` shared by every session and carries no steering
state (steering rides on each request's KV cache), so sessions cannot affect each
other. MLX work is serialised by one process-wide lock; generators take it inside
themselves and give it back when they finish or are closed (a user who navigates
away mid-stream closes the generator, which releases the lock).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import streamlit as st

import mlx_steer
from mlx_steer import config, loading
from mlx_steer.errors import MlxSteerError

EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded)"
MODELS: dict[str, str | None] = {
    EMBEDDED_LABEL: None,
    "Mistral-7B-Instruct v0.2 (4-bit)": "mistral-7b",
    "Phi-3-mini-4k-instruct (4-bit)": "phi-3-mini",
}
# mlx_lm.load's download patterns (mlx_lm/utils.py), to pre-fetch with a progress bar.
_PATTERNS = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken",
             "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]
MODEL_KEY = "model_choice"
LOCK_WAIT_NOTE = "The model is busy with another session: waiting for it to finish…"


# ---- process-wide resources --------------------------------------------------


@st.cache_resource(show_spinner=False)
def _lock() -> threading.Lock:
    """The one lock serialising MLX work in this process (a plain Lock: it may be
    released from the thread that garbage-collects an abandoned generator)."""
    return threading.Lock()


@st.cache_resource(show_spinner=False)
def _loaded() -> set:
    """Which model `_load` holds (so a page shows a status only while loading)."""
    return set()


@st.cache_resource(max_entries=1, show_spinner=False)
def _load(alias: str | None) -> mlx_steer.Lab:
    """One model per process: loading another evicts this one."""
    lab = mlx_steer.load(alias)
    _warm_up(lab)
    return lab


def _warm_up(lab: mlx_steer.Lab) -> None:
    """Extract the demo concept ("happy") in the background so that the first demo
    click streams at once. It holds the model lock like any other work."""

    def run():
        with contextlib.suppress(Exception), model_lock():
            lab.concept("happy")

    if config.flag("MLX_STEER_APP_WARMUP"):
        threading.Thread(target=run, name="mlx-steer-warmup", daemon=True).start()


@contextlib.contextmanager
def model_lock(timeout: float | None = None) -> Iterator[None]:
    """Hold the process-wide model lock (blocking until it is free). A page that has to
    wait says so with a toast."""
    lock = _lock()
    if not lock.acquire(blocking=False):
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        if get_script_run_ctx(suppress_warning=True) is not None:
            st.toast(LOCK_WAIT_NOTE, icon=":material/hourglass_top:")
        if not lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError("the model is busy with another session's work; try again")
    try:
        yield
    finally:
        lock.release()


def locked(gen_factory: Callable[[], Iterator[str]]) -> Iterator[str]:
    """A generator that takes the model lock when first advanced and releases it when
    exhausted or closed (e.g. the user navigated away and the script was stopped)."""
    with model_lock():
        gen = gen_factory()
        try:
            yield from gen
        finally:
            close = getattr(gen, "close", None)
            if close:
                close()


# ---- model availability and the picker -------------------------------------


@st.cache_data(ttl=600, show_spinner=False)
def availability(alias: str) -> dict:
    """Whether a named model can be used here: cached, downloadable, fits in memory."""
    repo = loading.ALIASES[alias]
    need = loading.NEEDS_GB.get(alias, 0.0)
    ram = loading.memory_gb()
    cached = loading.is_cached(repo)
    downloadable = False if cached else loading.is_downloadable(repo)
    fits = ram >= need
    if not fits:
        why = f"needs ~{need:g} GiB of memory, this machine has {ram:.1f}"
    elif cached:
        why = "in the Hugging Face cache"
    elif downloadable:
        why = "not cached: it will be downloaded (several GB)"
    else:
        why = ("neither cached nor downloadable (offline?). On a connected machine run "
               f"`huggingface-cli download {repo}`; the cache is shared with mlx-lm")
    return {"repo": repo, "cached": cached, "downloadable": downloadable, "fits": fits,
            "usable": fits and (cached or downloadable), "why": why}


def _download(repo: str) -> None:
    """Fetch a Hugging Face repo into the shared cache with a Streamlit progress bar."""
    from huggingface_hub import snapshot_download
    from streamlit.runtime.scriptrunner import add_script_run_ctx, get_script_run_ctx
    from tqdm.auto import tqdm

    ctx = get_script_run_ctx()
    bar = st.progress(0.0, text=f"Downloading {repo} …")

    class Bar(tqdm):
        def update(self, n=1):
            out = super().update(n)
            add_script_run_ctx(threading.current_thread(), ctx)
            if self.total:
                frac = min(float(self.n) / float(self.total), 1.0)
                size = (f"{self.n / 2**20:,.0f} / {self.total / 2**20:,.0f} MiB"
                        if self.unit == "B" else f"{self.n} / {self.total}")
                with contextlib.suppress(Exception):
                    bar.progress(frac, text=f"Downloading {repo}: {size}")
            return out

    snapshot_download(repo, allow_patterns=_PATTERNS, tqdm_class=Bar)
    bar.progress(1.0, text=f"Downloaded {repo}")


def model_picker() -> None:
    """Sidebar model choice (every page). Unusable models say why instead of loading."""
    labels = list(MODELS)
    st.session_state.setdefault(MODEL_KEY, EMBEDDED_LABEL)

    def fmt(label: str) -> str:
        alias = MODELS[label]
        if alias is None:
            return label
        a = availability(alias)
        return label + ("" if a["cached"] else " · download" if a["usable"] else " · unavailable")

    st.sidebar.selectbox("Model", labels, key=MODEL_KEY, format_func=fmt,
                         help="The embedded SmolLM2 runs offline in seconds. The larger models "
                              "load through mlx-lm from the Hugging Face cache.")


def lab() -> mlx_steer.Lab:
    """The loaded model for the current choice; loads (and downloads) with progress.

    Falls back to the embedded model with an explanation when the chosen model is
    unavailable.
    """
    label = st.session_state.get(MODEL_KEY, EMBEDDED_LABEL)
    alias = MODELS.get(label)
    if alias is not None:
        a = availability(alias)
        if not a["usable"]:
            st.sidebar.error(f"{label}: {a['why']}. Using the embedded model.")
            alias = None
    try:
        if alias is not None and not availability(alias)["cached"]:
            with st.status(f"Downloading {label} …", expanded=True) as s:
                _download(availability(alias)["repo"])
                s.update(label=f"Downloaded {label}", state="complete", expanded=False)
            availability.clear()
        loaded = _loaded()
        if alias in loaded:
            return _load(alias)
        t0 = time.time()
        with st.status(f"Loading {label} …", expanded=False) as s:
            lab_ = _load(alias)
            s.update(label=f"Loaded {lab_.name} in {time.time() - t0:.1f} s",
                     state="complete")
        loaded.clear()  # one model per process: only the latest stays cached
        loaded.add(alias)
        return lab_
    except MlxSteerError as e:
        if alias is None:
            raise
        st.sidebar.error(f"Could not load {label}: {e}. Using the embedded model.")
        return _load(None)


def sidebar_model_info(lab_: mlx_steer.Lab) -> None:
    st.sidebar.caption(
        f"**{lab_.name}** · {lab_.num_layers} blocks · hidden {lab_.hidden_size} · "
        f"context {lab_.context_length:,}" + (f"\n\n{lab_.note}" if lab_.note else ""))


# ---- deterministic analyses, in Streamlit's cache --------------------------------


@st.cache_data(show_spinner="Computing from the model…", max_entries=256)
def _analysis(fingerprint: str, key: tuple, _compute: Callable[[], object]) -> object:
    """Keyed by the model's fingerprint and `key` (`_compute` is not hashed)."""
    with model_lock():
        return _compute()


def memo(lab_: mlx_steer.Lab, key: tuple, fn: Callable[[], object]) -> object:
    """A deterministic, read-only result for this model, computed once per process."""
    return _analysis(lab_.fingerprint, key, fn)
