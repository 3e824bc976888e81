"""Delivered formats on real parts (issue #14, item 5): HTTP → gateway → Redis broker → Celery
worker (tiny MusicGen, mono, 32 kHz; tiny HTDemucs for the ensemble) → conform → soxr → loudness →
FLAC/MP3 encoding → Azurite → signed callback. The stems are downloaded from the callback's URLs
and checked as a DAW would read them: Content-Type, extension, rate, channels, subtype, length,
and the loudness and true peak measured here on the decoded file.

Its own Redis DBs (4 and 5) so that it never meets another stack's jobs.
"""

import io
import math
import uuid

import numpy as np
import pyloudnorm
import pytest
import requests
import soundfile as sf
from scipy.signal import resample_poly

from stems.audio import DUPLICATED_WARNING
from stems.checkpoint import write_tiny_demucs
from stems.loudness import MAX_LIMITING_DB
from tests.harness import REDIS, CallbackReceiver, running_stack, service_env

BPM, SECONDS, BARS = 120.0, 4.0, 2
TARGET_LUFS, MAX_TRUE_PEAK_DBTP = -14.0, -1.0  # the settings' defaults


@pytest.fixture(scope="module")
def output_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("output")
    torch_home = tmp / "torch"
    write_tiny_demucs(torch_home, "htdemucs_6s")
    with CallbackReceiver() as receiver:
        env = service_env(tmp, BROKER_URL=f"{REDIS}/4", RESULT_BACKEND=f"{REDIS}/5",
                          DEFAULT_CALLBACK_URL=receiver.url, TORCH_HOME=str(torch_home))
        with running_stack(env, tmp, name="output", worker_timeout=300) as (base, worker, _):
            yield {"base": base, "receiver": receiver, "worker": worker}


def submit(stack, stems, output, **parameters) -> tuple[dict, dict]:
    body = {"generation_request_id": f"gen-out-{uuid.uuid4().hex[:10]}", "audio_file_id": "audio-out",
            "target_stems": stems,
            "parameters": {"target_bpm": BPM, "duration_seconds": SECONDS, "style": "rock",
                           "seed": 5, "output": output, **parameters}}
    answer = requests.post(f"{stack['base']}/generate", json=body, timeout=10)
    assert answer.status_code == 202, answer.text
    callback = stack["receiver"].wait(timeout=240)["json"]
    assert callback["generation_request_id"] == body["generation_request_id"]
    assert callback["status"] == "completed", (callback, stack["worker"].log()[-3000:])
    return body, callback


def download(stem: dict) -> dict:
    """The blob behind the callback's URL, as a reader of the file sees it."""
    response = requests.get(stem["url"], timeout=30)
    assert response.status_code == 200
    info = sf.info(io.BytesIO(response.content))
    audio, rate = sf.read(io.BytesIO(response.content), dtype="float64", always_2d=True)
    peak = float(np.max(np.abs(resample_poly(audio, 4, 1, axis=0))))
    return {"content_type": response.headers["Content-Type"], "format": info.format,
            "subtype": info.subtype, "rate": rate, "channels": audio.shape[1],
            "frames": audio.shape[0], "audio": audio,
            "lufs": pyloudnorm.Meter(rate).integrated_loudness(audio),
            "true_peak": 20 * math.log10(peak) if peak > 0 else -math.inf}


def check_loudness(stem: dict, got: dict) -> None:
    """The targets hold on the decoded file, and the callback reports what the file measures."""
    assert got["true_peak"] <= MAX_TRUE_PEAK_DBTP + 1e-6
    loudness = stem["loudness"]
    assert loudness["true_peak_dbtp"] == pytest.approx(got["true_peak"], abs=0.01)
    assert loudness["integrated_lufs"] == pytest.approx(got["lufs"], abs=0.01)
    if stem.get("silent"):  # a nearly silent separated stem keeps its level
        assert got["lufs"] <= TARGET_LUFS + 0.2
    elif loudness["limited_db"] > -MAX_LIMITING_DB:  # the target was reachable
        assert got["lufs"] == pytest.approx(TARGET_LUFS, abs=0.5)
    else:  # peaky material: bounded limiting, under the target (and reported so)
        assert got["lufs"] < TARGET_LUFS


