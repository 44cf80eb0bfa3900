"""
The supernode's status page in a real headless Chromium, driven through
Selenium and the Debian C{chromedriver}, over a real swarm on loopback: a
supernode under C{twistd -n}, a source slowed to keep the task running, and
three C{dfget} peers on 127.0.0.2-4.

Chromium comes from the Debian packages C{chromium} and C{chromium-driver}
(C{scripts/install-system-deps}); no browser is ever downloaded.  A
screenshot of the page is left outside the checkout, under
C{$DRAGONFLY_ARTIFACTS} when set, else in the test's directory.
"""

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loopback import (
    MIB,
    Dfget,
    Processes,
    sha256_of,
    start_source,
    start_supernode,
)

pytestmark = pytest.mark.loopback

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PEER_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SIZE = 8 * MIB + 4321
RATE = MIB  # bytes per second from the source: about 8 s of fetching
PIECE = "256KiB"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


def _chromium_missing() -> str:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return (
                f"{path} is not installed: run scripts/install-system-deps as "
                "root (Debian packages chromium and chromium-driver)"
            )
    return ""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """
    A headless Chromium with a fresh profile, logging the browser console.
    """
    missing = _chromium_missing()
    if missing:
        # CI installs them (scripts/install-system-deps): there a missing
        # browser is a broken set-up, not a reason to test less.
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(
        executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        driver.quit()


def _artifact(tmp_path: Path, name: str) -> Path:
    directory = os.environ.get("DRAGONFLY_ARTIFACTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return Path(directory) / name
    return tmp_path / name


def _full_page_screenshot(browser: Any, path: Path) -> None:
    """
    Save the whole page, not only the window, as a PNG.
    """
    metrics = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics["cssContentSize"]
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": min(size["height"], 6000),
                "scale": 1,
            },
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))


# What the page shows, read in one script call so that a meta refresh
# cannot fall between two reads.
_READ_PAGE = """
const text = (q) => Array.from(document.querySelectorAll(q), e => e.textContent);
return {
  urls: text("tr.task .url"),
  peer_counts: text("tr.task td.peer-count"),
  statuses: text("tr.task .status"),
  peers: document.querySelectorAll("tr.peer").length,
  nodes: document.querySelectorAll("svg g.node").length,
  edges: document.querySelectorAll("svg path.edge").length,
  saved: text(".card.saved .v"),
  scripts: document.scripts.length,
  ready: document.readyState,
};
"""


def test_status_page_in_chromium(
    browser: Any,
    processes: Processes,
    work: Path,
    dfget: Dfget,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """
    While three peers download a file from a slow source, the status page
    shows the task by its URL, its peer count, its peers, and a picture of
    the swarm with edges once peers have sent each other pieces; Chromium's
    console stays free of errors, and the screenshot is saved.
    """
    source = start_source(processes, work, rate=RATE)
    data = source.add_file("slow.bin", SIZE)
    supernode = start_supernode(
        processes, work / "supernode", extra=["--piece-size", PIECE]
    )
    url = source.url("slow.bin")
    runs = [
        dfget.start(url, node=supernode.node, ip=ip, extra=["--keep-serving", "20s"])
        for ip in PEER_IPS
    ]

    # Wait (bounded) until the JSON twin has a transfer between two peers.
    deadline = time.monotonic() + 40
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = supernode.get_json("/api/v1/status")
        nodes = status["swarm"]["nodes"]
        if any(
            nodes[e["from"]]["kind"] != "supernode" for e in status["swarm"]["edges"]
        ) and any(t["peer_count"] == len(PEER_IPS) for t in status["tasks"]):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"no piece went from peer to peer: {status}")
    cached_then = status["tasks"][0]["pieces_cached"]

    browser.get(supernode.url("/"))
    page: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        page = browser.execute_script(_READ_PAGE)
        if page["ready"] == "complete" and page["edges"] and page["peers"]:
            break
        time.sleep(0.5)
        browser.refresh()
    assert page["urls"] == [url], page
    assert page["peer_counts"] == [str(len(PEER_IPS))], page
    assert page["peers"] == len(PEER_IPS), page
    assert page["nodes"] == 1 + len(PEER_IPS), page
    assert page["edges"] >= 2, page
    assert page["scripts"] == 0, page
    screenshot = _artifact(work, "status-page.screenshot.png")
    _full_page_screenshot(browser, screenshot)
    console = browser.get_log("browser")
    with capsys.disabled():
        print(f"\nstatus page screenshot: {screenshot}")
        print(
            f"status page: task {page['statuses']}, {cached_then} pieces cached "
            f"when first seen, {page['edges']} edges, bytes saved {page['saved']}"
        )
    errors = [entry for entry in console if entry["level"] == "SEVERE"]
    assert errors == [], console

    for run in runs:
        result = run.finish(timeout=90)
        assert result.code == 0, result.stderr
        assert sha256_of(result.output) == data.sha256
