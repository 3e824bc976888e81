"""The gateway's pages: ``/studio`` (request, follow, play and download stems in a browser) and
``/docs`` (Swagger UI over ``/openapi.json``), with the security headers they are sent with.

Everything the pages load comes from the package: the studio's own files in ``api/static/studio``
and Swagger UI's in ``api/static/vendor/swagger-ui`` (the npm package ``swagger-ui-dist``, copied
there by ``make install``; see the Makefile's ``SWAGGER_UI`` target). Nothing comes from a CDN.

The pages and their assets are open (they hold no data); what the studio does goes through the
API with the caller's key in a header. The studio reads a finished stem's audio through
``GET /studio/audio/<job_id>/<stem>`` (authenticated like ``GET /jobs/<id>``), which relays the
blob from storage: the page then needs no CORS rule on the blob service and its CSP names no
origin but its own.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, jsonify, request, send_from_directory

from api.auth import job_scope
from api.errors import ApiError

STATIC = Path(__file__).resolve().parent / "static"
STUDIO_DIR = STATIC / "studio"
SWAGGER_UI_DIR = STATIC / "vendor" / "swagger-ui"
DOCS_DIR = STATIC / "docs"

#: Swagger UI's files the docs page loads.
SWAGGER_UI_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")

studio_bp = Blueprint("studio", __name__)
docs_bp = Blueprint("docs", __name__)

_COMMON_CSP = ("default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
               "object-src 'none'")
#: The studio: its own scripts and styles, and the API through fetch (stem audio included: Web
#: Audio decodes what fetch read, so no media element loads anything; downloads are blob: links).
STUDIO_CSP = (f"{_COMMON_CSP}; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'")
#: Swagger UI: its bundle and our initializer, its stylesheet; it fetches /openapi.json and, with
#: "Try it out", the API (same origin); its icons are data: URIs.
DOCS_CSP = (f"{_COMMON_CSP}; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'")

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _settings():
    return current_app.extensions["stemgen.settings"]


def _service():
    return current_app.extensions["stemgen.service"]


@studio_bp.get("/studio")
def page():
    """The studio's page (a static file; the script does the rest)."""
    return send_from_directory(STUDIO_DIR, "index.html", max_age=0)


@studio_bp.get("/studio/assets/<path:name>")
def asset(name: str):
    """The studio's scripts, styles and icons."""
    return send_from_directory(STUDIO_DIR, name, max_age=0)


@studio_bp.get("/studio/config")
def config():
    """What the request form offers that only the deployment knows: the served models (the first
    is the default), the longest duration, the beats in a bar (to turn bars into seconds)."""
    settings = _settings()
    return jsonify({"models": settings.served_models,
                    "max_duration_seconds": settings.max_duration_seconds,
                    "beats_per_bar": settings.beats_per_bar})


@studio_bp.get("/studio/audio/<job_id>/<stem>")
def audio(job_id: str, stem: str):
    """A finished stem's file, relayed from blob storage in chunks (404 for a stem that is not
    finished or whose blob is gone, or another API key's job)."""
    if len(job_id) > 64 or not job_id.isalnum() or not job_id.isascii():
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    job = _service().get(job_id, job_scope())
    result = next((s for s in job["stems"] if s["stem"] == stem), None)
    if result is None:
        raise ApiError(404, "not_found", f"job {job_id!r} has no stem {stem!r}")
    if result.get("status") != "completed" or not result.get("blob_name"):
        raise ApiError(404, "not_found", f"stem {stem!r} of job {job_id!r} is {result.get('status')}, "
                                         "not completed")
    reader = _service().open_stem_audio(result["blob_name"])
    if reader is None:
        raise ApiError(404, "not_found", f"the file of stem {stem!r} is no longer stored")
    extension = result.get("format") or result["blob_name"].rsplit(".", 1)[-1]
    filename = f"{job['generation_request_id']}-{stem}.{extension}"
    response = Response(reader.chunks, mimetype=reader.content_type)
    response.headers["Content-Length"] = str(reader.size)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


def docs_page():
    """Swagger UI rendering ``/openapi.json``."""
    missing = [name for name in SWAGGER_UI_FILES if not (SWAGGER_UI_DIR / name).is_file()]
    if missing:
        raise ApiError(503, "docs_not_installed",
                       "Swagger UI is not installed here (make install copies it from npm's "
                       f"swagger-ui-dist into {SWAGGER_UI_DIR}); the contract is at /openapi.json")
    return send_from_directory(DOCS_DIR, "index.html", max_age=0)


docs_bp.add_url_rule("/docs", endpoint="page", view_func=docs_page)


def docs_asset(name: str):
    """Swagger UI's files (vendored) and the page's initializer."""
    if name in SWAGGER_UI_FILES:
        return send_from_directory(SWAGGER_UI_DIR, name, max_age=3600)
    return send_from_directory(DOCS_DIR, name, max_age=0)


docs_bp.add_url_rule("/docs/assets/<path:name>", endpoint="asset", view_func=docs_asset)


def _security_headers(response: Response) -> Response:
    """Headers for every answer (nosniff, no referrer); the pages' CSP on the pages and assets."""
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    endpoint = request.endpoint or ""
    if endpoint.startswith("studio."):
        response.headers.setdefault("Content-Security-Policy", STUDIO_CSP)
    elif endpoint.startswith("docs."):
        response.headers.setdefault("Content-Security-Policy", DOCS_CSP)
    return response


def init_app(app: Flask) -> None:
    """Register the pages and the security headers of every answer."""
    app.register_blueprint(studio_bp)
    app.register_blueprint(docs_bp)
    app.after_request(_security_headers)
