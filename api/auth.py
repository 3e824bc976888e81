"""API keys: who may call the gateway.

Keys come from ``STEMGEN_API_KEYS`` (comma-separated, so a key can be rotated by listing old and new
for a while). A caller sends one as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The
presented key is compared with every configured key, each comparison constant-time
(``hmac.compare_digest`` over SHA-256 digests, so neither the matching key nor the key lengths show
in the timing). Without configured keys the API is open and a warning is logged at start-up.

Each job belongs to the key that submitted it, by the key's identifier (``key_id``: a hash of the
key, never the key): a key lists, reads, follows and cancels only its own jobs (another key's job
is a 404, as an unknown id), and its ``generation_request_id`` claims are its own. Keys in
``STEMGEN_ADMIN_KEYS`` are accepted as well and see every job (``job_scope``). Without configured
keys every caller sees every job, as before keys existed.

``python -m api.auth`` prints the identifier of a key read from standard input (the prefix of that
key's source songs in SOURCE_AUDIO_CONTAINER, docs/api.md).

Open without a key: ``/health/live`` and ``/health/ready`` (orchestrator probes carry no secrets;
``/health/ready`` then answers only ok/unavailable, without error details) and ``/openapi.json``
(the contract is public, as in docs/api.md), and the pages ``/studio`` and ``/docs`` with their
static files (api.studio: what they show comes through the API, with a key). Everything else, unknown paths included, needs a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from flask import Flask, g, request

from api.errors import ApiError

log = logging.getLogger(__name__)

#: Endpoints (blueprint.function) answered without a key.
OPEN_ENDPOINTS = frozenset({"health.live", "health.ready", "openapi.openapi",
                            # the pages and their static files (api.studio): they hold no data
                            "studio.page", "studio.asset", "docs.page", "docs.asset"})

#: Shorter keys are accepted but logged as weak at start-up.
MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_matches(presented: str, digests: list[bytes]) -> bool:
    """Whether ``presented`` is one of the keys whose SHA-256 digests are ``digests``; every digest
    is compared (no early exit), each in constant time."""
    return matching_digest(presented, digests) is not None


def matching_digest(presented: str, digests: list[bytes]) -> bytes | None:
    """The digest in ``digests`` that ``presented`` matches, or None; every digest is compared (no
    early exit), each in constant time."""
    candidate = _digest(presented)
    matched = None
    for digest in digests:
        if hmac.compare_digest(candidate, digest):
            matched = digest
    return matched


def key_id(digest: bytes) -> str:
    """The identifier stored with the jobs a key submits: 16 hex digits of a SHA-256 over the key's
    digest, with a label of its own, so the stored value is not the digest that authenticates."""
    return hashlib.sha256(b"stemgen job owner\0" + digest).hexdigest()[:16]


def key_id_of(key: str) -> str:
    """The identifier (``key_id``) of an API key given in clear."""
    return key_id(_digest(key))


def caller_key_id() -> str:
    """The identifier of the key this request authenticated with ("" when the API is open)."""
    return str(g.get("stemgen_key_id", ""))


def job_scope() -> str | None:
    """Whose jobs this request may see: the caller's key identifier, or None for every job (an
    admin key, or an open API)."""
    if g.get("stemgen_sees_all", False):
        return None
    return caller_key_id()


def presented_keys() -> list[str]:
    """The keys this request presents (Authorization: Bearer, X-API-Key)."""
    keys = []
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        keys.append(credentials.strip())
    if request.headers.get("X-API-Key", "").strip():
        keys.append(request.headers["X-API-Key"].strip())
    return keys


def authenticated() -> bool:
    """Whether the current request carries a valid key (always True when the API is open)."""
    return bool(g.get("stemgen_authenticated", False))


def init_app(app: Flask, api_keys: list[str], admin_keys: list[str] = ()) -> None:
    """Require one of ``api_keys`` or ``admin_keys`` on every endpoint but OPEN_ENDPOINTS (none:
    the API is open); an admin key sees every job."""
    admin_digests = [_digest(key) for key in admin_keys]
    digests = [_digest(key) for key in api_keys] + admin_digests
    if not digests:
        log.warning("STEMGEN_API_KEYS is empty: the API accepts requests from anyone")
    elif any(len(key) < MIN_KEY_LENGTH for key in api_keys):
        log.warning("some STEMGEN_API_KEYS are shorter than %d characters", MIN_KEY_LENGTH)

    @app.before_request
    def _require_key():
        if not digests:
            g.stemgen_authenticated = g.stemgen_sees_all = True
            return None
        matched = next((digest for digest in (matching_digest(key, digests)
                                              for key in presented_keys()) if digest), None)
        g.stemgen_authenticated = matched is not None
        g.stemgen_key_id = key_id(matched) if matched is not None else ""
        g.stemgen_sees_all = matched is not None and any(
            hmac.compare_digest(matched, digest) for digest in admin_digests)
        if g.stemgen_authenticated or request.endpoint in OPEN_ENDPOINTS:
            return None
        raise ApiError(401, "unauthorized",
                       "a valid API key is required (Authorization: Bearer <key>, or X-API-Key)",
                       [{"field": "Authorization", "message": "missing or invalid API key",
                         "type": "authentication"}],
                       headers={"WWW-Authenticate": 'Bearer realm="stemgen"'})


if __name__ == "__main__":  # python -m api.auth < key: the key's identifier
    import sys

    print(key_id_of(sys.stdin.readline().strip()))
