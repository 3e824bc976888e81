"""Callback signing and delivery against a real HTTP receiver on loopback."""

import time

import pytest

from tasks.callbacks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    CallbackError,
    CallbackRetryableError,
    encode_body,
    post_callback,
    sign,
    verify,
)
from tests.harness import CallbackReceiver, free_port


def test_signature_round_trip_and_tamper():
    body = encode_body({"status": "completed"})
    ts = str(int(time.time()))
    sig = sign("s3cret", ts, body)
    assert sig.startswith("sha256=")
    assert verify("s3cret", ts, body, sig)
    assert not verify("other", ts, body, sig)
    assert not verify("s3cret", ts, body + b" ", sig)
    assert not verify("s3cret", str(int(ts) - 3600), body, sign("s3cret", str(int(ts) - 3600), body))
    assert not verify("s3cret", "not-a-time", body, sig)


def test_post_signed_callback():
    with CallbackReceiver() as receiver:
        status = post_callback(receiver.url, {"status": "completed"}, event_id="job1", secret="k")
        assert status == 200
        got = receiver.wait(5)
    assert got["json"] == {"status": "completed"}
    headers = got["headers"]
    assert headers[EVENT_ID_HEADER] == "job1"
    assert verify("k", headers[TIMESTAMP_HEADER], got["raw"], headers[SIGNATURE_HEADER])


def test_unsigned_without_secret():
    with CallbackReceiver() as receiver:
        post_callback(receiver.url, {"a": 1}, event_id="e")
        assert SIGNATURE_HEADER not in receiver.wait(5)["headers"]


@pytest.mark.parametrize("code, error", [(500, CallbackRetryableError), (503, CallbackRetryableError),
                                         (429, CallbackRetryableError), (400, CallbackError),
                                         (404, CallbackError)])
def test_status_classification(code, error):
    with CallbackReceiver(status_codes=[code]) as receiver:
        with pytest.raises(error):
            post_callback(receiver.url, {"a": 1}, event_id="e")


def test_connection_refused_is_retryable():
    with pytest.raises(CallbackRetryableError):
        post_callback(f"http://127.0.0.1:{free_port()}/cb", {"a": 1}, event_id="e", timeout_seconds=2)
