"""The studio's event-stream reader (api/static/studio/sse.js) under Node, against the gateway app
served over HTTP with the real Redis job store (DB 12): a connection cut after two events is
resumed with Last-Event-ID, and every stored event arrives once, in order. Also the parser's
line endings, comments, multi-line data and retry field."""

import json
import shutil
import subprocess
import threading

import pytest
from werkzeug.serving import make_server

from api import create_app
from api.auth import key_id_of
from stemgen_settings import load_settings
from tests.api.conftest import JOB_STORE_URL
from tests.harness import ROOT

NODE = shutil.which("node")
KEY = "sse-key-0123456789"
SSE_JS = ROOT / "api" / "static" / "studio" / "sse.js"

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

FOLLOW = """
import { followEvents, EventStreamParser } from %(module)s;
globalThis.sessionStorage = { getItem: () => %(key)s, setItem() {}, removeItem() {} };
const realFetch = globalThis.fetch;
const connections = [];
// The first connection is cut after the retry block and two events.
globalThis.fetch = async (url, options) => {
  connections.push(options.headers["Last-Event-ID"] || null);
  const response = await realFetch(url, options);
  if (connections.length > 1) return response;
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  while (text.split("\\n\\n").length < 4) {
    const { value, done } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
  }
  reader.cancel();
  const kept = text.split("\\n\\n").slice(0, 3).join("\\n\\n") + "\\n\\n";
  return new Response(kept, { status: 200, headers: response.headers });
};
const events = [];
const states = [];
await followEvents(%(url)s, {
  onEvent: (e) => events.push({ id: e.id, type: e.type, data: JSON.parse(e.data) }),
  isFinal: (e) => e.type === "job" && ["completed", "failed", "partial", "cancelled"].includes(JSON.parse(e.data).status),
  onState: (s) => states.push(s),
});
// the parser on its own: CRLF split between CR and LF, a comment, multi-line data, retry
const parsed = [];
let retry = null;
const parser = new EventStreamParser((e) => parsed.push(e), (ms) => { retry = ms; });
for (const chunk of ["id: 7\\r", "\\nevent: stem\\r\\ndata: a\\r\\nda", "ta: b\\r\\n\\r\\n: keep-alive\\n\\n",
                     "retry: 1500\\n", "data:c\\n\\n"]) parser.push(chunk);
console.log(JSON.stringify({ events, connections, states, parsed, retry }));
"""


@pytest.fixture
def gateway(real_service):
    app = create_app(load_settings(result_backend=JOB_STORE_URL, stemgen_api_keys=KEY),
                     service=real_service)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_cut_stream_resumes_after_the_last_event_without_repeats(gateway, real_service, tmp_path):
    job_id = real_service.submit({"generation_request_id": "gen-sse", "audio_file_id": "a",
                                  "target_stems": ["guitar"],
                                  "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0}},
                                 None, owner=key_id_of(KEY)).job_id
    jobs = real_service.jobs
    jobs.update_stem(job_id, "guitar", "running", 0.0)
    for progress in (0.25, 0.5, 0.75):
        jobs.update_stem(job_id, "guitar", "running", progress)
    jobs.update_stem(job_id, "guitar", "completed", 1.0, url="http://blob/x.wav")
    jobs.finish(job_id, "completed", {"status": "completed"})
    stored = [e.id for e in real_service.job_events(job_id)]
    assert len(stored) >= 7

    script = tmp_path / "follow.mjs"
    script.write_text(FOLLOW % {"module": json.dumps(SSE_JS.as_uri()), "key": json.dumps(KEY),
                                "url": json.dumps(f"{gateway}/jobs/{job_id}/events")})
    result = subprocess.run([NODE, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)

    assert [e["id"] for e in out["events"]] == stored  # each once, in order
    assert out["connections"] == [None, stored[1]]  # resumed after the second event
    assert out["states"] == ["open", "reconnecting", "open", "closed"]
    assert out["events"][-1]["data"]["status"] == "completed"

    assert out["parsed"] == [{"id": "7", "type": "stem", "data": "a\nb"},
                             {"id": "7", "type": "message", "data": "c"}]
    assert out["retry"] == 1500
