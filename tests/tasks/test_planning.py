"""The job's plan and the conditioning of each generation (tasks.planning)."""

import numpy as np
import pytest

from stems.plan import MusicalPlan
from tasks.planning import (
    SongConditioning,
    conditioning_for,
    make_job_plan,
    plan_from_record,
    plan_known_at_submission,
)


def request(**parameters):
    return {"generation_request_id": "gen-1", "audio_file_id": "song-1",
            "target_stems": ["guitar", "bass", "drums"],
            "parameters": {"duration_seconds": 8.0, **parameters}}


def song(bpm=97.0, key="D minor", chords=("Dm", "A#", "F", "C", "Dm", "A#", "F", "C"),
         grid="song-beats"):
    """A job's source record (tasks.song_source.analyse), as stored with the job."""
    bars = len(chords) or 4
    bar = 4 * 60.0 / bpm
    return {"report": {"origin": "blob:audio-files/song-1", "bpm": bpm,
                       "key": {"key": key, "confidence": 0.8}, "first_downbeat_seconds": 0.4},
            "region": {"start_bar": 3, "bars": bars, "start_seconds": 0.4 + 2 * bar,
                       "end_seconds": 0.4 + (2 + bars) * bar, "first_downbeat_seconds": 0.4,
                       "bpm": bpm, "beats": [], "chords": list(chords)},
            "grid": grid}


def test_plan_known_at_submission():
    assert plan_known_at_submission({"target_bpm": 120})
    assert not plan_known_at_submission({"condition_on_audio": True, "target_bpm": 120})
    assert not plan_known_at_submission({"condition_on_audio": True, "key": "A minor"})
    # the chords come from the song's region unless the request gives them
    assert not plan_known_at_submission({"condition_on_audio": True, "target_bpm": 120,
                                         "key": "A minor"})
    assert plan_known_at_submission({"condition_on_audio": True, "target_bpm": 120,
                                     "chords": ["Am", "G"]})


def test_plan_from_the_request():
    record = make_job_plan(request(target_bpm=120, key="A minor", chords=["Am", "F", "C", "G"]), 4)
    assert record["key"] == "A minor" and record["bpm"] == 120 and record["bars"] == 4
    assert record["chords"] == ["Am", "F", "C", "G"]
    assert "source_audio" not in record
    assert isinstance(plan_from_record(record), MusicalPlan)


def test_region_bars_set_the_length_at_submission():
    record = make_job_plan(request(condition_on_audio=True, target_bpm=120, chords=["Am", "G"],
                                   duration_seconds=None, source_region={"start_bar": 5, "bars": 3}), 4)
    assert record["bars"] == 3 and record["chords"] == ["Am", "G", "Am"]


def test_plan_is_the_same_in_every_process_for_the_same_request():
    assert make_job_plan(request(target_bpm=100, style="funk"), 4) == \
        make_job_plan(request(target_bpm=100, style="funk"), 4)


def test_the_plan_is_the_songs_tempo_key_and_region_chords():
    record = make_job_plan(request(condition_on_audio=True), 4, song())
    assert record["bpm"] == 97.0 and record["key"] == "D minor"
    assert record["bars"] == 8
    assert record["chords"] == ["Dm", "A#", "F", "C", "Dm", "A#", "F", "C"]
    assert record["progression"] == ["Dm", "A#", "F", "C"]  # the cycle the region repeats
    assert record["source"] == "source-audio"
    assert record["source_audio"]["key"]["key"] == "D minor"
    assert record["overrides"] == {}
    assert plan_from_record(record).chords == tuple(record["chords"])


def test_request_overrides_are_reported():
    given = make_job_plan(request(condition_on_audio=True, target_bpm=120, key="E major"), 4,
                          song(grid="constant-bpm"))
    assert given["bpm"] == 120 and given["key"] == "E major"
    assert given["chords"] == ["Dm", "A#", "F", "C", "Dm", "A#", "F", "C"]  # still the song's
    assert given["overrides"]["key"] == {"requested": "E major", "song": "D minor"}
    assert given["overrides"]["target_bpm"] == {"requested": 120, "song": 97.0,
                                                "grid": "constant-bpm"}
    chords = make_job_plan(request(condition_on_audio=True, chords=["G", "C"]), 4, song())
    assert chords["key"] == "G major" and chords["chords"][:2] == ["G", "C"]
    assert chords["source"] != "source-audio"
    assert chords["overrides"]["chords"]["song"][0] == "Dm"


def test_a_region_without_chords_keeps_the_songs_key():
    record = make_job_plan(request(condition_on_audio=True, style="rock"), 4, song(chords=()))
    assert record["key"] == "D minor" and record["source"] == "source-audio"


def test_no_tempo_at_all_is_an_error():
    with pytest.raises(ValueError):
        make_job_plan(request(), 4)


def plan():
    return plan_from_record(make_job_plan(request(target_bpm=120, key="A minor"), 4))


def excerpt(kind="region", grid="song-beats"):
    audio = np.random.default_rng(1).standard_normal((2, 16000)).astype(np.float32)
    return SongConditioning(kind, audio, 16000, grid, "abc")


def test_conditioning_table():
    p = plan()
    # text model, no song: none
    assert conditioning_for("bass", p, melody_model=False) is None
    # melody model, no song: the plan's chords for harmonic stems, nothing for drums
    chroma = conditioning_for("bass", p, melody_model=True)
    assert chroma.kind == "chroma" and chroma.audio.shape[0] == 1
    assert conditioning_for("guitar", p, melody_model=True).fingerprint == chroma.fingerprint
    assert conditioning_for(None, p, melody_model=True).kind == "chroma"
    assert conditioning_for("drums", p, melody_model=True) is None
    # melody model, accompany on the song's beats: the region's own samples, time-aligned
    region = excerpt()
    src = conditioning_for("guitar", p, melody_model=True, song=region)
    assert src.kind == "chroma" and src.audio is region.audio
    assert src.fingerprint.startswith("song-region:")
    assert conditioning_for("drums", p, melody_model=True, song=region) is None
    # ... on a constant grid at another tempo: the region's chords rendered at that tempo
    constant = conditioning_for("bass", p, melody_model=True, song=excerpt(grid="constant-bpm"))
    assert constant.kind == "chroma" and constant.fingerprint == chroma.fingerprint
    # text model, accompany: the prompt carries key and chords; no audio
    assert conditioning_for("bass", p, melody_model=False, song=region) is None
    # continue: every stem, any model, continues the bars before the region
    before = excerpt("continuation")
    for model in (False, True):
        tail = conditioning_for("drums", p, melody_model=model, song=before)
        assert tail.kind == "continuation" and tail.audio is before.audio
