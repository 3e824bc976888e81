"""Stems that play along with the user's song, on real parts: songs with known chords, key, first
downbeat and tempo drift are uploaded to Azurite; a real gateway and a real Celery worker (tiny
random-weight melody MusicGen) analyse each once, plan from the region and warp the stems onto the
song's beat map. Checked at the boundaries: the plan, each stem's source_region and tempo grid, the
warp's anchors against the job's recorded analysis, and the conditioning samples against the
song's own samples over the region.
"""

import hashlib
import io
import json
import time
import uuid

import numpy as np
import pytest
import requests
import soundfile as sf

from bench.key.synth import render
from stems.plan import MusicalPlan, parse_key
from tasks.jobstore import JobStore
from tests.harness import REDIS
from tests.integration.test_plan_end_to_end import stack_for, upload_source

RATE = 32000  # the songs' own rate


def song_wav(chords: tuple[str, ...], key: str, bpm: float, lead: float, drift: float) -> tuple[bytes, list[float], list[float]]:
    """A song of chords (pluck over bass, one chord per bar) after ``lead`` seconds of silence,
    its tempo moving linearly from ``bpm`` by ``drift`` (a fraction) over the song; 16-bit WAV.
    Returns the file, the true downbeats and the true beats (seconds)."""
    parts, downbeats, beats, at = [np.zeros((1, int(round(lead * RATE))), np.float32)], [], [], lead
    for i, chord in enumerate(chords):
        tempo = bpm * (1 + drift * i / max(1, len(chords) - 1))
        plan = MusicalPlan(key=parse_key(key), progression=(chord,), chords=(chord,), bpm=tempo,
                           bars=1, source="test")
        bar = render(plan, "pluck", sr=RATE) + render(plan, "bass", sr=RATE)
        downbeats.append(at)
        beats.extend(at + k * 60.0 / tempo for k in range(4))
        at += bar.shape[1] / RATE
        parts.append(bar)
    audio = np.concatenate(parts, axis=1)
    audio *= 0.8 / np.max(np.abs(audio))
    out = io.BytesIO()
    sf.write(out, audio.T, RATE, format="WAV", subtype="PCM_16")
    return out.getvalue(), downbeats, beats + [at]


