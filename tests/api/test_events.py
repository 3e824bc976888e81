"""GET /jobs/<id>/events against the real Redis job store (DB 12): the stored events replayed in
order, live events fanned out by the one hub reader, Last-Event-ID resume without repeats,
heartbeats, the end after the final state, and the auth and errors of GET /jobs/<id>."""

import json
import random
import threading
import time

import pytest

from api import create_app
from api.auth import key_id_of
from stemgen_settings import load_settings
from tasks.jobstore import EVENTS_KEEP_AFTER_FINISH_SECONDS
from tests.api.conftest import JOB_STORE_URL as URL

KEY = "events-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def service(real_service):  # tests/api/conftest.py: Redis DB 12, flushed
    return real_service


@pytest.fixture
def app(service):
    return create_app(load_settings(result_backend=URL, stemgen_api_keys=KEY,
                                    events_heartbeat_seconds=0.05), service=service)


@pytest.fixture
def client(app):
    return app.test_client()


def new_job(service, rid="gen-1", stems=("guitar", "bass")) -> str:
    return service.submit({"generation_request_id": rid, "audio_file_id": "a",
                           "target_stems": list(stems),
                           "parameters": {"target_bpm": 120.0, "duration_seconds": 4.0}}, None,
                          owner=key_id_of(KEY)).job_id


def run_job(service, job_id, stems=("guitar", "bass"), steps=5, pause=0.0):
    for stem in stems:
        service.jobs.update_stem(job_id, stem, "running", 0.0)
        for step in range(1, steps + 1):
            time.sleep(pause)
            service.jobs.update_stem(job_id, stem, "running", round(0.9 * step / steps, 4))
        service.jobs.update_stem(job_id, stem, "completed", 1.0, url=f"http://blob/{stem}.wav")
    service.jobs.finish(job_id, "completed", {"error": None})


def sse(response):
    """The stream's blocks as dicts (id, event, data parsed; comment and retry kept), as they come."""
    buffer = ""
    for chunk in response.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            item = {}
            for line in block.split("\n"):
                name, _, value = line.partition(":")
                item[name or "comment"] = value[1:] if value.startswith(" ") else value
            if "data" in item:
                item["data"] = json.loads(item["data"])
            yield item


def events_of(items):
    return [i for i in items if "event" in i]


def open_stream(client, job_id, **headers):
    r = client.get(f"/jobs/{job_id}/events", headers={**AUTH, **headers}, buffered=False)
    assert r.status_code == 200, r.get_data()
    return r


def summary(event):
    data = event["data"]
    return (event["event"], data.get("stem"), data["status"], data.get("progress"))


def test_a_finished_job_replays_every_event_in_order_and_ends(client, service):
    job_id = new_job(service)
    run_job(service, job_id, steps=3)
    r = open_stream(client, job_id)
    assert r.mimetype == "text/event-stream" and r.headers["Cache-Control"] == "no-cache"
    items = list(sse(r))  # the stream ends by itself
    assert items[0] == {"retry": "3000"}
    got = [summary(e) for e in events_of(items)]
    assert got == [("job", None, "queued", None), ("job", None, "running", None),
                   ("stem", "guitar", "running", 0.0), ("progress", "guitar", "running", 0.3),
                   ("progress", "guitar", "running", 0.6), ("progress", "guitar", "running", 0.9),
                   ("stem", "guitar", "completed", 1.0), ("stem", "bass", "running", 0.0),
                   ("progress", "bass", "running", 0.3), ("progress", "bass", "running", 0.6),
                   ("progress", "bass", "running", 0.9), ("stem", "bass", "completed", 1.0),
                   ("job", None, "completed", None)]
    assert events_of(items)[6]["data"]["url"] == "http://blob/guitar.wav"
    assert [e["id"] for e in events_of(items)] == [e.id for e in service.job_events(job_id)]


def test_live_events_arrive_and_the_stream_ends_after_the_final_state(app, client, service):
    job_id = new_job(service)
    r = open_stream(client, job_id)
    received, done = [], threading.Event()

    def read():
        for item in sse(r):
            received.append(item)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 5
    while not events_of(received) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [summary(e) for e in events_of(received)] == [("job", None, "queued", None)]
    time.sleep(0.2)  # nothing happens for a while: heartbeats
    run_job(service, job_id, pause=0.01)
    assert done.wait(10), received
    assert [e["id"] for e in events_of(received)] == [e.id for e in service.job_events(job_id)]
    assert events_of(received)[-1]["data"] == {"job_id": job_id, "status": "completed"}
    assert any(i.get("comment") == "keep-alive" for i in received)  # every 0.05 s while idle
    assert app.extensions["stemgen.event_hub"].watching() == 0


