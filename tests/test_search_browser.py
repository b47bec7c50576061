"""The search page in a real headless browser: Debian's chromium + chromedriver, via selenium.

It types a query in the box, submits, and checks that the result tiles appear in the order the
JSON API gives (rank 1 first, scores not increasing), that the frame strips really decode
(naturalWidth > 0), that a moment shows its time and a bar marking [start, end] within the
file, that a click plays the video in place (the browser reads its metadata through the
server's Range support), that a query with no good match says so, that the demo model's
notice shows, that paths with markup characters stay text, and that traversal URLs loaded by
the browser are refused.

Two sites: a fake index over real clips served from a thread (fast; it also has segments and a
file name with markup), and the real commands (slow): a tiny model saved as a training run,
`python -m ucofia_jax.search index` over a folder of clips, then `... serve --port N` as a
child process, stopped with Ctrl-C at the end (it must exit 0).

Skips (with the reason) where selenium, chromium or chromedriver is missing; CI installs them
(.ci/run: Debian's chromium and chromium-driver).
"""

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from _env import sigint_as_in_a_terminal
from test_search_web import FakeIndex, jpeg_bytes, row_key

from data_pipeline.synthetic import captions_for, render, sample_scene, write_clip
from ucofia_jax.search import web

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # an optional test dependency: the module skips without it
    webdriver = None

CHROMIUM = os.environ.get("UCOFIA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("UCOFIA_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
)
# Headless, and quiet on the network: this machine has none, and these keep chromium from
# retrying connections to Google services in the background.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
WAIT_S = 30