def test_flac_44k_16_bit_stereo_from_a_mono_model(output_stack):
    output = {"format": "flac", "sample_rate": 44100, "bit_depth": 16, "channels": 2}
    body, callback = submit(output_stack, ["guitar", "bass"], output)
    assert {s["stem"] for s in callback["stems"]} == {"guitar", "bass"}
    for stem in callback["stems"]:
        assert stem["blob_name"] == f"{callback['job_id']}/{stem['stem']}.flac"
        assert stem["url"].split("?")[0].endswith(f"/{stem['stem']}.flac")
        assert stem["format"] == "flac" and stem["content_type"] == "audio/flac"
        assert stem["sample_rate"] == 44100 and stem["bit_depth"] == 16 and stem["channels"] == 2
        assert "bitrate_kbps" not in stem
        # the tiny model is mono: the channel is copied, and the stem says so
        assert stem["channels_source"] == "duplicated"
        assert stem["warnings"] == [DUPLICATED_WARNING]
        assert stem["duration_seconds"] == pytest.approx(SECONDS, abs=1e-6)
        got = download(stem)
        assert got["content_type"] == "audio/flac"
        assert (got["format"], got["subtype"], got["rate"], got["channels"]) == ("FLAC", "PCM_16", 44100, 2)
        assert got["frames"] == round(BARS * 4 * 60.0 / BPM * 44100)
        assert np.array_equal(got["audio"][:, 0], got["audio"][:, 1])
        check_loudness(stem, got)


def test_mp3_ensemble_at_the_default_rate(output_stack):
    output = {"format": "mp3", "bitrate_kbps": 192}
    body, callback = submit(output_stack, ["guitar", "drums"], output, arrangement="ensemble")
    lengths = set()
    for stem in callback["stems"]:
        assert stem["arrangement"] == "ensemble"
        assert stem["blob_name"] == f"{callback['job_id']}/{stem['stem']}.mp3"
        assert stem["format"] == "mp3" and stem["content_type"] == "audio/mpeg"
        assert stem["sample_rate"] == 48000 and stem["bitrate_kbps"] == 192
        assert stem["channels"] == 1 and stem["channels_source"] == "model"  # the model's own
        assert "bit_depth" not in stem
        assert bool(stem["warnings"]) == stem["silent"]  # no channel warning for the model's own
        got = download(stem)
        assert got["content_type"] == "audio/mpeg"
        assert (got["format"], got["subtype"], got["rate"], got["channels"]) == \
            ("MP3", "MPEG_LAYER_III", 48000, 1)
        # gapless: libsndfile's decoder reads the LAME tag, so the grid is exact
        assert got["frames"] == round(BARS * 4 * 60.0 / BPM * 48000)
        lengths.add(got["frames"])
        check_loudness(stem, got)
    assert len(lengths) == 1


def test_mp3_320_independent_stem_meets_the_loudness_target(output_stack):
    # (the tiny model's independent stems are not peaky: the target is reachable, and met)
    body, callback = submit(output_stack, ["bass"], {"format": "mp3", "channels": 2})
    (stem,) = callback["stems"]
    assert stem["blob_name"] == f"{callback['job_id']}/bass.mp3"
    assert stem["bitrate_kbps"] == 320 and stem["channels_source"] == "duplicated"
    got = download(stem)
    assert got["content_type"] == "audio/mpeg"
    assert (got["format"], got["rate"], got["channels"]) == ("MP3", 48000, 2)
    assert got["frames"] == round(BARS * 4 * 60.0 / BPM * 48000)
    assert stem["loudness"]["limited_db"] > -MAX_LIMITING_DB
    assert got["lufs"] == pytest.approx(TARGET_LUFS, abs=0.5)
    check_loudness(stem, got)
