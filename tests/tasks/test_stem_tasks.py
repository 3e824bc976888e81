"""The task layer: final state, callback body, sampling overrides (pure); a stem sent on to its
model's queue and an ensemble's kept renders (real Redis, Azurite)."""

import pytest

from stemgen_settings import load_settings
from tasks.stem_tasks import callback_payload, flat_results, job_coherence, job_state, sampling_params


def test_job_state():
    ok, bad = {"status": "completed"}, {"status": "failed"}
    assert job_state([ok, ok]) == "completed"
    assert job_state([ok, bad]) == "partial"
    assert job_state([bad, bad]) == "failed"


def test_callback_payload_summarises_errors():
    job = {"job_id": "j", "generation_request_id": "g", "audio_file_id": "a"}
    results = [{"stem": "bass", "status": "completed", "url": "u"},
               {"stem": "drums", "status": "failed", "error": "boom"}]
    body = callback_payload(job, results, "partial")
    assert body == {"event": "generation.finished", "job_id": "j", "generation_request_id": "g",
                    "audio_file_id": "a", "status": "partial", "stems": results,
                    "error": "drums: boom", "plan": None, "coherence": None}
    assert callback_payload(job, results[:1], "completed")["error"] is None


def test_sampling_overrides_fall_back_to_settings():
    settings = load_settings(default_top_k=250, default_cfg_coef=3.0)
    params = sampling_params({"temperature": 0.7, "top_k": None}, settings)
    assert params.temperature == 0.7 and params.top_k == 250 and params.cfg_coef == 3.0


def test_ensemble_results_are_flattened_in_stem_order():
    a, b, c = ({"stem": s, "status": "completed"} for s in ("guitar", "bass", "drums"))
    assert flat_results([[a, b, c]]) == [a, b, c]
    assert flat_results([a, b]) == [a, b]


def test_coherence_of_a_finished_job():
    from stems.analysis import stem_analysis
    from stems.plan import render_chords
    from tasks.planning import make_job_plan, plan_from_record

    request = {"generation_request_id": "g", "parameters": {
        "target_bpm": 120, "duration_seconds": 8, "key": "G major", "chords": ["G", "C", "D", "G"]}}
    record = make_job_plan(request, 4)
    plan = plan_from_record(record)
    audio = render_chords(plan, 32000)
    results = [{"stem": "guitar", "status": "completed",
                "analysis": stem_analysis(audio, 32000, plan, harmonic=True)},
               {"stem": "drums", "status": "completed",
                "analysis": stem_analysis(audio, 32000, plan, harmonic=False)},
               {"stem": "bass", "status": "failed", "error": "boom"}]
    report = job_coherence({"plan": record}, results)
    assert report["plan_key"] == "G major"
    assert report["stems"]["guitar"]["agreement"] == "same"
    assert "bass" not in report["stems"]
    assert job_coherence({"plan": None}, results) is None
    body = callback_payload({"job_id": "j", "generation_request_id": "g", "audio_file_id": "a",
                             "plan": record}, results, "partial", report)
    assert body["plan"] == record and body["coherence"] == report


