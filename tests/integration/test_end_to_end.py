"""The whole path on real parts: HTTP → gateway → broker → Celery worker (tiny MusicGen) →
tempo conform → Azurite → signed callback to a receiver on loopback."""

import io
import json
import uuid

import pytest
import requests
import soundfile as sf

from tasks.callbacks import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.harness import RABBITMQ, CallbackReceiver, service_env, start_gateway, start_worker, wait_job

SAMPLE_RATE = 48000  # the delivered rate: parameters.output defaults to 24-bit WAV at 48 kHz


def request_body(stems, bpm=120.0, duration=8.0, **extra):
    return {
        "generation_request_id": f"gen-{uuid.uuid4().hex[:10]}",
        "audio_file_id": "audio-123",
        "target_stems": stems,
        "parameters": {"target_bpm": bpm, "duration_seconds": duration, "style": "rock",
                       "prompt": "energetic", "seed": 7},
        **extra,
    }


def whole_bar_samples(bars: int, bpm: float, beats_per_bar: int = 4) -> int:
    return round(bars * beats_per_bar * 60.0 / bpm * SAMPLE_RATE)


def check_stem_file(url: str, bpm: float, expected_bars: int) -> None:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/wav"
    assert sf.info(io.BytesIO(response.content)).subtype == "PCM_24"
    audio, rate = sf.read(io.BytesIO(response.content), always_2d=True)
    assert rate == SAMPLE_RATE
    assert audio.shape[0] == whole_bar_samples(expected_bars, bpm)
    assert abs(audio).max() <= 1.0


def test_three_stems_end_to_end(stack, receiver):
    body = request_body(["guitar", "bass", "drums"], bpm=120.0, duration=8.0)
    answer = requests.post(f"{stack['base']}/generate", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert accepted["status"] == "queued"
    assert accepted["status_url"].endswith(f"/jobs/{accepted['job_id']}")

    callback = receiver.wait(timeout=180)
    payload = callback["json"]
    assert payload["generation_request_id"] == body["generation_request_id"]
    assert payload["audio_file_id"] == "audio-123"
    assert payload["status"] == "completed", payload
    assert payload["error"] is None
    headers = callback["headers"]
    assert headers[EVENT_ID_HEADER] == accepted["job_id"]
    assert verify("test-secret", headers[TIMESTAMP_HEADER], callback["raw"], headers[SIGNATURE_HEADER])

    stems = {s["stem"]: s for s in payload["stems"]}
    assert set(stems) == {"guitar", "bass", "drums"}
    for name, stem in stems.items():
        assert stem["status"] == "completed"
        assert stem["blob_name"] == f"{accepted['job_id']}/{name}.wav"
        assert stem["sample_rate"] == SAMPLE_RATE and stem["format"] == "wav"
        assert stem["bit_depth"] == 24 and stem["content_type"] == "audio/wav"
        assert stem["bpm"] == 120.0
        assert stem["tempo"]["bars"] == 4  # 8 s at 120 BPM in 4/4
        assert stem["duration_seconds"] == pytest.approx(8.0, abs=1 / SAMPLE_RATE)
        assert stem["loudness"]["true_peak_dbtp"] <= -1.0 + 0.05
        check_stem_file(stem["url"], 120.0, expected_bars=4)

    status = wait_job(stack["base"], accepted["job_id"], timeout=30)
    assert status["status"] == "completed"
    assert status["progress"] == 1.0
    assert all(s["status"] == "completed" and s["url"] for s in status["stems"])
    # The delivery state is written after the receiver answered; give it a moment.
    for _ in range(50):
        status = requests.get(accepted["status_url"], timeout=5).json()
        if status["callback"]["state"] == "delivered":
            break
    assert status["callback"]["state"] == "delivered"


def test_odd_tempo_and_duration_give_whole_bars(stack, receiver):
    body = request_body(["bass"], bpm=97.0, duration=5.0)
    answer = requests.post(f"{stack['base']}/generate", json=body, timeout=10)
    assert answer.status_code == 202
    payload = receiver.wait(timeout=120)["json"]
    assert payload["generation_request_id"] == body["generation_request_id"]
    stem = payload["stems"][0]
    bars = round(5.0 / (4 * 60 / 97.0))  # 2 bars
    assert stem["tempo"]["bars"] == bars
    check_stem_file(stem["url"], 97.0, expected_bars=bars)


def test_health_reports_broker_storage_and_worker_device(stack):
    health = requests.get(f"{stack['base']}/health", timeout=10)
    assert health.status_code == 200
    body = health.json()
    assert body["broker"]["ok"] and body["storage"]["ok"]
    assert body["status"] == "ok"
    assert any(w["device"] == "cpu" and w["model"] == "tiny" for w in body["workers"])
    assert requests.get(f"{stack['base']}/health/ready", timeout=10).status_code == 200


def test_openapi_is_served(stack):
    doc = requests.get(f"{stack['base']}/openapi.json", timeout=5).json()
    assert doc["openapi"].startswith("3.")
    assert "/generate" in doc["paths"] and "/jobs/{job_id}" in doc["paths"]


def test_rabbitmq_broker(tmp_path):
    """The same path with RabbitMQ as the broker (Redis stays the result backend and job store)."""
    with CallbackReceiver() as receiver:
        env = service_env(tmp_path, BROKER_URL=RABBITMQ, DEFAULT_CALLBACK_URL=receiver.url)
        worker = start_worker(env, tmp_path, name="rabbit")
        try:
            gateway, base = start_gateway(env, tmp_path)
            try:
                body = request_body(["drums", "bass"], bpm=140.0, duration=4.0)
                answer = requests.post(f"{base}/generate", json=body, timeout=10)
                assert answer.status_code == 202, answer.text
                payload = receiver.wait(timeout=180)["json"]
                assert payload["status"] == "completed", json.dumps(payload)
                assert {s["stem"] for s in payload["stems"]} == {"drums", "bass"}
                for stem in payload["stems"]:
                    check_stem_file(stem["url"], 140.0, expected_bars=stem["tempo"]["bars"])
            finally:
                gateway.stop()
        finally:
            worker.stop()


@pytest.mark.parametrize("client", ["urllib", "requests"])
def test_oversized_body_gets_its_413_with_clients_that_send_it_all_first(stack, client):
    """urllib (and requests, for a bytes body) write the whole body before reading the answer;
    the gateway reads and discards it so the 413 arrives instead of a connection reset."""
    import urllib.error
    import urllib.request

    body = b'{"pad": "' + b"x" * (20 * 1024 * 1024) + b'"}'
    url = f"{stack['base']}/generate"
    if client == "urllib":
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=30)
        status, answer = caught.value.code, json.loads(caught.value.read())
    else:
        response = requests.post(url, data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
        status, answer = response.status_code, response.json()
    assert status == 413
    assert answer["error"]["code"] == "request_entity_too_large"
    assert answer["error"]["fields"][0]["field"] == "body"
    # the gateway still serves
    assert requests.get(f"{stack['base']}/health/live", timeout=5).status_code == 200
