"""Model choice: parameters.model picks one of MUSICGEN_MODELS (default the first, recorded in
the job), an unserved model is a 422 listing the served ones, each model has its own queue, and
GET /health lists the models with the workers holding them. The two-worker run on real parts is
tests/integration/test_model_choice_end_to_end.py."""

import pytest

from api import create_app
from stemgen_settings import load_settings
from tasks.app import celery_config
from tests.api.test_routes import FakeService, body

MODELS = "facebook/musicgen-small,facebook/musicgen-melody"


@pytest.fixture
def service():
    return FakeService()


@pytest.fixture
def client(service):
    settings = load_settings(musicgen_models=MODELS, default_callback_url="http://backend.test/cb")
    return create_app(settings, service=service).test_client()


def test_the_default_model_is_the_first_served_and_is_recorded(client, service):
    assert client.post("/generate", json=body()).status_code == 202
    assert service.submitted[-1][0]["parameters"]["model"] == "facebook/musicgen-small"


def test_a_served_model_is_accepted(client, service):
    b = body(generation_request_id="gen-melody")
    b["parameters"]["model"] = "facebook/musicgen-melody"
    assert client.post("/generate", json=b).status_code == 202
    assert service.submitted[-1][0]["parameters"]["model"] == "facebook/musicgen-melody"


@pytest.mark.parametrize("model", ["facebook/musicgen-large", "", "x" * 201])
def test_an_unserved_model_is_a_422_listing_the_served_ones(client, service, model):
    b = body()
    b["parameters"]["model"] = model
    r = client.post("/generate", json=b)
    assert r.status_code == 422
    field = r.json["error"]["fields"][0]
    assert field["field"] == "parameters.model"
    if len(model) <= 200:
        assert "facebook/musicgen-small, facebook/musicgen-melody" in field["message"]
    assert not service.submitted


def test_queues_per_model():
    one = load_settings(musicgen_model="tiny")
    assert one.served_models == ["tiny"] and one.stems_queue_for("tiny") == "stems"
    two = load_settings(musicgen_models=MODELS, musicgen_model="facebook/musicgen-melody")
    assert two.served_models == MODELS.split(",")
    assert two.stems_queue_for("facebook/musicgen-melody") == "stems.facebook-musicgen-melody"
    # a worker consumes the queue of the model it holds, and the callbacks queue
    queues = {q.name for q in celery_config(two)["task_queues"]}
    assert queues == {"stems.facebook-musicgen-melody", "callbacks"}


def test_health_lists_the_models_and_their_workers(client, service):
    service.workers = lambda: [{"name": "gpu1@h", "model": "facebook/musicgen-melody", "device": "cuda"},
                               {"name": "gpu2@h", "model": "facebook/musicgen-melody", "device": "cuda"}]
    models = client.get("/health").json["models"]
    assert models == [
        {"model": "facebook/musicgen-small", "default": True, "queue": "stems.facebook-musicgen-small",
         "workers": []},
        {"model": "facebook/musicgen-melody", "default": False,
         "queue": "stems.facebook-musicgen-melody", "workers": ["gpu1@h", "gpu2@h"]}]
