"""Stems that belong together, on real parts: the musical plan in prompts, results and callback;
ensemble generation separated by a (tiny, random-weight) HTDemucs loaded through demucs's own
loading code; conditioning on the user's song fetched from Azurite; a melody-conditioned worker.
"""

import io
import json
import time
import uuid

import pytest
import requests
import soundfile as sf

from stems.checkpoint import write_tiny_demucs
from storage import store_from_settings
from stemgen_settings import load_settings
from tests.harness import (MAJOR_TRIAD, REDIS, CallbackReceiver, groove_wav, service_env,
                           start_gateway, start_worker)

SAMPLE_RATE = 48000  # the delivered rate: parameters.output defaults to 24-bit WAV at 48 kHz


@pytest.fixture(scope="module")
def receiver():
    with CallbackReceiver() as r:
        yield r


def stack_for(tmp, receiver, name, **env_overrides):
    torch_home = tmp / "torch"
    write_tiny_demucs(torch_home, "htdemucs_6s")
    env = service_env(tmp, DEFAULT_CALLBACK_URL=receiver.url, TORCH_HOME=str(torch_home),
                      SOURCE_AUDIO_CONTAINER=f"src-{uuid.uuid4().hex[:10]}", **env_overrides)
    worker = start_worker(env, tmp, name=name)
    try:
        gateway, base = start_gateway(env, tmp)
    except Exception:
        worker.stop()
        raise
    return {"base": base, "env": env, "worker": worker, "gateway": gateway}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    """Gateway + worker (tiny text MusicGen, tiny HTDemucs), Redis broker, Azurite."""
    s = stack_for(tmp_path_factory.mktemp("plan-stack"), receiver, "plan")
    yield s
    s["gateway"].stop()
    s["worker"].stop()


def submit(stack, receiver, stems, timeout=240, **parameters):
    body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "song-1",
            "target_stems": stems,
            "parameters": {"duration_seconds": 4.0, "style": "rock", "seed": 11, **parameters}}
    answer = requests.post(f"{stack['base']}/generate", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + timeout
    while True:  # callbacks of earlier tests may still arrive: match on the request id
        payload = receiver.wait(timeout=max(1.0, deadline - time.monotonic()))["json"]
        if payload["generation_request_id"] == body["generation_request_id"]:
            return body, answer.json(), payload


def download(url):
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    audio, rate = sf.read(io.BytesIO(response.content), always_2d=True)
    return audio.T, rate


def test_independent_stems_follow_one_plan(stack, receiver):
    body, accepted, payload = submit(stack, receiver, ["guitar", "bass", "drums"], target_bpm=120,
                                     key="E minor", chords=["Em", "C", "G", "D"])
    assert payload["status"] == "completed", json.dumps(payload)
    plan = payload["plan"]
    assert plan["key"] == "E minor" and plan["bpm"] == 120 and plan["bars"] == 2
    assert plan["chords"] == ["Em", "C"] and plan["progression"] == ["Em", "C", "G", "D"]
    stems = {s["stem"]: s for s in payload["stems"]}
    for name in ("guitar", "bass"):
        assert "in E minor" in stems[name]["prompt"] and "Em C G D" in stems[name]["prompt"]
        analysis = stems[name]["analysis"]
        assert 0.0 <= analysis["key"]["confidence"] <= 1.0
        assert analysis["key_vs_plan"] in ("same", "relative", "dominant", "subdominant",
                                           "parallel", "different")
        assert len(analysis["chord_fit"]["per_bar"]) == 2
    assert "E minor" not in stems["drums"]["prompt"]
    assert stems["guitar"]["conditioning"] is None  # a text model: the plan is in the prompt only
    coherence = payload["coherence"]
    assert coherence["plan_key"] == "E minor"
    assert set(coherence["stems"]) >= {"guitar", "bass"}
    status = requests.get(accepted["status_url"], timeout=5).json()
    assert status["plan"] == plan and status["coherence"] == coherence
    health = requests.get(f"{stack['base']}/health", timeout=10).json()
    assert any(w["model"] == "tiny" and w["melody"] is False
               and w["separation_model"] == "htdemucs_6s" for w in health["workers"])


def test_plan_is_recorded_at_submission(stack, receiver):
    body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "a",
            "target_stems": ["bass"], "parameters": {"target_bpm": 90, "duration_seconds": 4.0,
                                                     "style": "blues", "seed": 5}}
    accepted = requests.post(f"{stack['base']}/generate", json=body, timeout=10).json()
    plan = requests.get(accepted["status_url"], timeout=5).json()["plan"]
    assert plan["bpm"] == 90 and plan["bars"] == 2 and plan["source"] != "source-audio"
    assert len(plan["chords"]) == 2 and plan["mode"] in ("major", "minor")


