"""The job's song analysed once (tasks.song_source): the region resolved on a real analysis of a
synthetic song whose bars, chords and key are known, the conditioning excerpt, the errors."""

import numpy as np
import pytest

from bench.key.synth import render
from stemgen_settings import load_settings
from stems.plan import MusicalPlan, parse_chord, parse_key
from stems.song import SongAnalysis
from tasks import song_source
from tasks.song_source import SongRegionError
from tasks.source_audio import SourceAudio

RATE = 32000
CHORDS = ("Am", "F", "C", "G", "Am", "Dm", "E", "Am")
LEAD = 0.6


@pytest.fixture(scope="module")
def source() -> SourceAudio:
    plan = MusicalPlan(key=parse_key("A minor"), progression=CHORDS, chords=CHORDS, bpm=120.0,
                       bars=len(CHORDS), source="test")
    audio = render(plan, "pluck", sr=RATE) + render(plan, "bass", sr=RATE)
    audio = np.concatenate([np.zeros((1, int(LEAD * RATE)), np.float32), audio], axis=1)
    audio = np.round(audio / np.max(np.abs(audio)) * 0.8 * 32767) / 32768  # 16-bit samples
    return SourceAudio(audio.astype(np.float32), RATE, "f" * 64, "blob:audio-files/song", "PCM_16")


@pytest.fixture(scope="module")
def settings():
    return load_settings(max_duration_seconds=30)


def request(**parameters):
    return {"generation_request_id": "gen-1", "parameters": {"condition_on_audio": True,
                                                             "duration_seconds": 8.0, **parameters}}


@pytest.fixture(scope="module")
def analysed(source, settings):
    return song_source.analyse(source, request(source_region={"start_bar": 3, "bars": 4}), settings)


def test_the_region_is_the_songs_bars(analysed):
    record, _ = analysed
    region = record["region"]
    assert region["start_bar"] == 3 and region["bars"] == 4
    assert region["start_seconds"] == pytest.approx(LEAD + 4.0, abs=0.03)
    assert region["end_seconds"] == pytest.approx(LEAD + 12.0, abs=0.03)
    assert region["first_downbeat_seconds"] == pytest.approx(LEAD, abs=0.03)
    assert len(region["beats"]) == 17 and region["beats"][0] == region["start_seconds"]
    # the analysis's chords of those bars (their roots are the song's), and its tempo
    analysis = SongAnalysis.from_dict(record["analysis"])
    assert region["chords"] == list(analysis.region(3, 4).chords)
    assert [parse_chord(c).root for c in region["chords"]] == [parse_chord(c).root for c in CHORDS[2:6]]
    assert region["bpm"] == pytest.approx(120.0, rel=0.01)
    assert record["report"]["key"]["key"] == "A minor" and record["grid"] == "song-beats"
    assert record["analysis"]["bar_count"] == 8


def test_the_excerpt_is_the_regions_own_samples(analysed, source):
    record, data = analysed
    span = record["excerpt"]
    assert span["kind"] == "region"
    assert span["start_sample"] == round(record["region"]["start_seconds"] * RATE)
    audio, rate = song_source.decode_excerpt(data)
    assert rate == RATE
    np.testing.assert_array_equal(audio, source.audio[:, span["start_sample"]:span["end_sample"]])


def test_start_seconds_snaps_to_the_nearest_downbeat_and_duration_sets_bars(source, settings):
    record, _ = song_source.analyse(source, request(source_region={"start_seconds": LEAD + 6.3},
                                                    duration_seconds=4.4), settings)
    assert record["region"]["start_bar"] == 4 and record["region"]["bars"] == 2


def test_continue_is_conditioned_on_the_seconds_before_the_region(source, settings):
    record, data = song_source.analyse(
        source, request(source_mode="continue", source_region={"start_bar": 4, "bars": 2}), settings)
    span = record["excerpt"]
    start = round(record["region"]["start_seconds"] * RATE)
    assert span["kind"] == "continuation" and span["end_sample"] == start
    assert span["start_sample"] == start - int(settings.source_prompt_seconds * RATE)
    with pytest.raises(SongRegionError) as info:
        song_source.analyse(source, request(source_mode="continue",
                                            source_region={"start_bar": 1, "bars": 2}), settings)
    assert info.value.field == "parameters.source_mode"


def test_another_tempo_is_a_constant_grid(source, settings):
    record, _ = song_source.analyse(source, request(target_bpm=100, source_region={"bars": 2}),
                                    settings)
    assert record["grid"] == "constant-bpm" and record["region"]["start_bar"] == 1
    near, _ = song_source.analyse(source, request(target_bpm=120.5, source_region={"bars": 2}),
                                  settings)
    assert near["grid"] == "song-beats"  # within SAME_TEMPO_TOLERANCE: the song's own beats
    # duration_seconds is the stems' length: whole bars at their tempo (4 s bars at 60 BPM)
    slow, _ = song_source.analyse(source, request(target_bpm=60, duration_seconds=8.0), settings)
    assert slow["region"]["bars"] == 2


@pytest.mark.parametrize("parameters, field, words", [
    ({"source_region": {"start_bar": 9, "bars": 1}}, "parameters.source_region.start_bar", "past the song's end"),
    ({"source_region": {"start_bar": 6, "bars": 4}}, "parameters.source_region.bars", "past the song's end"),
    ({"source_region": {"start_bar": 6}, "duration_seconds": 10.0}, "parameters.duration_seconds",
     "past the song's end"),
    ({"source_region": {"start_seconds": 40.0}}, "parameters.source_region.start_seconds", "past the song's end"),
    ({"source_region": {"bars": 8}, "duration_seconds": None}, "parameters.source_region.bars",
     "MAX_DURATION_SECONDS"),
])
def test_a_region_the_song_does_not_have_names_the_field(source, settings, parameters, field, words):
    settings = settings.model_copy(update={"max_duration_seconds": 12.0})  # 6 bars at 120 BPM
    with pytest.raises(SongRegionError) as info:
        song_source.analyse(source, request(**parameters), settings)
    assert info.value.field == field and words in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_bars_without_a_chord_keep_the_chord_before():
    assert song_source.plan_chords(["N", "Am", "N", "Xq", "F"]) == ["Am", "Am", "Am", "Am", "F"]
    assert song_source.plan_chords(["N", "N"]) == []
