"""The callback to the backend: body, signature, and one delivery attempt.

Signature (webhook practice as in Stripe's and Standard Webhooks' schemes): with a secret configured,
``X-Stemgen-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`` where ``timestamp``
is the ``X-Stemgen-Timestamp`` header (Unix seconds) and ``body`` the exact request bytes. The
receiver recomputes it, compares in constant time, and rejects old timestamps (replays).
``X-Stemgen-Event-Id`` is stable across retries of one callback, for the receiver's de-duplication.
Retries with backoff are Celery's (see tasks.callback_delivery.deliver_callback), not a loop here.

Where a callback may go is tasks.callback_target's business (the SSRF guard); redirects are not
followed (a 3xx is a refusal), so an allowed URL cannot bounce the POST to a private address.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import time
from urllib.parse import urlsplit

import requests

from tasks import metrics
from tasks.callback_target import (
    CallbackHostUnresolvable,
    CallbackPolicy,
    UnsafeCallbackURL,
    check_url,
    guarded_session,
)

SIGNATURE_HEADER = "X-Stemgen-Signature"
TIMESTAMP_HEADER = "X-Stemgen-Timestamp"
EVENT_ID_HEADER = "X-Stemgen-Event-Id"
USER_AGENT = "stemgen-callback/1"

log = logging.getLogger(__name__)


class CallbackError(RuntimeError):
    """The callback was not accepted and must not be retried (4xx other than 408/429)."""


class CallbackRetryableError(CallbackError):
    """The callback failed in a way worth retrying (connection error, timeout, 5xx, 408, 429)."""


class CallbackRefused(CallbackError):
    """The callback URL is not allowed (tasks.callback_target); nothing was sent."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` HMAC-SHA256 of ``"{timestamp}.".encode() + body`` under ``secret``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *,
           tolerance_seconds: float = 300, now: float | None = None) -> bool:
    """Receiver-side check of a signed callback (constant-time compare, replay window)."""
    try:
        age = abs((now if now is not None else time.time()) - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance_seconds and hmac.compare_digest(sign(secret, timestamp, body), signature)


def encode_body(payload: dict) -> bytes:
    """The exact bytes sent (and signed)."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def _instrumented(post):
    """Count each attempt by outcome (tasks.metrics) and log the answer of a successful one."""

    @functools.wraps(post)
    def attempt(url: str, *args, **kwargs) -> int:
        started, outcome = time.perf_counter(), "error"
        try:
            status = post(url, *args, **kwargs)
            outcome = "success"
            log.info("callback to %s answered HTTP %d in %.3fs", urlsplit(url).hostname, status,
                     time.perf_counter() - started)
            return status
        except CallbackRetryableError:
            outcome = "retryable"
            raise
        except CallbackRefused:
            outcome = "refused"
            raise
        except CallbackError:
            outcome = "rejected"
            raise
        finally:
            metrics.callback_attempt(outcome, time.perf_counter() - started)

    return attempt


@_instrumented
def post_callback(url: str, payload: dict, *, event_id: str, secret: str = "",
                  timeout_seconds: float = 10.0, connect_timeout_seconds: float | None = None,
                  policy: CallbackPolicy | None = None, session: requests.Session | None = None) -> int:
    """POST one callback. Returns the HTTP status on 2xx.

    Args:
        timeout_seconds: read timeout (and connect timeout unless ``connect_timeout_seconds``).
        policy: the SSRF guard: the URL is checked now and the connected address again; None sends
            anywhere (tests, trusted URLs).

    Raises:
        CallbackRetryableError: connection error, timeout, DNS failure, 5xx, 408 or 429.
        CallbackRefused: the policy does not allow the URL or the address it connected to.
        CallbackError: any other non-2xx answer, 3xx included (the receiver rejected the body;
            retrying won't help).
    """
    if policy is not None:
        try:
            check_url(url, policy)
        except CallbackHostUnresolvable as exc:
            raise CallbackRetryableError(str(exc)) from exc
        except UnsafeCallbackURL as exc:
            raise CallbackRefused(str(exc)) from exc
    own_session = session is None and policy is not None
    http = guarded_session(policy) if own_session else (session or requests)
    body = encode_body(payload)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               EVENT_ID_HEADER: event_id, TIMESTAMP_HEADER: timestamp}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
    timeout = (connect_timeout_seconds or timeout_seconds, timeout_seconds)
    try:
        # stream: only the status line and headers are read; the receiver's body is not our business.
        with http.post(url, data=body, headers=headers, timeout=timeout, allow_redirects=False,
                       stream=True) as response:
            status = response.status_code
    except UnsafeCallbackURL as exc:
        raise CallbackRefused(str(exc)) from exc
    except requests.RequestException as exc:
        raise CallbackRetryableError(f"callback to {url} failed: {exc.__class__.__name__}: {exc}") from exc
    finally:
        if own_session:
            http.close()
    if 200 <= status < 300:
        return status
    message = f"callback to {url} answered HTTP {status}"
    if status >= 500 or status in (408, 429):
        raise CallbackRetryableError(message)
    raise CallbackError(message)