def test_ensemble_is_one_performance_separated_into_stems(stack, receiver):
    body, accepted, payload = submit(stack, receiver, ["guitar", "bass", "drums"], target_bpm=100,
                                     key="A minor", arrangement="ensemble")
    assert payload["status"] == "completed", json.dumps(payload)
    stems = {s["stem"]: s for s in payload["stems"]}
    assert set(stems) == {"guitar", "bass", "drums"}
    lengths = set()
    for name, stem in stems.items():
        assert stem["arrangement"] == "ensemble"
        assert stem["separation"]["model"] == "htdemucs_6s"
        assert isinstance(stem["silent"], bool)
        assert stem["silent"] == (stem["separation"]["level_db"] < -35.0)
        assert bool(stem["warnings"]) == stem["silent"]
        assert "band playing" in stem["prompt"] and "A minor" in stem["prompt"]
        assert stem["tempo"]["bars"] == round(4.0 / (4 * 60 / 100))
        audio, rate = download(stem["url"])
        assert rate == SAMPLE_RATE
        lengths.add(audio.shape[1])
    assert len(lengths) == 1  # one conform for all: the stems stay sample-aligned
    # one generation for the job: every stem counts one run of it
    status = requests.get(accepted["status_url"], timeout=5).json()
    assert all(s["runs"] == 1 for s in status["stems"])


def upload_source(stack, name, data):
    settings = load_settings(source_audio_container=stack["env"]["SOURCE_AUDIO_CONTAINER"])
    store_from_settings(settings, container=settings.source_audio_container).upload(
        name, data, content_type="audio/wav")


def test_conditioned_on_the_users_song(stack, receiver):
    upload_source(stack, "song-1", groove_wav(110.0, root_hz=196.0, triad=MAJOR_TRIAD))
    body, accepted, payload = submit(stack, receiver, ["bass", "drums"], condition_on_audio=True)
    assert payload["status"] == "completed", json.dumps(payload)
    plan = payload["plan"]
    assert plan["bpm"] == pytest.approx(110.0, rel=0.03)
    assert plan["source"] == "source-audio"
    assert plan["source_audio"]["origin"].endswith("/song-1")
    assert plan["key"] == plan["source_audio"]["key"]["key"]
    assert plan["overrides"] == {}
    for stem in payload["stems"]:
        # accompany (the default): a text model has the song's key and chords in its prompt only
        assert stem["conditioning"] is None
        assert stem["bpm"] == plan["bpm"]
        assert stem["source_region"]["start_bar"] == 1 and stem["tempo"]["grid"] == "song-beats"
    bass = next(s for s in payload["stems"] if s["stem"] == "bass")
    assert plan["key"] in bass["prompt"]
    assert "source_key" in payload["coherence"]


def test_missing_source_fails_the_job_clearly(stack, receiver):
    body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": "no-such-song",
            "target_stems": ["guitar", "bass"],
            "parameters": {"duration_seconds": 4.0, "condition_on_audio": True}}
    accepted = requests.post(f"{stack['base']}/generate", json=body, timeout=10).json()
    deadline = time.monotonic() + 120
    while True:
        payload = receiver.wait(timeout=max(1.0, deadline - time.monotonic()))["json"]
        if payload["generation_request_id"] == body["generation_request_id"]:
            break
    assert payload["status"] == "failed"
    assert "no source audio 'no-such-song'" in payload["error"]
    status = requests.get(accepted["status_url"], timeout=5).json()
    assert status["status"] == "failed" and "no-such-song" in status["error"]
    assert all(s["runs"] == 1 for s in status["stems"])  # not retried


def test_melody_worker_follows_the_plans_chords(tmp_path, receiver):
    # Own Redis DBs: the outbox lives in the job store's DB, and the dispatcher of the module's
    # text-model worker would otherwise send this stack's jobs to its own queue.
    s = stack_for(tmp_path, receiver, "melody", MUSICGEN_MODEL="tiny-melody",
                  BROKER_URL=f"{REDIS}/8", RESULT_BACKEND=f"{REDIS}/9")
    try:
        body, accepted, payload = submit(s, receiver, ["guitar", "bass", "drums"], target_bpm=120,
                                         chords=["C", "Am", "F", "G"])
        assert payload["status"] == "completed", json.dumps(payload)
        assert payload["plan"]["key"] == "C major"
        stems = {st["stem"]: st for st in payload["stems"]}
        assert stems["guitar"]["conditioning"] == "chroma"
        assert stems["bass"]["conditioning"] == "chroma"
        assert stems["drums"]["conditioning"] is None
        health = requests.get(f"{s['base']}/health", timeout=10).json()
        assert any(w["model"] == "tiny-melody" and w["melody"] for w in health["workers"])
    finally:
        s["gateway"].stop()
        s["worker"].stop()
