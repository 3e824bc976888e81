"""Two models served by one deployment, on real parts: MUSICGEN_MODELS="tiny,tiny-melody", one
worker per model (each started with MUSICGEN_MODEL set to the model it holds, consuming its
model's queue), a gunicorn gateway, Redis DBs 4/5, Azurite and a callback receiver. A job goes to
the workers of the model it asked for (the stem results name the model), the default model is
the first, an unserved model is a 422, and GET /health lists each model with its workers."""

import uuid

import pytest
import requests

from tests.harness import REDIS, CallbackReceiver, service_env, start_gateway, start_worker, wait_job


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    with CallbackReceiver() as receiver:
        env = service_env(tmp, BROKER_URL=f"{REDIS}/4", RESULT_BACKEND=f"{REDIS}/5",
                          DEFAULT_CALLBACK_URL=receiver.url, MUSICGEN_MODELS="tiny,tiny-melody")
        workers = [start_worker(dict(env, MUSICGEN_MODEL=model), tmp, name=model)
                   for model in ("tiny", "tiny-melody")]
        try:
            gateway, base = start_gateway(env, tmp)
            try:
                yield {"base": base, "workers": workers, "stems_queue": env["STEMS_QUEUE"]}
            finally:
                gateway.stop()
        finally:
            for worker in workers:
                worker.stop()


def submit(base, **parameters):
    body = {"generation_request_id": f"model-{uuid.uuid4().hex[:10]}", "audio_file_id": "audio-1",
            "target_stems": ["bass"],
            "parameters": {"target_bpm": 120, "duration_seconds": 2.0, "seed": 4, **parameters}}
    return requests.post(f"{base}/generate", json=body, timeout=10)


def test_each_job_runs_on_the_workers_of_its_model(stack):
    base = stack["base"]
    default, melody = submit(base), submit(base, model="tiny-melody")
    assert default.status_code == melody.status_code == 202
    done = {name: wait_job(base, answer.json()["job_id"], 240)
            for name, answer in (("default", default), ("melody", melody))}
    assert done["default"]["status"] == done["melody"]["status"] == "completed"
    assert done["default"]["stems"][0]["model"] == "tiny"
    assert done["default"]["stems"][0]["precision"] in ("float32", "bfloat16")  # auto, per CPU
    assert done["melody"]["stems"][0]["model"] == "tiny-melody"
    # the stem's "model" is the MUSICGEN_MODEL of the worker that generated it; its generation
    # task ran there only (finalize and delivery run on any worker's callbacks queue)
    for worker, job in ((stack["workers"][0], done["default"]), (stack["workers"][1], done["melody"])):
        assert any("generate_stem" in line and job["job_id"] in line for line in worker.log().splitlines())
    for worker, job in ((stack["workers"][1], done["default"]), (stack["workers"][0], done["melody"])):
        assert not any("generate_stem" in line and job["job_id"] in line for line in worker.log().splitlines())


def test_an_unserved_model_is_refused(stack):
    answer = submit(stack["base"], model="facebook/musicgen-large")
    assert answer.status_code == 422
    field = answer.json()["error"]["fields"][0]
    assert field["field"] == "parameters.model" and "tiny, tiny-melody" in field["message"]


def test_health_lists_each_model_with_its_workers(stack):
    models = requests.get(f"{stack['base']}/health", timeout=10).json()["models"]
    queue = stack["stems_queue"]  # the harness gives each stack its own STEMS_QUEUE
    assert [(m["model"], m["default"], m["queue"]) for m in models] == [
        ("tiny", True, f"{queue}.tiny"), ("tiny-melody", False, f"{queue}.tiny-melody")]
    assert all(len(m["workers"]) == 1 for m in models)
    assert models[0]["workers"] != models[1]["workers"]
