"""The lab in a real browser: `streamlit run app/Home.py` on a loopback port, driven by
Debian's chromium through Playwright. Screenshots of every page go to test-artifacts/.

Skipped (with the reason) when chromium or the playwright package is missing; `.ci/run`
installs chromium with apt, browsers cannot be downloaded here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import app_load  # noqa: E402 - the lab server and browser, shared with the load script

pytestmark = [pytest.mark.browser, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium")
PAGES = [("", "home"), ("learn", "learn"), ("concept_creator", "concept_creator"),
         ("playground", "playground"), ("visualizer", "visualizer"),
         ("experiments", "experiments"), ("introspection", "introspection"),
         ("library", "library")]
SLOW = 240_000  # ms: a built-in concept may be extracted on first use


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): "
                    "the browser test needs it, browsers cannot be downloaded here")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    # MLX_STEER_HOME (conftest) is inherited: the app shares the run's concept cache.
    with app_load.app_server(log_dir=tmp_path_factory.mktemp("streamlit"),
                             extra_args=("--client.toolbarMode", "viewer")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    # Playwright and chromium start without the preloaded OpenBLAS (see app_load.chromium).
    with app_load.chromium() as b:
        yield b


def new_page(browser, height: int = 1800):
    ctx = browser.new_context(viewport={"width": 1400, "height": height})
    page = ctx.new_page()
    page.set_default_timeout(SLOW)
    return ctx, page


def settle(page, timeout_ms: int = SLOW) -> None:
    """Wait until the script run is over (Streamlit's running indicator is gone)."""
    page.wait_for_selector('[data-testid="stApp"]')
    page.wait_for_timeout(600)
    page.wait_for_function(  # the run is over and lazily loaded widgets are drawn
        "() => document.querySelector('[data-testid=\"stApp\"]')"
        "?.getAttribute('data-test-script-state') === 'notRunning'"
        " && !document.querySelector('[data-testid=\"stSkeleton\"]')",
        timeout=timeout_ms)
    page.wait_for_timeout(400)


def open_page(page, url: str, path: str) -> None:
    page.goto(f"{url}/{path}")
    settle(page)
    assert page.get_by_test_id("stException").count() == 0


def set_slider(page, label: str, key: str = "Home") -> None:
    """Move a slider with one key press (Home = its minimum); the app then reruns."""
    thumb = page.get_by_test_id("stSlider").filter(has_text=label).get_by_role("slider")
    thumb.press(key)
    settle(page)


def outputs(page) -> list[str]:
    return [t.strip() for t in page.locator(".mlx-steer-text").all_inner_texts()]


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.mouse.move(0, 0)  # no tooltip over the picture
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def generate(page) -> list[str]:
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("Injection summary").wait_for()
    settle(page)
    return outputs(page)


def test_playground_demo_in_the_browser(server, browser):
    ctx, page = new_page(browser)
    try:
        open_page(page, server, "playground")
        page.get_by_role("button", name="Load demo").click()
        settle(page)
        assert page.get_by_label("Prompt").input_value() == "Tell me about artificial intelligence"
        page.get_by_text("Generation settings").click()
        set_slider(page, "Max new tokens")  # its minimum: 8 tokens
        base, steered = generate(page)
        assert base and steered and "press Generate" not in base + steered
        assert base != steered
        assert page.get_by_text("With “enthusiastic”").is_visible()
        shot(page, "playground-demo")
        # The operation control: ablate the direction instead of adding it.
        page.get_by_text("ablate its direction (remove the component)").click()
        settle(page)
        assert page.get_by_text("Ablate at every block and the embedding output").is_visible()
        again, ablated = generate(page)
        assert again == base and ablated and "press Generate" not in ablated
    finally:
        ctx.close()


def test_two_browser_sessions_get_their_own_steering(server, browser, smollm):
    """Two contexts (two sessions), opposite strengths, generating at the same time."""
    pages = []
    try:
        for minimum_alpha in (False, True):  # the recommended α vs the minimum, −1
            ctx, page = new_page(browser)
            pages.append((ctx, page))
            open_page(page, server, "playground")
            page.get_by_text("Generation settings").click()
            set_slider(page, "Max new tokens")  # 8 tokens
            if minimum_alpha:
                set_slider(page, "Strength α")
        for _, page in pages:  # both requests in flight together
            page.get_by_role("button", name="Generate").click()
        results = []
        for _, page in pages:
            page.get_by_text("Injection summary").wait_for()
            settle(page)
            results.append(outputs(page))
        (base_a, steer_a), (base_b, steer_b) = results
        assert base_a == base_b
        assert steer_a != steer_b
        happy = smollm.concept("happy")
        prompt = "Tell me about the weather today."
        alpha = round(happy.strength, 2)  # the slider shows the recommendation to 0.01
        assert steer_a == smollm.generate(prompt, happy.steer(happy.layer, alpha),
                                          max_tokens=8).strip()
        assert steer_b == smollm.generate(prompt, happy.steer(happy.layer, -1.0),
                                          max_tokens=8).strip()
        shot(pages[1][1], "playground-second-session")
    finally:
        for ctx, _ in pages:
            ctx.close()


def test_every_page_renders_and_is_captured(server, browser):
    ctx, page = new_page(browser)
    try:
        for path, name in PAGES:
            open_page(page, server, path)
            assert page.locator("h1").first.is_visible()
            if name == "home":
                page.get_by_role("button", name="Run the demo").click()
                page.get_by_text("added after block").wait_for()
                settle(page)
                base, steered = outputs(page)
                assert base and steered and base != steered
            if name == "visualizer":
                set_slider(page, "Tokens to generate")  # 4 tokens
                page.get_by_role("button", name="Visualize activations").click()
                page.get_by_text("Each cell is").wait_for()
                settle(page)
                assert page.get_by_test_id("stVegaLiteChart").count() >= 3
            shot(page, name)
        assert len(list(ARTIFACTS.glob("*.png"))) >= len(PAGES)
    finally:
        ctx.close()