def test_a_stem_on_a_worker_of_another_model_goes_to_its_models_queue(monkeypatch):
    from celery.exceptions import Retry

    from stemgen_settings import load_settings
    from tasks import stem_tasks
    from tasks.jobstore import JobStore
    from tests.harness import REDIS

    store = JobStore(f"{REDIS}/12", ttl_seconds=60)
    store._redis.flushdb()
    settings = load_settings(result_backend=f"{REDIS}/12", musicgen_model="tiny",
                             musicgen_models="tiny,tiny-melody")
    monkeypatch.setattr(stem_tasks.app, "stemgen_settings", settings, raising=False)
    monkeypatch.setattr(stem_tasks.app, "_stemgen_jobstore", store, raising=False)
    request = {"generation_request_id": "gen-1", "audio_file_id": "a", "target_stems": ["bass"],
               "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0, "model": "tiny-melody"}}
    job_id = store.create(request, ["bass"], None).job_id
    sent = []

    def retry(queue=None, countdown=None, max_retries=None, **_):
        sent.append((queue, max_retries))
        return Retry("sent on")

    monkeypatch.setattr(stem_tasks.generate_stem, "retry", retry)
    with pytest.raises(Retry):
        stem_tasks.generate_stem.run(job_id, "bass", request)
    assert sent == [("stems.tiny-melody", 1)]
    assert store.get(job_id)["stems"][0]["status"] == "queued"  # not failed, not counted as a run
    # after MODEL_REQUEUES hops (a queue consumed by the wrong workers) the stem fails, clearly
    stem_tasks.generate_stem.push_request(retries=stem_tasks.MODEL_REQUEUES)
    try:
        result = stem_tasks.generate_stem.run(job_id, "bass", request)
    finally:
        stem_tasks.generate_stem.pop_request()
    assert result["status"] == "failed" and "ModelNotHeld" in result["error"]
    store._redis.flushdb()


def test_an_ensemble_whose_unstored_stems_are_kept_uploads_them_without_generating(monkeypatch):
    """Real Redis and Azurite: one stem stored, the other kept after a failed upload; the retry's
    results come from the record and the kept render, and no generation is asked for."""
    import uuid

    import requests

    from tasks import stem_tasks
    from tasks.jobstore import JobStore
    from tests.harness import REDIS

    store = JobStore(f"{REDIS}/12", ttl_seconds=60)
    store._redis.flushdb()
    settings = load_settings(result_backend=f"{REDIS}/12",
                             azure_storage_container=f"test-{uuid.uuid4().hex[:12]}")
    monkeypatch.setattr(stem_tasks, "_generate", lambda *a, **k: pytest.fail("generated again"))
    request = {"generation_request_id": "gen-1", "audio_file_id": "a",
               "target_stems": ["guitar", "drums"],
               "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0, "arrangement": "ensemble"}}
    job_id = store.create(request, ["guitar", "drums"], None).job_id
    assert stem_tasks._ensemble_done_or_kept(settings, store, job_id, ["guitar", "drums"]) is None
    store.update_stem(job_id, "guitar", "completed", 1.0, blob_name=f"{job_id}/guitar.wav",
                      url="http://stored/guitar.wav", arrangement="ensemble")
    assert stem_tasks._ensemble_done_or_kept(settings, store, job_id, ["guitar", "drums"]) is None
    upload = {"blob_name": f"{job_id}/drums.wav", "content_type": "audio/wav",
              "duration_seconds": 4.0, "metadata": {"stem": "drums"}}
    assert store.stage_rendered(job_id, "drums", b"RIFF-kept", {
        "upload": upload, "result": {"stem": "drums", "status": "completed", "bpm": 120.0,
                                     "arrangement": "ensemble"}}, max_bytes=1024, ttl_seconds=60)
    results = stem_tasks._ensemble_done_or_kept(settings, store, job_id, ["guitar", "drums"])
    assert [r["stem"] for r in results] == ["guitar", "drums"]
    assert all(r["status"] == "completed" for r in results)
    assert results[0]["url"] == "http://stored/guitar.wav"
    assert results[1]["blob_name"] == f"{job_id}/drums.wav"
    assert requests.get(results[1]["url"], timeout=10).content == b"RIFF-kept"
    assert store.staged_rendered(job_id, "drums") is None
    assert store.get(job_id)["stems"][1]["status"] == "completed"
    store._redis.flushdb()


def test_harmonic_stems_are_measured_against_the_songs_chords_and_key():
    """A request that overrides the song's chords: a stem that plays the plan fits the plan's
    chords, and its fit against the song's own chords (another progression) is reported apart."""
    from types import SimpleNamespace

    from stems.analysis import stem_analysis
    from stems.plan import render_chords
    from tasks.planning import make_job_plan, plan_from_record
    from tasks.stem_tasks import _vs_song

    song = {"report": {"key": {"key": "E minor", "confidence": 0.9}, "bpm": 120.0},
            "region": {"bars": 4, "bpm": 120.0, "chords": ["Em", "Em", "B", "B"]},
            "grid": "song-beats"}
    request = {"generation_request_id": "g", "parameters": {
        "condition_on_audio": True, "chords": ["G", "C", "D", "G"], "duration_seconds": 8}}
    record = make_job_plan(request, 4, song)
    assert record["chords"] == ["G", "C", "D", "G"] and record["overrides"]["chords"]["song"][0] == "Em"
    plan = plan_from_record(record)
    audio = render_chords(plan, 32000)
    analysis = stem_analysis(audio, 32000, plan, harmonic=True)
    analysis["vs_song"] = _vs_song(SimpleNamespace(audio=audio, sample_rate=32000), plan, song, analysis)
    vs_song = analysis["vs_song"]
    assert vs_song["song_key"] == "E minor" and vs_song["song_chords"] == ["Em", "Em", "B", "B"]
    assert vs_song["key_vs_song"] == "relative"  # the stem is in G major
    assert vs_song["chord_fit"]["mean"] < analysis["chord_fit"]["mean"] - 0.2
    report = job_coherence({"plan": record}, [{"stem": "guitar", "status": "completed",
                                               "analysis": analysis}])
    assert report["song_chords"] == ["Em", "Em", "B", "B"]
    assert report["stems"]["guitar"]["chord_fit_vs_song"] == vs_song["chord_fit"]["mean"]
    assert report["mean_chord_fit_vs_song"] == round(vs_song["chord_fit"]["mean"], 3)
