"""A bounded load test of the lab: several real browser sessions on the running app.

Each session (its own browser context, so its own Streamlit session) steers the
Playground differently and presses Generate again and again for a fixed time, all
of them in flight together. Checked: no error on any page, no cross-talk (every
session's baseline and steered texts equal the same request run alone in this
process), and a session closed mid-stream releases the model (another session's
next request completes without waiting for the abandoned one). Latencies from the
click to the finished page are reported.

    python scripts/app_load.py --sessions 4 --seconds 60 [--url http://127.0.0.1:8501]
                               [--json report.json]

Without --url the app is started on a free loopback port and stopped afterwards.
Needs Debian's chromium and the playwright package (as tests/test_browser.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about the weather today."  # the Playground's default prompt
TOKENS = 8  # the "Max new tokens" slider's minimum
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# (name, slider label, key): how each session changes the default steering
VARIANTS = [("recommended", None, None), ("alpha-min", "Strength α", "Home"),
            ("alpha-max", "Strength α", "End"), ("layer-0", "Layer (block)", "Home")]
SLOW_MS = 240_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def app_server(url: str | None = None, log_dir: Path | None = None,
               extra_args: tuple[str, ...] = ()):
    """The lab on a loopback port (started here unless `url` is given); its log goes
    to `log_dir` (default: a new temporary folder). The browser tests use it too."""
    if url:
        yield url
        return
    port = _free_port()
    log = Path(log_dir or tempfile.mkdtemp(prefix="mlx-steer-load-")) / "server.log"
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "Home.py"),
           "--server.headless", "true", "--server.port", str(port),
           "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           *extra_args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"streamlit did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    # Playwright's driver and chromium crash with MLX's preloaded OpenBLAS: start them
    # without it (the model work of this process keeps it).
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        with sync_playwright() as p:
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        headless=True, args=CHROMIUM_ARGS, env=env)
            if preload is not None:
                os.environ["LD_PRELOAD"] = preload
            yield browser
            browser.close()
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def _state(page) -> str | None:
    return page.evaluate("() => document.querySelector('[data-testid=\"stApp\"]')"
                         "?.getAttribute('data-test-script-state')")


def settle(page, timeout_ms: int = SLOW_MS) -> None:
    page.wait_for_selector('[data-testid="stApp"]')
    page.wait_for_timeout(500)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=\"stApp\"]')"
        "?.getAttribute('data-test-script-state') === 'notRunning'"
        " && !document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=timeout_ms)
    page.wait_for_timeout(300)


def errors_on(page) -> list[str]:
    """Exceptions and error boxes shown on the page."""
    out = page.get_by_test_id("stException").all_inner_texts()
    out += [t for t in page.get_by_test_id("stAlertContentError").all_inner_texts()]
    return out


def texts(page) -> list[str]:
    return [t.strip() for t in page.locator(".mlx-steer-text").all_inner_texts()]


class Session:
    def __init__(self, browser, url: str, variant: tuple):
        self.name, label, key = variant
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(SLOW_MS)
        self.page.goto(f"{url}/playground")
        settle(self.page)
        self.page.get_by_text("Generation settings").click()
        self.slider("Max new tokens", "Home")  # 8 tokens
        if label:
            self.slider(label, key)
        self.latencies: list[float] = []
        self.results: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.t0 = None
        self.seen_running = False

    def slider(self, label: str, key: str) -> None:
        thumb = self.page.get_by_test_id("stSlider").filter(has_text=label).get_by_role("slider")
        thumb.press(key)
        settle(self.page)

    def settings(self) -> tuple[int, float]:
        """The block and α the page shows (read back, not assumed)."""
        vals = []
        for label in ("Layer (block)", "Strength α"):
            slider = self.page.get_by_test_id("stSlider").filter(has_text=label)
            value = slider.get_by_role("slider").get_attribute("aria-valuenow")
            if value is None:  # older Streamlit: the value drawn above the thumb
                value = slider.get_by_test_id("stSliderThumbValue").inner_text()
            vals.append(value)
        return int(vals[0]), float(vals[1])

    def click(self) -> None:
        self.page.get_by_role("button", name="Generate").click()
        self.t0, self.seen_running = time.perf_counter(), False

    def poll(self) -> bool:
        """True once the run started by `click` is over (results recorded)."""
        state = _state(self.page)
        if state == "running":
            self.seen_running = True
            return False
        if not self.seen_running:
            return False  # the click's run has not started (or is queued) yet
        if self.page.get_by_text("Injection summary").count() == 0:
            return False
        self.latencies.append(time.perf_counter() - self.t0)
        self.page.wait_for_timeout(200)
        self.errors += errors_on(self.page)
        base, steered = texts(self.page)[:2]
        self.results.append((base, steered))
        self.t0 = None
        return True

    def close(self) -> None:
        self.ctx.close()


def _wait_all(sessions: list[Session], timeout_s: float = 600) -> None:
    deadline = time.perf_counter() + timeout_s
    pending = [s for s in sessions if s.t0 is not None]
    while pending:
        if time.perf_counter() > deadline:
            for s in pending:  # what the stuck pages show, for the report
                s.page.screenshot(path=str(Path(tempfile.gettempdir()) /
                                           f"mlx-steer-load-{s.name}.png"), full_page=True)
            raise TimeoutError(f"sessions {[s.name for s in pending]} did not finish: "
                               f"{[(s.name, _state(s.page), s.seen_running) for s in pending]}")
        pending = [s for s in pending if not s.poll()]
        time.sleep(0.1)


def expected_outputs(lab, settings: dict[str, tuple[int, float]]) -> dict:
    """What each session's request gives alone, in this process."""
    happy = lab.concept("happy")
    base = lab.generate(PROMPT, None, max_tokens=TOKENS).strip()
    return {name: (base, lab.generate(PROMPT, happy.steer(layer, alpha),
                                      max_tokens=TOKENS).strip())
            for name, (layer, alpha) in settings.items()}


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {"n": len(xs), "median_s": round(statistics.median(xs), 2),
            "p95_s": round(xs[min(len(xs) - 1, int(0.95 * len(xs)))], 2),
            "max_s": round(xs[-1], 2)}