def _skip_reason(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> str | None:
    if webdriver is None:
        return "selenium is not installed (pip install selenium)"
    for what, path in (("chromium", chromium), ("chromedriver", chromedriver)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{what} not found at {path} (Debian: apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(prefix="ucofia-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        try:
            yield driver
        finally:
            driver.quit()


# -- the site: a fake index over real clips, served from a thread --------------------------

# A file name with markup and quotes: it must show as text, never become an element.
HOSTILE = 'clips/<i>odd "name" & co.mp4'
NOTICE = "this model was trained on <b>shapes</b> only"  # markup here must stay text too


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-site")
    (root / "clips").mkdir()
    rng = np.random.default_rng(7)
    entries, thumbs = [], {}
    names = ["clip0.mp4", "clips/clip1.mp4", HOSTILE, "clip3.mp4"]
    for i, name in enumerate(names):
        scene = sample_scene(rng)
        frames = render(scene, frame_size=32, num_frames=6, rng=np.random.default_rng(i))
        write_clip(str(root / name), frames, fps=3)
        # One file indexed as two moments, like a long video cut into windows.
        spans = [(0.5, 1.0), (1.0, 2.0)] if i == 2 else [(None, None)]
        for start, end in spans:
            thumbs[row_key(len(entries))] = jpeg_bytes(
                tuple(int(v) for v in frames[0, 0, 0]), size=(4 * 48, 32)
            )
            entries.append((name, captions_for(scene, 1)[0], start, end))
    index = FakeIndex(root, entries, thumbs, duration=2.0)  # 6 frames at 3 fps
    server = web.make_server(
        index,
        "127.0.0.1",
        0,
        no_good_match=lambda hits: not hits or hits[0].confidence == 0,  # no word in common
        notice=NOTICE,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        # The query: the caption of the segmented file, so the segments rank near the top.
        yield server.url, entries[2][1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# -- the site: the real commands, `index` then `serve`, on a tiny model --------------------

# Seconds for the real commands on a busy 2-core machine (each loads jax and the model).
COMMAND_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_search_cli(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "ucofia_jax.search", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"search {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


class ServeProcess:
    """`python -m ucofia_jax.search serve` as a child; its stdout lines go to a queue."""

    def __init__(self, index_dir: Path, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "ucofia_jax.search", "serve"]
            + ["--index", str(index_dir), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=sigint_as_in_a_terminal,
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if needle in line:
                return line
        raise AssertionError(f"serve never printed {needle!r}; its output:\n{''.join(self.seen)}")

    def stop(self) -> int:
        """Ctrl-C, as a user would; the exit status (killed after a timeout: not clean)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


@pytest.fixture(scope="module")
def real_site(browser, tmp_path_factory):
    """A tiny model's workdir, real clips (one with markup in its name), `index`, `serve`."""
    # The search tests' helpers: a seeded tiny model saved like a training run, and clips.
    import _search_fixtures as fixtures  # noqa: PLC0415 -- jax + training: the slow test only

    base = tmp_path_factory.mktemp("real-search")
    workdir = fixtures.save_workdir(base / "run", fixtures.search_config())
    captions = fixtures.make_clips(base / "clips", 5)
    first = sorted(captions)[0]
    (base / "clips" / "sub").mkdir()
    shutil.copyfile(base / "clips" / first, base / "clips" / "sub" / Path(HOSTILE).name)
    index_dir = base / "clips.ucofia"
    run_search_cli(
        "index",
        *("--videos", str(base / "clips"), "--index", str(index_dir)),
        *("--workdir", workdir, "--workers", "0", "--no_progress"),
    )
    server = ServeProcess(index_dir, free_port())
    try:
        url = server.wait_for_line("Serving on", COMMAND_TIMEOUT_S).split()[2]
        # The model loads in the background; the first search would wait for it anyway.
        server.wait_for_line("Model ready", COMMAND_TIMEOUT_S)
        yield url, captions[first], server
    finally:
        server.stop()


# -- what a user does, and what they must see ---------------------------------------------


def api_search(base: str, text: str, top: int) -> dict:
    with urllib.request.urlopen(f"{base}api/search?{urlencode({'q': text, 'top': top})}") as r:
        return json.load(r)


def wait_for(driver, what: str, predicate, timeout: float = WAIT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(predicate)
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from None


TILES_JS = """
return [...document.querySelectorAll('#results > li.tile')].map(li => ({
  rank: Number(li.dataset.rank), score: Number(li.dataset.score), path: li.dataset.path,
  shown_path: li.querySelector('.path').textContent,
  rank_text: li.querySelector('.rank').textContent}));
"""
THUMBS_JS = """
return [...document.querySelectorAll('#results img')].map(
  img => ({complete: img.complete, width: img.naturalWidth}));
"""
# Status and body of a fetch of `arguments[0]` from inside the page (same origin).
FETCH_JS = """
const done = arguments[arguments.length - 1];
fetch(arguments[0]).then(async r => done([r.status, await r.text()]),
                         e => done([-1, String(e)]));
"""


def search_in_page(
    driver, base: str, text: str, top: int, expect_state: str = "done"
) -> list[dict]:
    driver.get(base)
    wait_for(driver, "the index description", lambda d: d.find_element(By.ID, "model").text)
    box = driver.find_element(By.ID, "q")
    top_box = driver.find_element(By.ID, "top")
    top_box.clear()
    top_box.send_keys(str(top))
    box.clear()
    box.send_keys(text, Keys.ENTER)
    state = wait_for(
        driver,
        "the results",
        lambda d: (
            d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
            in ("done", "no-match", "error")
        ),
    )
    assert state
    status = driver.find_element(By.ID, "status").text
    got = driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")
    assert got == expect_state, status
    assert "ms" in status, status  # the latency is shown
    return driver.execute_script(TILES_JS)


def check_page(driver, base: str, text: str, top: int):
    api = api_search(base, text, top)
    assert api["count"] >= 2, api  # an order needs at least two results to mean anything
    tiles = search_in_page(driver, base, text, top)

    # Order: the tiles are the API's hits, rank 1 first, scores not increasing.
    assert [t["path"] for t in tiles] == [h["path"] for h in api["results"]]
    assert [t["rank"] for t in tiles] == list(range(1, len(tiles) + 1))
    assert [t["rank_text"] for t in tiles] == [f"#{r}" for r in range(1, len(tiles) + 1)]
    scores = [t["score"] for t in tiles]
    assert scores == pytest.approx([h["score"] for h in api["results"]], rel=0, abs=1e-9)
    assert all(a >= b for a, b in zip(scores, scores[1:])), scores
    assert [t["shown_path"] for t in tiles] == [t["path"] for t in tiles]

    # Thumbnails: every one decoded into a real image.
    thumbs = wait_for(
        driver,
        "the thumbnails",
        lambda d: (lambda ts: ts if all(t["complete"] for t in ts) else False)(
            d.execute_script(THUMBS_JS)
        ),
    )
    assert len(thumbs) == len(tiles) and all(t["width"] > 0 for t in thumbs), thumbs

    # A click plays the hit in place: the browser reads the video's metadata from /video/.
    first = api["results"][0]
    driver.find_element(By.CSS_SELECTOR, "#results > li.tile .media").click()
    ready = wait_for(
        driver,
        "the video's metadata",
        lambda d: d.execute_script(
            "const v = document.querySelector('#results > li.tile video');"
            "return v && v.readyState >= 1 ? [v.currentSrc, v.duration, !!v.error] : false;"
        ),
    )
    src, duration, error = ready
    assert src.endswith(first["video_url"]) and not error and duration > 0, ready
    if first["start"] is not None:
        # A segment plays only its span: the media fragment starts it at `start` and pauses it
        # at `end` (the whole 2 s clip would play to its end without the fragment).
        paused_at = wait_for(
            driver,
            "the segment to play and pause",
            lambda d: d.execute_script(
                "const v = document.querySelector('#results > li.tile video');"
                "return v.paused && v.currentTime > 0 ? v.currentTime : false;"
            ),
        )
        assert first["start"] <= paused_at <= first["end"] + 0.25, (paused_at, first)
    return api, tiles


def check_traversal_refused(driver, base: str):
    # As typed in the address bar: the browser itself normalises '..' and '%2e%2e' (the
    # request reaches /etc/passwd, a route that does not exist); encoded slashes reach us.
    for path in [
        "video/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "video/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "video/../../../../etc/passwd",
        "thumb/..%2f..%2fetc%2fpasswd",
        "video/%2Fetc%2Fpasswd",
    ]:
        driver.get(base + path)
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "root:" not in body and "error" in body, (path, body[:300])
        status, text = driver.execute_async_script(FETCH_JS, "/" + path)
        assert status in (403, 404) and "root:" not in text, (path, status, text[:300])


def test_page_with_fake_index(browser, fake_site):
    """Tiles in API order, thumbnails decode, a click plays, markup in a path stays text."""
    base, text = fake_site
    api, tiles = check_page(browser, base, text, top=5)
    # Rank 1 is the segment at 0.5 s (ties go to the first entry): check_page saw it start there.
    assert api["results"][0]["start"] == 0.5, api
    assert HOSTILE in [t["path"] for t in tiles]
    # Nothing from a file name became an element (the name holds an <i> tag).
    assert browser.execute_script("return document.querySelectorAll('#results i').length") == 0
    # The segmented file's tiles show their time span and link with a media fragment.
    seg = [h for h in api["results"] if h["start"] is not None]
    assert seg and all("#t=" in h["video_url"] for h in seg)
    segment_texts = browser.execute_script(
        "return [...document.querySelectorAll('#results .segment')].map(s => s.textContent)"
    )
    assert len(segment_texts) == len(seg) and all("\u2013" in s for s in segment_texts)
    # The search is in the address: a reload shows the same results.
    assert "q=" in browser.current_url
    browser.refresh()
    wait_for(
        browser,
        "the reloaded results",
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done",
    )
    assert [t["path"] for t in browser.execute_script(TILES_JS)] == [t["path"] for t in tiles]


def test_bad_query_shows_error_and_page_keeps_working(browser, fake_site):
    base, text = fake_site
    browser.get(base + "?" + urlencode({"q": "boom"}))  # the fake index fails on 'boom'
    wait_for(
        browser,
        "the error",
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error",
    )
    assert "failed on purpose" in browser.find_element(By.ID, "status").text
    assert search_in_page(browser, base, text, top=3)


# Per moment tile: the time bar's data and the marked span's share of the bar, as drawn.
BARS_JS = """
return [...document.querySelectorAll('#results > li.tile')].map(li => {
  const bar = li.querySelector('.timebar');
  if (!bar) return null;
  const span = bar.querySelector('.moment').getBoundingClientRect();
  const all = bar.getBoundingClientRect();
  return {from: Number(bar.dataset.from), to: Number(bar.dataset.to),
          left: (span.left - all.left) / all.width, width: span.width / all.width};
});
"""


def test_moments_show_time_and_a_bar_within_the_file(browser, fake_site):
    base, text = fake_site
    api = api_search(base, text, 5)
    browser.get(base + "?" + urlencode({"q": text, "top": 5}))
    wait_for(
        browser,
        "the results",
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done",
    )
    bars = browser.execute_script(BARS_JS)
    assert len(bars) == len(api["results"])
    for hit, bar in zip(api["results"], bars):
        if hit["start"] is None:  # a whole file: no bar
            assert bar is None, (hit, bar)
            continue
        start, end, duration = hit["start"], hit["end"], hit["duration"]
        assert (bar["from"], bar["to"]) == pytest.approx((start / duration, end / duration))
        assert bar["left"] == pytest.approx(start / duration, abs=0.02), bar
        assert bar["width"] == pytest.approx((end - start) / duration, abs=0.02), bar
    assert sum(b is not None for b in bars) == 2  # both moments of the long file
    # The notice of the model shows above the page, as text.
    notice = browser.find_element(By.ID, "notice")
    assert notice.is_displayed() and notice.text == NOTICE


def test_no_good_match_is_said_on_the_page(browser, fake_site):
    base, _ = fake_site
    assert api_search(base, "qwerty zxcv", 3)["no_good_match"] is True
    tiles = search_in_page(browser, base, "qwerty zxcv", 3, expect_state="no-match")
    assert tiles  # the hits still show, under the warning
    banner = browser.find_element(By.ID, "no-match")
    assert banner.is_displayed() and "No good match" in banner.text
    # A query with a good match hides it again.
    search_in_page(browser, base, fake_site[1], 3)
    assert not browser.find_element(By.ID, "no-match").is_displayed()


def test_traversal_refused_in_browser_fake(browser, fake_site):
    check_traversal_refused(browser, fake_site[0])


@pytest.mark.slow
def test_page_with_real_index_and_serve_command(browser, real_site):
    """The README's commands end to end: `index` a folder, `serve` it, search in the page."""
    base, caption, server = real_site
    api, tiles = check_page(browser, base, caption, top=10)
    assert len(tiles) == 6  # five clips and the copy under sub/ with markup in its name
    assert "sub/" + Path(HOSTILE).name in [t["path"] for t in tiles]
    assert browser.execute_script("return document.querySelectorAll('#results i').length") == 0
    # The footer describes the model the index was made with.
    assert "fingerprint" in browser.find_element(By.ID, "model").text
    check_traversal_refused(browser, base)
    assert server.stop() == 0, "".join(server.seen)
    server.wait_for_line("Stopped.", 10)  # Ctrl-C ends it cleanly, through serve()'s own exit


def test_skip_reason_names_what_is_missing():
    """The skip message says which program is missing and how to install it."""
    if webdriver is None:
        assert "selenium" in _skip_reason()
        return
    reason = _skip_reason(chromedriver="/nonexistent/chromedriver")
    assert reason and "/nonexistent/chromedriver" in reason and "chromium-driver" in reason
