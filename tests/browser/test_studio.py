"""/studio and /docs in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright) against a real stack (gunicorn gateway, Celery worker with the tiny model, Redis,
Azurite), with API keys on, so every call the page makes carries the key in a header.

One test walks through what a user does, in order:

1. an invalid field (an unknown key name) shows the API's own 422 message next to that field;
2. a 3-stem request shows progress events, then the three stems load into the player;
3. Play (a user gesture: Chromium's autoplay policy) leaves the AudioContext running, every
   stem's AudioBufferSourceNode was started with one and the same ``when``, and the playhead
   advances; a loop over bars 2-3 restarts them with loop points at the plan's bar times; Mute
   sets that stem's gain to 0;
4. axe-core (vendored from npm) finds no serious or critical violation; a screenshot is saved
   (var/screenshots/studio.png, the picture in the README);
5. a long job is cancelled from the page and ends ``cancelled``;
6. /docs renders the OpenAPI document with Swagger UI.

No page breaks its Content-Security-Policy (violations are recorded in the page) and no page logs
an error. It skips only when Chromium is absent.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from tests.harness import ROOT, running_stack, service_env

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium")
AXE = ROOT / "tests" / "browser" / "vendor" / "axe.min.js"
SCREENSHOT = ROOT / "var" / "screenshots" / "studio.png"
KEY = "studio-browser-test-key-0123456789"

if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; .ci/run does): "
                "the browser test needs it", allow_module_level=True)
from playwright import sync_api as playwright_api  # noqa: E402  (after the skip: a dev dependency)

# Before any page script: record every AudioBufferSourceNode.start (as the browser got it), and
# every CSP violation.
INIT_SCRIPT = """
window.__starts = [];
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
const start = AudioBufferSourceNode.prototype.start;
AudioBufferSourceNode.prototype.start = function (when, offset) {
  window.__starts.push({when, offset, loop: this.loop, loopStart: this.loopStart,
                        loopEnd: this.loopEnd, now: this.context.currentTime});
  return start.apply(this, arguments);
};
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    assert AXE.is_file(), f"make install copies axe-core (npm) to {AXE}"
    tmp = tmp_path_factory.mktemp("studio")
    env = service_env(tmp, STEMGEN_API_KEYS=KEY, CANCEL_POLL_SECONDS="0.2")
    with running_stack(env, tmp, name="studio") as (base, _, _):
        yield base


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def api_get(base: str, path: str) -> dict:
    answer = requests.get(f"{base}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    answer.raise_for_status()
    return answer.json()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.add_init_script(INIT_SCRIPT)
    errors: list[str] = []
    # Chromium logs every non-2xx answer as an error; the page expects two: 401 (asked before a key
    # was given) and 422 (the invalid field).
    expected = ("status of 401", "status of 422")
    page.on("console", lambda m: errors.append(m.text) if m.type == "error"
            and not (m.text.startswith("Failed to load resource") and m.text.endswith(
                tuple(f"{e} ({r})" for e, r in zip(expected, ("UNAUTHORIZED", "UNPROCESSABLE ENTITY")))))
            else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def wait_until(page, expression: str, timeout: float = 30.0):
    """Polls a JavaScript expression until it is truthy. (Playwright's wait_for_function evaluates
    its predicate with eval() in the page, which the page's CSP refuses, as it should.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout} s: {expression}")
        time.sleep(0.1)


def new_request(page, *, stems, bars=None, duration=None, key="", chords="", seed=None):
    for stem in ("guitar", "bass", "drums"):
        page.locator(f"input[name=stem][value={stem}]").set_checked(stem in stems)
    page.fill("#f-bpm", "120")
    page.fill("#f-bars", "")
    if bars is not None:
        page.fill("#f-bars", str(bars))  # sets the duration
    if duration is not None:
        page.fill("#f-duration", str(duration))
    page.fill("#f-key", key)
    page.fill("#f-chords", chords)
    page.fill("#f-seed", "" if seed is None else str(seed))
    page.click("#submit")


def test_studio_in_a_real_browser(stack, browser):
    base = stack
    started = time.monotonic()
    page, errors = open_page(browser, f"{base}/studio")
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-status:has-text('A key is set')")
    assert page.evaluate("sessionStorage.getItem('stemgen.apiKey')") == KEY

    # 1. an invalid field: the API's 422 message, next to that field
    new_request(page, stems=["guitar"], bars=2, key="H minor")
    page.wait_for_selector("#err-key:not(:empty)")
    refused = requests.post(f"{base}/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=10,
                            json={"generation_request_id": "probe-1", "audio_file_id": "studio",
                                  "target_stems": ["guitar"],
                                  "parameters": {"target_bpm": 120, "duration_seconds": 4, "key": "H minor"}})
    assert refused.status_code == 422
    [message] = [f["message"] for f in refused.json()["error"]["fields"] if f["field"] == "parameters.key"]
    assert page.text_content("#err-key") == message
    assert page.get_attribute("#f-key", "aria-invalid") == "true"
    assert page.text_content("#err-bpm") == ""

    # 2. three stems: progress events, then the stems in the player
    new_request(page, stems=["guitar", "bass", "drums"], bars=4, key="A minor", chords="Am,F,C,G", seed=7)
    page.wait_for_selector("#event-log li:has-text('progress')", state="attached", timeout=300_000)
    page.wait_for_selector("#player-section[data-loaded='3']", timeout=300_000)
    job_id = page.evaluate("window.stemgenStudio.job.job_id")
    job = api_get(base, f"/jobs/{job_id}")
    assert job["status"] == "completed"
    assert page.locator("#tracks .track").count() == 3
    for stem in ("guitar", "bass", "drums"):
        assert page.get_attribute(f"#download-{stem}", "download").endswith(f"-{stem}.wav")
        assert "LUFS" in page.text_content(f"#info-{stem}")
    assert "not harmonic" in page.text_content("#info-drums")
    guitar = page.text_content("#info-guitar")
    assert "vs plan A minor" in guitar or "no pitched content" in guitar, guitar

    # 3. play: one `when` for every source, the context running, the playhead moving
    page.click("#play")
    wait_until(page, "window.__starts.length >= 3")
    time.sleep(0.6)
    audio = page.evaluate("""() => {
        const p = window.stemgenStudio.player;
        return {state: p.context.state, now: p.context.currentTime, playhead: p.currentTime(),
                starts: window.__starts.slice()};
    }""")
    assert audio["state"] == "running"
    starts = audio["starts"]
    assert len(starts) == 3
    assert len({s["when"] for s in starts}) == 1 and starts[0]["when"] > starts[0]["now"]
    assert len({s["offset"] for s in starts}) == 1
    time.sleep(0.5)
    later = page.evaluate("window.stemgenStudio.player.currentTime()")
    assert later > audio["playhead"] + 0.2

    # loop over bars 2-3: the loop points are the plan's bar times
    bar_seconds = int(job["plan"]["time_signature"].split("/")[0]) * 60.0 / job["plan"]["bpm"]
    page.fill("#loop-from", "2")
    page.fill("#loop-to", "3")
    page.check("#loop")  # a change event: every source restarts with the loop
    wait_until(
        page, "window.__starts.length >= 6 && window.__starts.slice(-3).every(s => s.loop"
        f" && Math.abs(s.loopStart - {bar_seconds}) < 1e-9 && Math.abs(s.loopEnd - {3 * bar_seconds}) < 1e-9)")
    looped = page.evaluate("window.__starts.slice(-3)")
    assert len({s["when"] for s in looped}) == 1
    for s in looped:
        assert s["loop"] is True
        assert s["loopStart"] == pytest.approx(1 * bar_seconds, abs=1e-9)
        assert s["loopEnd"] == pytest.approx(3 * bar_seconds, abs=1e-9)
        assert 1 * bar_seconds <= s["offset"] < 3 * bar_seconds
    time.sleep(0.3)
    playhead = page.evaluate("window.stemgenStudio.player.currentTime()")
    assert 1 * bar_seconds <= playhead < 3 * bar_seconds

    # mute one stem: its gain is 0, the others' are not
    page.click("button[aria-label='Mute bass']")
    gains = page.evaluate("""() => Object.fromEntries(window.stemgenStudio.player.tracks
        .map(t => [t.stem, t.gainNode.gain.value]))""")
    assert gains == {"guitar": 1, "bass": 0, "drums": 1}
    assert page.get_attribute("button[aria-label='Mute bass']", "aria-pressed") == "true"

    # 4. accessibility (axe-core) and the screenshot
    page.evaluate(AXE.read_text())
    violations = page.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']}))
        .violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
        .map(v => `${v.id}: ${v.help} (${v.nodes.map(n => n.target.join(' ')).join(', ')})`)""")
    assert violations == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.locator("#player-section").scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.click("#stop")

    # 5. cancel a long job from the page
    new_request(page, stems=["guitar"], duration=120, seed=3)
    page.wait_for_selector("#job-status[data-status='running']", timeout=120_000)
    wait_until(page, "Number(document.getElementById('progress-guitar').value) > 0", timeout=120)
    page.click("#cancel")
    page.wait_for_selector("#job-status[data-status='cancelled']", timeout=60_000)
    cancelled_id = page.evaluate("window.stemgenStudio.job.job_id")
    assert cancelled_id != job_id
    assert api_get(base, f"/jobs/{cancelled_id}")["status"] == "cancelled"

    # the job list pages through GET /jobs (10 a page) and reopens a past job: 11 more jobs, each
    # cancelled at once (never generated), make at least two pages
    for i in range(11):
        answer = requests.post(f"{base}/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=10,
                               json={"generation_request_id": f"page-{i}-{time.time_ns()}",
                                     "audio_file_id": "studio", "target_stems": ["drums"],
                                     "parameters": {"target_bpm": 120, "duration_seconds": 2}})
        assert answer.status_code == 202, answer.text
        requests.delete(f"{base}/jobs/{answer.json()['job_id']}",
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=10).raise_for_status()
    listed, cursor = [], None
    while True:  # the API's own paging, for comparison
        page_of_jobs = api_get(base, "/jobs?limit=10" + (f"&cursor={cursor}" if cursor else ""))
        listed += [j["job_id"] for j in page_of_jobs["jobs"]]
        cursor = page_of_jobs["next_cursor"]
        if not cursor:
            break
    page.click("#refresh-jobs")
    wait_until(page, "document.querySelectorAll('#jobs-table tbody tr').length === 10")
    assert page.is_visible("#more-jobs")
    for _ in range(len(listed)):
        if not page.is_visible("#more-jobs"):
            break
        rows = page.locator("#jobs-table tbody tr").count()
        page.click("#more-jobs")
        wait_until(page, f"document.querySelectorAll('#jobs-table tbody tr').length > {rows}"
                         " || document.getElementById('more-jobs').hidden")
    shown = page.evaluate("[...document.querySelectorAll('#jobs-table tbody tr')].map(r => r.dataset.jobId)")
    assert shown == listed
    page.click(f"#jobs-table tr[data-job-id='{job_id}'] button")
    page.wait_for_selector("#player-section[data-loaded='3']", timeout=60_000)

    assert page.evaluate("window.__csp") == []
    assert errors == []
    page.close()

    # 6. /docs: Swagger UI renders the served OpenAPI document
    docs, docs_errors = open_page(browser, f"{base}/docs")
    docs.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
    paths = docs.locator(".swagger-ui .opblock-summary-path").all_text_contents()
    assert "/generate" in [p.strip().replace("\u200b", "") for p in paths]
    assert docs.evaluate("window.__csp") == []
    assert docs_errors == []
    docs.close()
    print(f"browser test: {time.monotonic() - started:.1f} s in the browser")


def test_pages_send_security_headers(stack):
    for path in ("/studio", "/studio/assets/studio.js", "/docs", "/docs/assets/init.js"):
        answer = requests.get(f"{stack}{path}", timeout=10)
        assert answer.status_code == 200, path
        csp = answer.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
    # the audio relay and the config need the key
    assert requests.get(f"{stack}/studio/config", timeout=10).status_code == 401
    assert requests.get(f"{stack}/studio/audio/abc/guitar", timeout=10).status_code == 401
