"""The lab under load, short version: three real browser sessions steering differently,
in flight together, then one closed mid-stream. The longer run is
`python scripts/app_load.py --sessions 4 --seconds 60`."""

import sys
from pathlib import Path

import pytest

from test_browser import browser, server  # noqa: F401 - fixtures: the app on loopback

pytestmark = [pytest.mark.browser, pytest.mark.model]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_sessions_under_load_keep_their_steering(server, smollm):  # noqa: F811
    import app_load

    r = app_load.run_load(server, smollm, sessions=3, seconds=0)
    print("\napp load:", r)
    assert r["rounds"] >= 1 and r["requests"] == 3 * r["rounds"]
    assert r["errors"] == []
    assert r["crosstalk"] == []  # every session got what its request gives alone
    assert len({tuple(v) for v in r["settings"].values()}) == 3  # three different steers
    close = r["after_mid_stream_close"]
    assert close["output_correct"]
    # The abandoned 200-token run does not hold the model: the next request takes about
    # as long as an ordinary one, not the abandoned generation's remaining time.
    assert close["latency_s"] < 3 * r["latency"]["max_s"] + 20
