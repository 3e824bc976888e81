"""stems.song.analyse_song on short synthetic songs whose bars, chords and key are known."""

import json

import numpy as np
import pytest

from bench.key.synth import render
from stems.plan import Key, MusicalPlan
from stems.song import ChordSpan, RegionError, SongAnalysis, SongAnalysisError, analyse_song

SR = 32000


def song(chords: tuple[str, ...], key: Key, bpm: float = 120.0, lead: float = 0.5) -> np.ndarray:
    plan = MusicalPlan(key=key, progression=chords, chords=chords, bpm=bpm, bars=len(chords), source="test")
    audio = render(plan, "pluck") + render(plan, "bass")
    return np.concatenate([np.zeros((1, int(lead * SR)), dtype=np.float32), audio], axis=1)


@pytest.fixture(scope="module")
def minor_song() -> SongAnalysis:
    return analyse_song(song(("Am", "F", "C", "G", "Am", "Dm", "E", "Am"), Key(9, "minor")), SR)


def test_key_chords_and_bars(minor_song):
    s = minor_song
    assert s.key == "A minor"
    assert s.bar_count == 8
    assert abs(s.downbeats[0] - 0.5) < 0.03
    assert abs(s.bpm - 120.0) < 1.0
    roots = [c.chord.rstrip("m7aj") for c in s.chords]
    assert roots == ["A", "F", "C", "G", "A", "D", "E", "A"]
    assert all(0.0 <= c.confidence <= 1.0 for c in s.chords)


def test_region(minor_song):
    r = minor_song.region(2, 3)
    assert r.start_bar == 2 and r.bars == 3
    assert r.start_seconds == minor_song.downbeats[1] and r.end_seconds == minor_song.downbeats[4]
    assert len(r.beats) == 13 and r.beats[0] == r.start_seconds and r.beats[-1] == r.end_seconds
    assert [c.rstrip("m7aj") for c in r.chords] == ["F", "C", "G"]
    assert len(r.half_bar_chords) == 3
    last = minor_song.region(8)
    assert last.bars == 1 and abs(last.end_seconds - last.start_seconds - 2.0) < 0.05
    assert minor_song.bar_at(minor_song.downbeats[3] + 0.3) == 4


@pytest.mark.parametrize("start, bars", [(0, 1), (9, 1), (8, 2), (1, 0)])
def test_region_outside_the_song(minor_song, start, bars):
    with pytest.raises(RegionError) as info:
        minor_song.region(start, bars)
    assert info.value.field == "parameters.source_region"


def test_round_trip(minor_song):
    d = json.loads(json.dumps(minor_song.to_dict()))
    back = SongAnalysis.from_dict(d)
    assert back.key == minor_song.key and back.bar_count == minor_song.bar_count
    assert [c.chord for c in back.chords] == [c.chord for c in minor_song.chords]
    assert isinstance(back.chords[0], ChordSpan)
    with pytest.raises(SongAnalysisError):
        SongAnalysis.from_dict({"beats": []})


def test_bad_audio():
    with pytest.raises(SongAnalysisError):
        analyse_song(np.zeros((1, 5 * SR)), SR)
    with pytest.raises(SongAnalysisError):
        analyse_song(np.ones((1, SR // 2)), SR)
    with pytest.raises(SongAnalysisError):
        analyse_song(np.full((1, 5 * SR), np.nan), SR)
    with pytest.raises(SongAnalysisError):
        analyse_song(np.zeros((1, 5 * SR)), 0)


def _spans(chords: list[str], bar: float = 2.0) -> tuple[list[ChordSpan], tuple[float, ...]]:
    spans = [ChordSpan(i * bar, (i + 1) * bar, c, 1.0) for i, c in enumerate(chords)]
    return spans, tuple(i * bar for i in range(len(chords)))


@pytest.mark.parametrize("chords, key", [
    (["Dm", "G", "Em", "Am", "F", "G", "C", "C"], "C major"),          # tonic only where V resolves
    (["C", "G", "F", "E", "Dm", "F", "E", "Am"], "A minor"),           # relative chords, E -> Am
    (["Am", "F", "C", "G", "Am", "F", "C", "G"], "A minor"),           # Aeolian loop ending on VII
    (["C", "Bb", "F", "C", "C", "Ab", "Bb", "C"], "C major"),          # borrowed bVII, bVI
    (["C", "E7", "Am", "F", "D7", "G", "G7", "C"], "C major"),         # secondary dominants
])
def test_key_from_harmony_tells_relative_keys_apart(chords, key):
    from stems.song import _KEYS, _key_scores

    spans, downbeats = _spans(chords * 2)
    scores = _key_scores(spans, downbeats, np.zeros(12))
    assert _KEYS[int(np.argmax(scores))].name == key
