"""Pure parts of the task layer: final state, callback body, sampling overrides."""

from stemgen_settings import load_settings
from tasks.stem_tasks import callback_payload, job_state, sampling_params


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
                    "error": "drums: boom"}
    assert callback_payload(job, results[:1], "completed")["error"] is None


def test_sampling_overrides_fall_back_to_settings():
    settings = load_settings(default_top_k=250, default_cfg_coef=3.0)
    params = sampling_params({"temperature": 0.7, "top_k": None}, settings)
    assert params.temperature == 0.7 and params.top_k == 250 and params.cfg_coef == 3.0
