"""Delivered formats (parameters.output): WAV/FLAC 16/24-bit and MP3 at 32, 44.1 and 48 kHz,
mono or stereo. Everything is checked on the file as a DAW would read it: decoded again with
libsndfile, its rate, channels, subtype and length, and its loudness (pyloudnorm, BS.1770-4) and
4x oversampled true peak measured here, independently of stems.loudness.

MP3: libsndfile writes a LAME/Info tag with the encoder delay and padding, and its mpg123
decoder honours it (gapless), so the decoded MP3 has exactly the samples encoded, aligned with
the source (lag 0 against the WAV of the same stem). A decoder that ignores the tag would see
the encoder delay (576 + 529 samples) in front and padding to a whole 1152-sample frame.
"""

import io
import math

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from stems.audio import (
    DUPLICATED_WARNING,
    MP3_BITRATES,
    OutputSpec,
    encode_audio,
    resample,
)
from stems.loudness import normalize_loudness
from stems.render import finish_stem, render_stem
from stems.tempo import TempoAnalysis
from stemgen_settings import load_settings

SETTINGS = load_settings()
TARGET_LUFS = SETTINGS.target_lufs              # -14 LUFS
MAX_TRUE_PEAK_DBTP = SETTINGS.max_true_peak_dbtp  # -1 dBTP
MODEL_RATE = 32000
BPM, BARS = 120.0, 2
SECONDS = BARS * 4 * 60.0 / BPM  # 4 s: the grid length
SUBTYPES = {("wav", 16): "PCM_16", ("wav", 24): "PCM_24", ("flac", 16): "PCM_16",
            ("flac", 24): "PCM_24", ("mp3", None): "MPEG_LAYER_III"}
SF_FORMATS = {"wav": "WAV", "flac": "FLAC", "mp3": "MP3"}


def tempo(seconds: float = SECONDS) -> TempoAnalysis:
    return TempoAnalysis(target_bpm=BPM, source_bpm=BPM, confidence=1.0, method="beat-warp",
                         stretch_ratio_min=1.0, stretch_ratio_max=1.0, beats_per_bar=4,
                         bars=BARS, downbeat_offset_seconds=0.0, padded_seconds=0.0,
                         duration_seconds=seconds)


