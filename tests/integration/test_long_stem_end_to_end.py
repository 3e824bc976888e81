"""A long stem on real parts (issue #14, item 4): HTTP → gateway → Redis broker → Celery worker
(tiny MusicGen, whose shared checkpoint has a 30 s window) → MusicGen's windowed extension →
tempo conform → Azurite → signed callback. One 70 s stem: four windows (0-30 s, then 18 s
strides), 35 whole bars at 120 BPM.

Its own Redis DBs (4 and 5) so that it never meets another stack's jobs. On the 2-core box the
70 s tiny generation takes about 1.5-2 minutes.
"""

import io
import time
import uuid

import numpy as np
import pytest
import requests
import soundfile as sf

from tests.harness import REDIS, CallbackReceiver, running_stack, service_env

SAMPLE_RATE = 48000  # the delivered rate: parameters.output defaults to 24-bit WAV at 48 kHz
BPM = 120.0
SECONDS = 70.0
BARS = 35  # 70 s at 120 BPM in 4/4


@pytest.fixture(scope="module")
def long_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    with CallbackReceiver() as receiver:
        env = service_env(tmp, BROKER_URL=f"{REDIS}/4", RESULT_BACKEND=f"{REDIS}/5",
                          DEFAULT_CALLBACK_URL=receiver.url)
        with running_stack(env, tmp, name="long", worker_timeout=300) as (base, worker, _):
            yield {"base": base, "receiver": receiver, "worker": worker}


def test_a_70_second_stem_beyond_the_model_window(long_stack):
    base, receiver = long_stack["base"], long_stack["receiver"]
    body = {"generation_request_id": f"gen-long-{uuid.uuid4().hex[:10]}", "audio_file_id": "audio-long",
            "target_stems": ["drums"],
            "parameters": {"target_bpm": BPM, "duration_seconds": SECONDS, "style": "rock", "seed": 11}}
    answer = requests.post(f"{base}/generate", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["job_id"]

    # Poll the job while it runs: its progress (and the stem's) must never go back.
    job_progress, stem_progress, status = [], [], {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = requests.get(f"{base}/jobs/{job_id}", timeout=5).json()
        job_progress.append(status["progress"])
        stem_progress.append(status["stems"][0]["progress"])
        if status["status"] in ("completed", "failed", "partial"):
            break
        time.sleep(0.25)
    assert status.get("status") == "completed", (status, long_stack["worker"].log()[-3000:])
    for values in (job_progress, stem_progress):
        steps = np.diff(values)
        assert np.all(steps >= 0), [(values[i], values[i + 1]) for i in np.flatnonzero(steps < 0)]
        assert values[-1] == 1.0
    running = [p for p in stem_progress if 0.0 < p < 0.9]
    assert len(set(running)) >= 10, stem_progress  # reported while the windows were generated

    payload = receiver.wait(timeout=60)["json"]
    assert payload["generation_request_id"] == body["generation_request_id"]
    assert payload["status"] == "completed" and payload["error"] is None, payload
    (stem,) = payload["stems"]
    assert stem["status"] == "completed"
    assert stem["tempo"]["bars"] == BARS and stem["tempo"]["padded_seconds"] == 0.0
    assert stem["duration_seconds"] == pytest.approx(SECONDS, abs=1 / SAMPLE_RATE)

    blob = requests.get(stem["url"], timeout=30)
    assert blob.status_code == 200
    audio, rate = sf.read(io.BytesIO(blob.content), always_2d=True)
    assert rate == SAMPLE_RATE
    assert audio.shape[0] == round(BARS * 4 * 60.0 / BPM * SAMPLE_RATE)  # 3,360,000 samples
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