def test_last_event_id_resumes_after_that_event_without_repeats(client, service):
    job_id = new_job(service)
    run_job(service, job_id)
    stored = service.job_events(job_id)
    for cut in (0, 4, len(stored) - 2):
        items = events_of(sse(open_stream(client, job_id, **{"Last-Event-ID": stored[cut].id})))
        assert [e["id"] for e in items] == [e.id for e in stored[cut + 1:]]
    # Resuming after the final event: nothing more to say, the stream ends at once.
    assert events_of(sse(open_stream(client, job_id, **{"Last-Event-ID": stored[-1].id}))) == []


def test_heartbeats_while_nothing_happens(app, client, service):
    job_id = new_job(service)
    service.jobs.update_stem(job_id, "guitar", "running", 0.2)
    r = open_stream(client, job_id)
    stream = sse(r)
    items = [next(stream) for _ in range(8)]
    assert [summary(e) for e in events_of(items)] == [
        ("job", None, "queued", None), ("job", None, "running", None), ("stem", "guitar", "running", 0.2)]
    assert sum(i.get("comment") == "keep-alive" for i in items) == 8 - 1 - 3
    r.close()  # the client leaves
    assert app.extensions["stemgen.event_hub"].watching() == 0


def test_many_clients_joining_while_events_flow_each_get_every_event_once(app, service):
    jobs = [new_job(service, f"gen-{i}") for i in range(2)]
    results: dict[int, list] = {}

    def watch(n, job_id):
        time.sleep(random.uniform(0, 0.3))  # join at some point while the job runs
        results[n] = [e["id"] for e in events_of(sse(open_stream(app.test_client(), job_id)))]

    watchers = [threading.Thread(target=watch, args=(n, jobs[n % 2])) for n in range(8)]
    for w in watchers:
        w.start()
    writers = [threading.Thread(target=run_job, args=(service, job_id), kwargs={"steps": 40, "pause": 0.004})
               for job_id in jobs]
    for w in writers:
        w.start()
    for w in writers + watchers:
        w.join(20)
    for n in range(8):
        assert results[n] == [e.id for e in service.job_events(jobs[n % 2])], n
    assert app.extensions["stemgen.event_hub"].watching() == 0


def test_a_finished_job_without_stored_events_still_gets_its_final_state(client, service):
    job_id = new_job(service)
    service.jobs.finish(job_id, "failed", {"error": "guitar: boom"})
    service.jobs._redis.delete(service.jobs._events_key(job_id))  # e.g. a job from before events
    items = events_of(sse(open_stream(client, job_id)))
    assert [(e.get("id"), e["event"], e["data"]["status"]) for e in items] == [(None, "job", "failed")]


def test_the_stream_expires_with_the_job_is_capped_and_shortened_once_finished(service):
    job_id = new_job(service)
    key = service.jobs._events_key(job_id)
    assert abs(service.jobs._redis.ttl(key) - service.jobs._redis.ttl(service.jobs._job_key(job_id))) <= 1
    service.jobs._redis.delete(key)  # made again by the next write: with the job's remaining TTL
    service.jobs.update_stem(job_id, "guitar", "running", 0.1)
    assert 0 < service.jobs._redis.ttl(key) <= service.settings.job_ttl_seconds
    for step in range(1500):
        service.jobs.update_stem(job_id, "guitar", "running", step / 1500)
    assert service.jobs._redis.xlen(key) < 1200  # MAXLEN ~ 1000
    service.jobs.finish(job_id, "completed", {"error": None})
    assert 3500 < service.jobs._redis.ttl(key) <= EVENTS_KEEP_AFTER_FINISH_SECONDS  # not the week
    assert service.jobs._redis.ttl(service.jobs._job_key(job_id)) > EVENTS_KEEP_AFTER_FINISH_SECONDS


def test_auth_and_errors_are_those_of_get_job(client, service):
    job_id = new_job(service)
    assert client.get(f"/jobs/{job_id}/events").status_code == 401
    assert client.get(f"/jobs/{job_id}/events", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/jobs/" + "0" * 32 + "/events", headers=AUTH).status_code == 404
    assert client.get("/jobs/not-an-id/events", headers=AUTH).status_code == 404
    for bad in ("abc", "1-2-3", "-1-0", "1" * 21 + "-0"):
        r = client.get(f"/jobs/{job_id}/events", headers={**AUTH, "Last-Event-ID": bad})
        assert r.status_code == 422, bad
        assert r.json["error"]["fields"][0]["field"] == "Last-Event-ID"


def test_openapi_documents_both_routes(client):
    doc = client.get("/openapi.json").json
    events = doc["paths"]["/jobs/{job_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert {p["name"] for p in events["parameters"]} == {"job_id", "Last-Event-ID"}
    listing = doc["paths"]["/jobs"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"status", "generation_request_id", "limit", "cursor"}
    assert set(listing["responses"]) == {"200", "401", "422", "503"}
    assert "JobList" in doc["components"]["schemas"] and "StemEventData" in doc["components"]["schemas"]