def band(channels: int, seconds: float = SECONDS, rate: int = MODEL_RATE, seed: int = 0) -> np.ndarray:
    """Music-like test material at the model's rate: chords, a bass line and drum hits (kick
    and hat), a little different in each channel of a stereo pair."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    out = np.zeros((channels, n))
    for ch in range(channels):
        detune = 1.0 + 0.002 * ch
        chord = sum(np.sin(2 * np.pi * f * detune * t) for f in (220.0, 277.2, 329.6, 440.0))
        bass = np.sin(2 * np.pi * 55.0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
        out[ch] = 0.05 * chord + 0.1 * bass + 0.01 * rng.standard_normal(n)
    hit = np.exp(-np.arange(int(0.15 * rate)) / (0.03 * rate))
    kick = hit * np.sin(2 * np.pi * 60.0 * np.arange(hit.size) / rate)
    hat = 0.04 * rng.standard_normal(int(0.02 * rate)) * np.exp(-np.arange(int(0.02 * rate)) / 100)
    for beat in range(int(seconds * BPM / 60.0)):
        i = int(beat * 60.0 / BPM * rate)
        out[:, i: i + kick.size] += 0.25 * kick[: n - i]
        j = i + int(30.0 / BPM * rate)
        if j + hat.size < n:
            out[:, j: j + hat.size] += hat
    return out.astype(np.float32)


def drums(channels: int = 2, seconds: float = SECONDS, rate: int = MODEL_RATE) -> np.ndarray:
    """Noisy hits dense enough to reach the target with a few dB of limiting: the limited peaks
    are where an MP3 encoder overshoots the ceiling."""
    rng = np.random.default_rng(0)
    n = int(round(seconds * rate))
    x = 0.03 * rng.standard_normal((channels, n))
    hit = rng.standard_normal(3000) * np.exp(-np.arange(3000) / 300)
    for i in range(0, n - 3000, rate // 4):
        x[:, i: i + 3000] += 0.15 * hit
    return x.astype(np.float32)


def measured(data: bytes) -> dict:
    """What a reader of the file gets: libsndfile's view of it, the decoded samples, and their
    BS.1770-4 integrated loudness and 4x oversampled true peak (BS.1770-4 Annex 2)."""
    info = sf.info(io.BytesIO(data))
    audio, rate = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
    lufs = pyloudnorm.Meter(rate).integrated_loudness(audio)
    peak = np.max(np.abs(resample_poly(audio, 4, 1, axis=0)))
    return {"format": info.format, "subtype": info.subtype, "rate": rate,
            "channels": audio.shape[1], "frames": audio.shape[0], "audio": audio,
            "lufs": lufs, "true_peak": 20 * math.log10(peak)}


def lag(a: np.ndarray, b: np.ndarray) -> int:
    """Lag of ``a`` against ``b`` (mono sums, first two seconds), samples."""
    a, b = a.sum(axis=1)[: 2 * 48000], b.sum(axis=1)[: 2 * 48000]
    n = 1 << (len(a) + len(b)).bit_length()
    c = np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)
    k = int(np.argmax(c))
    return k if k < n // 2 else k - n


PCM = [OutputSpec(fmt, rate, depth, channels)
       for fmt in ("wav", "flac") for rate in (32000, 44100, 48000) for depth in (16, 24)
       for channels in (1, 2)]
MP3 = [OutputSpec("mp3", rate, None, channels, 320)
       for rate in (32000, 44100, 48000) for channels in (1, 2)]
MP3 += [OutputSpec("mp3", 44100, None, 2, 128), OutputSpec("mp3", 48000, None, 1, 192)]


def spec_id(spec: OutputSpec) -> str:
    return (f"{spec.format}-{spec.sample_rate}-{spec.bit_depth or spec.bitrate_kbps}-"
            f"{spec.channels}ch")


@pytest.mark.parametrize("spec", PCM + MP3, ids=spec_id)
def test_each_format_rate_depth_and_channels_meets_the_targets_on_the_decoded_file(spec):
    stereo_model = spec.channels == 2 and spec.format != "mp3"  # both kinds of model, 2 channels
    source = band(2 if stereo_model else 1)
    rendered = finish_stem(source, MODEL_RATE, tempo(), target_lufs=TARGET_LUFS,
                           max_true_peak_dbtp=MAX_TRUE_PEAK_DBTP, output=spec)
    got = measured(rendered.data)

    assert got["format"] == SF_FORMATS[spec.format]
    assert got["subtype"] == SUBTYPES[(spec.format, spec.bit_depth)]
    assert got["rate"] == spec.sample_rate
    assert got["channels"] == spec.channels
    # exactly the grid at the output rate (MP3 too: gapless, see the module docstring)
    assert got["frames"] == round(SECONDS * spec.sample_rate)
    assert got["lufs"] == pytest.approx(TARGET_LUFS, abs=0.2)
    assert got["true_peak"] <= MAX_TRUE_PEAK_DBTP + 1e-6

    # what the stem result says is what the file is
    meta = rendered.metadata()
    assert rendered.content_type == {"wav": "audio/wav", "flac": "audio/flac",
                                     "mp3": "audio/mpeg"}[spec.format]
    assert rendered.extension == spec.format
    assert meta["format"] == spec.format and meta["content_type"] == rendered.content_type
    assert meta["sample_rate"] == spec.sample_rate and meta["channels"] == spec.channels
    assert meta["duration_seconds"] == pytest.approx(SECONDS, abs=1e-6)
    if spec.format == "mp3":
        assert meta["bitrate_kbps"] == spec.bitrate_kbps and "bit_depth" not in meta
        # constant bitrate: the size is the bitrate's (plus the 1-frame Info tag)
        kbps = len(rendered.data) * 8 / SECONDS / 1000
        assert spec.bitrate_kbps <= kbps <= spec.bitrate_kbps * 1.03
    else:
        assert meta["bit_depth"] == spec.bit_depth and "bitrate_kbps" not in meta
    assert meta["loudness"]["integrated_lufs"] == pytest.approx(got["lufs"], abs=0.001)
    assert meta["loudness"]["true_peak_dbtp"] == pytest.approx(got["true_peak"], abs=0.01)
    assert rendered.audio.shape == (spec.channels, got["frames"])
    if stereo_model:
        assert meta["channels_source"] == "model" and "warnings" not in meta
    elif spec.channels == 2:
        assert meta["channels_source"] == "duplicated"
        assert meta["warnings"] == [DUPLICATED_WARNING]
        assert np.array_equal(got["audio"][:, 0], got["audio"][:, 1])
    else:
        assert meta["channels_source"] == "model"


@pytest.mark.parametrize("rate", [44100, 48000])
def test_mp3_is_sample_aligned_with_the_wav_of_the_same_stem(rate):
    source = band(2)
    wav = finish_stem(source, MODEL_RATE, tempo(), output=OutputSpec("wav", rate, 24, 2))
    mp3 = finish_stem(source, MODEL_RATE, tempo(), output=OutputSpec("mp3", rate, None, 2, 320))
    a, b = measured(mp3.data)["audio"], measured(wav.data)["audio"]
    assert a.shape == b.shape
    assert lag(a, b) == 0


def test_mp3_overshoot_is_limited_away_so_the_decoded_file_keeps_the_ceiling():
    source = drums(2)
    spec = OutputSpec("mp3", 48000, None, 2, 320)
    # the naive way: normalise at the output rate, then encode; the decoded MP3 goes over
    naive, report = normalize_loudness(resample(source, MODEL_RATE, 48000), 48000,
                                       target_lufs=TARGET_LUFS, max_true_peak_dbtp=MAX_TRUE_PEAK_DBTP)
    assert report.true_peak_dbtp <= MAX_TRUE_PEAK_DBTP
    assert measured(encode_audio(naive, spec))["true_peak"] > MAX_TRUE_PEAK_DBTP + 0.01
    # finish_stem measures the decoded file and makes it again with headroom for the codec
    rendered = finish_stem(source, MODEL_RATE, tempo(), target_lufs=TARGET_LUFS,
                           max_true_peak_dbtp=MAX_TRUE_PEAK_DBTP, output=spec)
    got = measured(rendered.data)
    assert got["true_peak"] <= MAX_TRUE_PEAK_DBTP + 1e-6
    assert got["lufs"] == pytest.approx(TARGET_LUFS, abs=0.2)  # the headroom cost limiting, not loudness


@pytest.mark.parametrize("spec", [OutputSpec(), OutputSpec("flac", 44100, 16, 1),
                                  OutputSpec("mp3", 44100, None, 2, 128)], ids=spec_id)
def test_peaky_material_keeps_the_ceiling_and_reports_what_the_file_measures(spec):
    # sparse hits: the limiter's depth is bounded, so the stem stays under the target
    rate, n = MODEL_RATE, int(SECONDS * MODEL_RATE)
    x = np.zeros((1, n), np.float32)
    hit = np.random.default_rng(1).standard_normal(1500) * np.exp(-np.arange(1500) / 120)
    for i in range(0, n - 1500, rate // 2):
        x[0, i: i + 1500] += 0.5 * hit
    rendered = finish_stem(x, rate, tempo(), output=spec)
    got = measured(rendered.data)
    assert got["true_peak"] <= MAX_TRUE_PEAK_DBTP + 1e-6
    assert got["lufs"] < TARGET_LUFS
    assert rendered.loudness.integrated_lufs == pytest.approx(got["lufs"], abs=0.001)


def test_a_stereo_model_gives_stereo_by_default_and_can_be_downmixed():
    source = band(2)
    own = finish_stem(source, MODEL_RATE, tempo(), output=OutputSpec("flac", 48000, 24, None))
    assert own.channels == 2 and own.metadata()["channels_source"] == "model"
    left, right = measured(own.data)["audio"].T
    assert not np.allclose(left, right)  # the two channels differ: real stereo
    mono = finish_stem(source, MODEL_RATE, tempo(), output=OutputSpec("wav", 48000, 24, 1))
    assert mono.channels == 1 and mono.metadata()["channels_source"] == "downmixed"
    assert measured(mono.data)["lufs"] == pytest.approx(TARGET_LUFS, abs=0.2)
    # a mono model's own channels: mono
    assert finish_stem(band(1), MODEL_RATE, tempo(), output=OutputSpec()).channels == 1


def test_render_stem_conforms_and_delivers_the_grid_at_the_output_rate():
    # 97 BPM at 44.1 kHz: the grid is not a whole number of samples at either rate
    bpm, rate = 97.0, 44100
    rendered = render_stem(band(1, seconds=6.0), MODEL_RATE, bpm=bpm, duration_seconds=5.0,
                           output=OutputSpec("flac", rate, 16, 2))
    got = measured(rendered.data)
    bars = rendered.tempo.bars
    assert got["rate"] == rate and got["channels"] == 2 and got["subtype"] == "PCM_16"
    assert got["frames"] == round(bars * 4 * 60.0 / bpm * rate)
    assert got["lufs"] == pytest.approx(TARGET_LUFS, abs=0.2)
    assert got["true_peak"] <= MAX_TRUE_PEAK_DBTP + 1e-6


def test_without_an_output_spec_the_model_rate_wav_is_kept():
    rendered = finish_stem(band(1), MODEL_RATE, tempo())
    got = measured(rendered.data)
    assert (got["rate"], got["subtype"], got["channels"]) == (MODEL_RATE, "PCM_24", 1)
    assert rendered.metadata()["format"] == "wav" and rendered.metadata()["bit_depth"] == 24


@pytest.mark.parametrize("to_rate", [44100, 48000])
def test_a_loop_is_resampled_circularly(to_rate):
    # one period of a loop (a phrase that does not end where it starts): resampled on its own,
    # its seam would ring; resampled circularly it equals a period of the resampled repetition
    rng = np.random.default_rng(2)
    n = 16000
    period = (rng.standard_normal((2, n)) * 0.1).astype(np.float32)
    length = round(n * to_rate / MODEL_RATE)
    looped = resample(period, MODEL_RATE, to_rate, length=length, loop=True)
    repeated = resample(np.tile(period, (1, 3)), MODEL_RATE, to_rate)[:, length: 2 * length]
    plain = resample(period, MODEL_RATE, to_rate, length=length)
    assert looped.shape == (2, length)
    assert np.max(np.abs(looped - repeated)) < 1e-4
    assert np.max(np.abs(plain - repeated)[:, :50]) > 1e-2  # the edge a plain resample gets wrong


def test_resample_keeps_a_tone_and_its_level():
    t = np.arange(MODEL_RATE) / MODEL_RATE
    tone = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)[None]
    out = resample(tone, MODEL_RATE, 44100)
    assert out.shape == (1, 44100)
    ref = 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(44100) / 44100)
    assert np.max(np.abs(out[0, 1000:-1000] - ref[1000:-1000])) < 1e-4


def test_output_spec_from_a_request():
    assert OutputSpec.from_dict(None) == OutputSpec("wav", 48000, 24, None, None)
    assert OutputSpec.from_dict({"format": "mp3"}) == OutputSpec("mp3", 48000, None, None, 320)
    assert OutputSpec.from_dict({"format": "flac", "sample_rate": 44100, "bit_depth": 16,
                                 "channels": 2, "bitrate_kbps": None}) == \
        OutputSpec("flac", 44100, 16, 2, None)
    assert set(MP3_BITRATES) >= {128, 320}
    for bad in ({"format": "ogg"}, {"format": "mp3", "bit_depth": 16},
                {"format": "wav", "bitrate_kbps": 320}, {"format": "mp3", "sample_rate": 22050},
                {"channels": 3}, {"bit_depth": 8}, {"colour": "red"}):
        with pytest.raises(ValueError):
            OutputSpec.from_dict(bad)
