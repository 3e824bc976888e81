"""Pure parts of the task layer: final state, callback body, sampling overrides."""

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