SONGS = {
    # name: chords, key, bpm, first downbeat (s), drift over the song
    "minor-drifting": (("Am", "F", "C", "G", "Am", "Dm", "E", "Am"), "A minor", 120.0, 0.7, 0.03),
    "major-slowing": (("C", "Am", "F", "G", "C", "F", "G", "C"), "C major", 110.0, 1.1, -0.02),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    """Gateway + a melody worker (tiny-melody: chroma conditioner), Redis, Azurite."""
    s = stack_for(tmp_path_factory.mktemp("song-stack"), receiver, "song",
                  MUSICGEN_MODEL="tiny-melody", BROKER_URL=f"{REDIS}/8", RESULT_BACKEND=f"{REDIS}/9")
    yield s
    s["gateway"].stop()
    s["worker"].stop()


@pytest.fixture(scope="module")
def songs(stack):
    """Each song uploaded once: name -> (file bytes, true downbeats, true beats)."""
    made = {}
    for name, (chords, key, bpm, lead, drift) in SONGS.items():
        made[name] = song_wav(chords, key, bpm, lead, drift)
        upload_source(stack, name, made[name][0])
    return made


def post(stack, audio_file_id, stems, **parameters) -> tuple[dict, dict]:
    body = {"generation_request_id": f"gen-{uuid.uuid4().hex[:10]}", "audio_file_id": audio_file_id,
            "target_stems": stems,
            "parameters": {"condition_on_audio": True, "style": "rock", "seed": 3, **parameters}}
    answer = requests.post(f"{stack['base']}/generate", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    return body, answer.json()


def callback_of(receiver, body, timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while True:  # callbacks of earlier tests may still arrive: match on the request id
        payload = receiver.wait(timeout=max(1.0, deadline - time.monotonic()))["json"]
        if payload["generation_request_id"] == body["generation_request_id"]:
            return payload


def run(stack, receiver, audio_file_id, stems, **parameters) -> tuple[dict, dict]:
    body, accepted = post(stack, audio_file_id, stems, **parameters)
    return accepted, callback_of(receiver, body)


def song_samples(data: bytes) -> np.ndarray:
    audio, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.T


def sha(audio: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(audio, dtype=np.float32).tobytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(SONGS))
def test_stems_play_along_with_the_region(stack, receiver, songs, name):
    chords, key, _, _, _ = SONGS[name]
    data, downbeats, beats = songs[name]
    accepted, payload = run(stack, receiver, name, ["guitar", "bass", "drums"],
                            source_region={"start_bar": 3, "bars": 4})
    assert payload["status"] == "completed", json.dumps(payload)[:2000]
    jobs = JobStore(stack["env"]["RESULT_BACKEND"])
    song = jobs.source_of(accepted["job_id"])  # the job's one analysis, as recorded
    region = song["region"]

    # the plan is the song's: its key and the region's chords, bar by bar
    plan = payload["plan"]
    assert plan["key"] == key and plan["source"] == "source-audio"
    assert plan["chords"] == list(chords[2:6]) and plan["bars"] == 4
    assert plan["bpm"] == pytest.approx(region["bpm"], abs=0.005)  # to 0.01 BPM
    assert plan["source_audio"]["key"]["key"] == key and plan["overrides"] == {}
    # the region starts on the song's true bar-3 downbeat
    assert region["start_seconds"] == pytest.approx(downbeats[2], abs=0.03)
    assert region["first_downbeat_seconds"] == pytest.approx(downbeats[0], abs=0.03)

    samples = song_samples(data)
    for stem in payload["stems"]:
        where = stem["source_region"]
        assert where == {"start_bar": 3, "bars": 4, "start_seconds": region["start_seconds"],
                         "end_seconds": region["end_seconds"],
                         "first_downbeat_seconds": region["first_downbeat_seconds"],
                         "bpm": region["bpm"], "grid": "song-beats"}
        tempo = stem["tempo"]
        assert tempo["grid"] == "song-beats" and tempo["bars"] == 4
        # the warp's anchors are the song's analysed beat map over the region ...
        anchors = np.asarray(tempo["song_beats_seconds"])
        np.testing.assert_allclose(anchors, np.asarray(region["beats"]) - region["beats"][0], atol=1e-6)
        # ... which is the song's true beat map over bars 3-6
        truth = np.asarray(beats[8:8 + 17]) - beats[8]
        np.testing.assert_allclose(anchors, truth, atol=0.03)
        # the stem covers exactly the region
        assert stem["duration_seconds"] == pytest.approx(region["end_seconds"] - region["start_seconds"],
                                                         abs=1e-3)
        if stem["stem"] == "drums":
            assert stem["conditioning"] is None and "conditioning_audio" not in stem
            continue
        # a melody model hears the region's own samples, from its first downbeat
        assert stem["conditioning"] == "chroma"
        cond = stem["conditioning_audio"]
        assert cond["origin"] == "song-region" and cond["sample_rate"] == RATE
        assert cond["start_sample"] == round(region["start_seconds"] * RATE)
        assert cond["end_sample"] == round(region["end_seconds"] * RATE)
        assert cond["sha256"] == sha(samples[:, cond["start_sample"]:cond["end_sample"]])
        assert key in stem["prompt"] and " ".join(chords[2:6]) in stem["prompt"]
        vs_song = stem["analysis"]["vs_song"]
        assert vs_song["song_key"] == key and vs_song["song_chords"] == list(chords[2:6])
        assert len(vs_song["chord_fit"]["per_bar"]) == 4
    coherence = payload["coherence"]
    assert coherence["source_key"] == key and coherence["song_chords"] == list(chords[2:6])
    assert {"guitar", "bass"} <= {n for n, s in coherence["stems"].items() if "chord_fit_vs_song" in s}
    status = requests.get(accepted["status_url"], timeout=5).json()
    assert status["plan"] == plan and status["coherence"] == coherence
    assert {s["stem"]: s["source_region"] for s in status["stems"]} == \
        {s["stem"]: s["source_region"] for s in payload["stems"]}
    # analysed once for the job, before the stems
    log = stack["worker"].log()
    assert log.count(f"song of job {accepted['job_id']} analysed") == 1


def test_start_seconds_snaps_and_continue_hears_the_bars_before(stack, receiver, songs):
    data, downbeats, _ = songs["minor-drifting"]
    accepted, payload = run(stack, receiver, "minor-drifting", ["bass"], source_mode="continue",
                            source_region={"start_seconds": downbeats[4] + 0.3, "bars": 2})
    assert payload["status"] == "completed", json.dumps(payload)[:2000]
    stem = payload["stems"][0]
    assert stem["source_region"]["start_bar"] == 5
    assert stem["source_region"]["start_seconds"] == pytest.approx(downbeats[4], abs=0.03)
    assert payload["plan"]["chords"] == ["Am", "Dm"]
    cond = stem["conditioning_audio"]
    assert stem["conditioning"] == "continuation" and cond["origin"] == "song-before-region"
    start = round(stem["source_region"]["start_seconds"] * RATE)
    assert cond["end_sample"] == start and cond["start_sample"] == start - 4 * RATE
    assert cond["sha256"] == sha(song_samples(data)[:, cond["start_sample"]:cond["end_sample"]])


def test_another_tempo_gets_a_constant_grid_with_the_regions_chords(stack, receiver, songs):
    _, downbeats, _ = songs["major-slowing"]
    accepted, payload = run(stack, receiver, "major-slowing", ["guitar"], target_bpm=90,
                            source_region={"start_bar": 2, "bars": 2})
    assert payload["status"] == "completed", json.dumps(payload)[:2000]
    plan = payload["plan"]
    assert plan["bpm"] == 90 and plan["chords"] == ["Am", "F"] and plan["key"] == "C major"
    assert plan["overrides"]["target_bpm"]["grid"] == "constant-bpm"
    stem = payload["stems"][0]
    assert stem["tempo"]["grid"] == "constant-bpm" and stem["tempo"]["target_bpm"] == 90
    assert stem["source_region"]["grid"] == "constant-bpm"
    # still placed in the song's own time
    assert stem["source_region"]["start_seconds"] == pytest.approx(downbeats[1], abs=0.03)
    assert stem["duration_seconds"] == pytest.approx(2 * 4 * 60 / 90, abs=1e-3)
    assert stem["conditioning_audio"]["origin"] == "plan"  # the region's chords at 90 BPM


def test_plan_made_at_submission_gains_the_songs_key(stack, receiver, songs):
    body, accepted = post(stack, "minor-drifting", ["bass"], target_bpm=100, chords=["Dm", "G"],
                          source_region={"bars": 2})
    early = requests.get(accepted["status_url"], timeout=5).json()["plan"]
    assert early["bpm"] == 100 and early["chords"] == ["Dm", "G"]  # recorded at submission
    payload = callback_of(receiver, body)
    assert payload["status"] == "completed", json.dumps(payload)[:2000]
    plan = payload["plan"]
    assert plan["chords"] == ["Dm", "G"] and plan["source_audio"]["key"]["key"] == "A minor"
    assert plan["overrides"]["chords"] == {"requested": ["Dm", "G"], "song": ["Am", "F"]}


@pytest.mark.parametrize("region, field", [
    ({"start_bar": 12, "bars": 2}, "parameters.source_region.start_bar"),
    ({"start_bar": 7, "bars": 4}, "parameters.source_region.bars"),
])
def test_region_past_the_songs_end_fails_the_job_once(stack, receiver, songs, region, field):
    accepted, payload = run(stack, receiver, "minor-drifting", ["guitar", "bass"],
                            source_region=region)
    assert payload["status"] == "failed"
    assert f"{field}: " in payload["error"] and "past the song's end" in payload["error"]
    status = requests.get(accepted["status_url"], timeout=5).json()
    assert all(s["runs"] == 1 for s in status["stems"])  # never retried


def test_an_ensemble_plays_along_too(stack, receiver, songs):
    accepted, payload = run(stack, receiver, "major-slowing", ["bass", "drums"],
                            arrangement="ensemble", source_region={"start_bar": 2, "bars": 2})
    assert payload["status"] == "completed", json.dumps(payload)[:2000]
    region = JobStore(stack["env"]["RESULT_BACKEND"]).source_of(accepted["job_id"])["region"]
    assert payload["plan"]["chords"] == ["Am", "F"]
    for stem in payload["stems"]:
        assert stem["arrangement"] == "ensemble" and stem["tempo"]["grid"] == "song-beats"
        assert stem["source_region"]["start_bar"] == 2
        np.testing.assert_allclose(stem["tempo"]["song_beats_seconds"],
                                   np.asarray(region["beats"]) - region["beats"][0], atol=1e-6)
        # one generation of the band, conditioned on the region's own samples
        assert stem["conditioning_audio"]["origin"] == "song-region"
        assert stem["duration_seconds"] == pytest.approx(region["end_seconds"] - region["start_seconds"],
                                                         abs=1e-3)
