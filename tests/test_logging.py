"""stemgen_logging: JSON and text lines with the job context, and secrets masked."""

import io
import json
import logging
import threading

import pytest

import stemgen_logging
from stemgen_logging import MASK, Redactor, configure_logging, secrets_from_settings
from stemgen_settings import load_settings

API_KEY = "key-6f1c0d9e8b7a4c3d2e1f"
OTHER_KEY = "key-0a1b2c3d4e5f60718293"
CALLBACK_SECRET = "cb-secret-9d8c7b6a5f4e"
ACCOUNT_KEY = "c2VjcmV0IGFjY291bnQga2V5IGZvciB0ZXN0cw+/=="
CONNECTION_STRING = (f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={ACCOUNT_KEY};"
                     "EndpointSuffix=core.windows.net")
SECRETS = (API_KEY, OTHER_KEY, CALLBACK_SECRET, ACCOUNT_KEY)


@pytest.fixture
def capture():
    """configure_logging into a buffer; the root logger is restored afterwards. Returns a function
    (log_format) -> (buffer, settings)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stemgen_logging.end_scope()

    def setup(log_format="json", **overrides):
        settings = load_settings(log_format=log_format, stemgen_api_keys=f"{API_KEY},{OTHER_KEY}",
                                 callback_secret=CALLBACK_SECRET,
                                 azure_storage_connection_string=CONNECTION_STRING, **overrides)
        buffer = io.StringIO()
        for handler in root.handlers[:]:  # pytest's capture handlers would see the records too
            root.removeHandler(handler)
        configure_logging(settings, "worker", stream=buffer)
        return buffer, settings

    yield setup
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logging.captureWarnings(False)
    stemgen_logging.end_scope()


def lines(buffer) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line]


def test_json_line_carries_the_job_context_and_duration(capture):
    buffer, _ = capture("json")
    log = logging.getLogger("tasks.stem_tasks")
    token = stemgen_logging.scope(job_id="j1", stem="bass", task="stemgen.generate_stem",
                                  task_id="t-1", generation_request_id="gen-1")
    log.info("stem %s of job %s done", "bass", "j1")
    stemgen_logging.bind(generation_request_id="gen-2")  # bind adds to (and overrides in) the scope
    log.warning("again", extra={"stem": "drums"})  # extra wins over the scope
    stemgen_logging.end_scope(token)
    log.info("no job")
    first, second, third = lines(buffer)
    assert first["message"] == "stem bass of job j1 done"
    assert first["level"] == "INFO" and first["logger"] == "tasks.stem_tasks"
    assert first["component"] == "worker" and isinstance(first["process"], int)
    assert first["timestamp"].endswith("+00:00")
    assert {k: first[k] for k in ("job_id", "generation_request_id", "stem", "task", "task_id")} == {
        "job_id": "j1", "generation_request_id": "gen-1", "stem": "bass",
        "task": "stemgen.generate_stem", "task_id": "t-1"}
    assert isinstance(first["duration_seconds"], float) and first["duration_seconds"] >= 0
    assert second["level"] == "WARNING" and second["stem"] == "drums"
    assert second["generation_request_id"] == "gen-2"
    assert "job_id" not in third and "duration_seconds" not in third


def test_exceptions_are_one_json_line_with_the_traceback(capture):
    buffer, _ = capture("json")
    try:
        raise RuntimeError(f"upload failed with key {ACCOUNT_KEY}")
    except RuntimeError:
        logging.getLogger("x").exception("stem failed")
    (line,) = lines(buffer)
    assert "RuntimeError" in line["exc_info"] and ACCOUNT_KEY not in line["exc_info"]


def test_log_context_is_per_thread_and_ends_with_its_block(capture):
    buffer, _ = capture("json")
    log = logging.getLogger("x")
    seen = threading.Event()

    def other():
        log.info("other thread")
        seen.set()

    with stemgen_logging.log_context(job_id="j9"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        log.info("inside")
    log.info("outside")
    by_message = {line["message"]: line for line in lines(buffer)}
    assert seen.is_set()
    assert by_message["inside"]["job_id"] == "j9"
    assert "job_id" not in by_message["other thread"] and "job_id" not in by_message["outside"]


def test_text_lines_append_the_context(capture):
    buffer, _ = capture("text")
    log = logging.getLogger("api.metrics")
    with stemgen_logging.log_context(job_id="j2", route="/generate"):
        log.info("job %s accepted", "j2")
    log.info("plain")
    first, second = buffer.getvalue().splitlines()
    assert " INFO [worker] api.metrics: job j2 accepted [job_id=j2 route=/generate duration_seconds=" in first
    assert second.endswith("api.metrics: plain")


def test_configuring_again_replaces_the_handler(capture):
    buffer, settings = capture("json")
    configure_logging(settings, "worker", stream=buffer)
    logging.getLogger("x").info("once")
    assert len(lines(buffer)) == 1


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_never_reach_a_line(capture, log_format):
    buffer, _ = capture(log_format)
    log = logging.getLogger("tasks.callbacks")
    sas_url = "https://acct.blob.core.windows.net/stems/gen-1/bass.wav?se=2030-01-01&sp=r&sv=2024&sr=b&sig=Zm9vYmFyYmF6%2Bqux%3D"
    log.info("keys %s and %s", API_KEY, OTHER_KEY)
    log.info("signed with %s", CALLBACK_SECRET)
    log.info("stored at %s", sas_url)
    log.info("connection %s", CONNECTION_STRING)
    log.info("headers %s", {"Authorization": f"Bearer {API_KEY}", "X-API-Key": OTHER_KEY})
    log.info("headers: Authorization: Bearer sometoken123 X-API-Key: other456")
    log.info("broker redis://:hunter2-password@redis:6379/0")
    log.info("result %s", {"url": sas_url}, extra={"payload": {"secret": CALLBACK_SECRET}})
    text = buffer.getvalue()
    for secret in (*SECRETS, "Zm9vYmFyYmF6", "sometoken123", "other456", "hunter2-password"):
        assert secret not in text
    assert "sig=" + MASK in text and "AccountKey=" + MASK in text and "Bearer " + MASK in text
    assert "redis://:" + MASK + "@redis:6379/0" in text
    # what is not secret stays readable
    assert "https://acct.blob.core.windows.net/stems/gen-1/bass.wav?se=2030-01-01&sp=r" in text
    if log_format == "json":
        assert all(json.loads(line) for line in text.splitlines())


def test_redactor_masks_json_escaped_secrets_and_ignores_tiny_ones():
    secret = 'q"uote\\back'
    redactor = Redactor([secret, "ab"])
    assert redactor(json.dumps({"k": secret})) == '{"k": "***"}'
    assert redactor("ab cab") == "ab cab"  # too short to mask as text without masking words


def test_secrets_from_settings():
    settings = load_settings(stemgen_api_keys=f"{API_KEY}, {OTHER_KEY}", callback_secret=CALLBACK_SECRET,
                             azure_storage_connection_string=CONNECTION_STRING + ";SharedAccessSignature=sv=1&sig=abc")
    assert set(secrets_from_settings(settings)) == {API_KEY, OTHER_KEY, CALLBACK_SECRET, ACCOUNT_KEY,
                                                    "sv=1&sig=abc"}
