"""The job's plan and the conditioning of each generation (tasks.planning)."""

import numpy as np
import pytest

from stems.analysis import KeyEstimate
from stems.plan import MusicalPlan, parse_key
from tasks.planning import (
    conditioning_for,
    make_job_plan,
    plan_from_record,
    plan_known_at_submission,
)
from tasks.source_audio import SourceAudio
from stemgen_settings import load_settings


def request(**parameters):
    return {"generation_request_id": "gen-1", "audio_file_id": "song-1",
            "target_stems": ["guitar", "bass", "drums"],
            "parameters": {"duration_seconds": 8.0, **parameters}}


def source(bpm=97.0, key="D minor"):
    rate = 16000
    return SourceAudio(audio=np.zeros((2, rate * 10), np.float32), sample_rate=rate, bpm=bpm,
                       bpm_confidence=0.8, key=KeyEstimate(parse_key(key), 0.7, 0.9),
                       fingerprint="abc", origin="blob:audio-files/song-1")


def test_plan_known_at_submission():
    assert plan_known_at_submission({"target_bpm": 120})
    assert not plan_known_at_submission({"condition_on_audio": True, "target_bpm": 120})
    assert not plan_known_at_submission({"condition_on_audio": True, "key": "A minor"})
    assert plan_known_at_submission({"condition_on_audio": True, "target_bpm": 120, "key": "A minor"})


def test_plan_from_the_request():
    record = make_job_plan(request(target_bpm=120, key="A minor", chords=["Am", "F", "C", "G"]), 4)
    assert record["key"] == "A minor" and record["bpm"] == 120 and record["bars"] == 4
    assert record["chords"] == ["Am", "F", "C", "G"]
    assert "source_audio" not in record
    assert isinstance(plan_from_record(record), MusicalPlan)


def test_plan_is_the_same_in_every_process_for_the_same_request():
    assert make_job_plan(request(target_bpm=100, style="funk"), 4) == \
        make_job_plan(request(target_bpm=100, style="funk"), 4)


def test_tempo_and_key_come_from_the_source_when_not_given():
    record = make_job_plan(request(condition_on_audio=True), 4, source())
    assert record["bpm"] == 97.0 and record["key"] == "D minor"
    assert record["source"] == "source-audio"
    assert record["source_audio"]["key"]["key"] == "D minor"
    assert plan_from_record(record).bpm == 97.0
    # what the request says wins over the source
    given = make_job_plan(request(condition_on_audio=True, target_bpm=120, key="E major"), 4, source())
    assert given["bpm"] == 120 and given["key"] == "E major" and given["source"] != "source-audio"


def test_no_tempo_at_all_is_an_error():
    with pytest.raises(ValueError):
        make_job_plan(request(), 4)


def plan():
    return plan_from_record(make_job_plan(request(target_bpm=120, key="A minor"), 4))


def test_conditioning_table():
    settings = load_settings()
    p, s = plan(), source()
    # text model, no source: none
    assert conditioning_for("bass", p, melody_model=False) is None
    # melody model, no source: the plan's chords for harmonic stems, nothing for drums
    chroma = conditioning_for("bass", p, melody_model=True)
    assert chroma.kind == "chroma" and chroma.audio.shape[0] == 1
    assert conditioning_for("guitar", p, melody_model=True).fingerprint == chroma.fingerprint
    assert conditioning_for(None, p, melody_model=True).kind == "chroma"
    assert conditioning_for("drums", p, melody_model=True) is None
    # melody model, source: the source's chroma for harmonic stems
    src = conditioning_for("guitar", p, melody_model=True, source=s, settings=settings)
    assert src.kind == "chroma" and src.fingerprint != chroma.fingerprint
    assert conditioning_for("drums", p, melody_model=True, source=s, settings=settings) is None
    # text model, source: every stem continues the source's last seconds
    tail = conditioning_for("drums", p, melody_model=False, source=s, settings=settings)
    assert tail.kind == "continuation"
    assert tail.audio.shape[1] == int(settings.source_prompt_seconds * s.sample_rate)
    np.testing.assert_array_equal(tail.audio, s.audio[:, -tail.audio.shape[1]:])