def run_load(url: str, lab, sessions: int = 4, seconds: float = 60.0) -> dict:
    """Drive `sessions` browser sessions for `seconds` (at least one round), then close
    one mid-stream; returns the report (see the module docstring)."""
    with chromium() as browser:
        ss = [Session(browser, url, VARIANTS[i % len(VARIANTS)]) for i in range(sessions)]
        settings = {s.name: s.settings() for s in ss}
        expected = expected_outputs(lab, settings)
        t_end = time.perf_counter() + seconds
        rounds = 0
        while True:
            for s in ss:  # every session's request in flight together
                s.click()
            _wait_all(ss)
            rounds += 1
            print(f"round {rounds}: " + ", ".join(f"{s.name} {s.latencies[-1]:.1f}s"
                                                 for s in ss), file=sys.stderr, flush=True)
            if time.perf_counter() >= t_end:
                break
        crosstalk = [(s.name, i, r) for s in ss for i, r in enumerate(s.results)
                     if r != expected[s.name]]
        # A session closed mid-stream: the longest generation, closed once text flows.
        quitter = Session(browser, url, VARIANTS[0])
        quitter.slider("Max new tokens", "End")
        quitter.click()
        quitter.page.wait_for_function(
            "() => [...document.querySelectorAll('.mlx-steer-text')]"
            ".some(e => e.innerText.trim().length > 0)", timeout=SLOW_MS)
        quitter.close()
        t_closed = time.perf_counter()
        other = ss[0]
        other.click()
        _wait_all([other])
        after_close = time.perf_counter() - t_closed
        ok_after = other.results[-1] == expected[other.name]
        for s in ss:
            s.close()
    report = {
        "sessions": sessions, "seconds": seconds, "rounds": rounds,
        "requests": sum(len(s.results[:rounds]) for s in ss),
        "errors": [e for s in ss for e in s.errors],
        "crosstalk": crosstalk,
        "latency": _stats([x for s in ss for x in s.latencies[:rounds]]),
        "per_session": {s.name: _stats(s.latencies[:rounds]) for s in ss},
        "after_mid_stream_close": {"latency_s": round(after_close, 2),
                                   "output_correct": ok_after},
        "settings": {k: list(v) for k, v in settings.items()},
    }
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--url", help="a running lab (default: start one on a free port)")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()
    import mlx_steer

    lab = mlx_steer.load()
    with app_server(args.url) as url:
        report = run_load(url, lab, args.sessions, args.seconds)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    ok = not report["errors"] and not report["crosstalk"] and \
        report["after_mid_stream_close"]["output_correct"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
