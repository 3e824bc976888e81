"""The gateway: a Flask application factory (``create_app``), served by gunicorn.

``gunicorn 'api:create_app()'`` serves it; tests build their own app with their own settings.
"""

from __future__ import annotations

import logging

from flask import Flask

from stemgen_settings import Settings, load_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, service=None) -> Flask:
    """Build the gateway.

    Args:
        settings: defaults to the environment's settings.
        service: the task-layer facade (``tasks.service.JobService``); tests may pass a fake.
    """
    from api import auth, metrics, studio
    from api.errors import register_error_handlers
    from api.routes import generate_bp, health_bp, jobs_bp, openapi_bp
    from tasks.callback_target import CallbackPolicy

    settings = settings or load_settings()
    policy = CallbackPolicy.from_settings(settings)
    if settings.default_callback_url:
        _check_default_callback_url(settings.default_callback_url, policy)
    if service is None:
        from tasks.service import JobService

        service = JobService(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.extensions["stemgen.settings"] = settings
    app.extensions["stemgen.service"] = service
    app.extensions["stemgen.callback_policy"] = policy
    for bp in (generate_bp, jobs_bp, health_bp, openapi_bp):
        app.register_blueprint(bp)
    studio.init_app(app)  # /studio, /docs and the security headers
    register_error_handlers(app)
    metrics.init_app(app, settings)  # first: its timing and log scope wrap auth's check too
    auth.init_app(app, settings.api_keys, settings.admin_keys)
    return app


def _check_default_callback_url(url: str, policy) -> None:
    """Refuse to start with a DEFAULT_CALLBACK_URL the SSRF guard would refuse; a host that does not
    resolve yet only warns (DNS may come up after the gateway)."""
    from tasks.callback_target import CallbackHostUnresolvable, UnsafeCallbackURL, check_url

    try:
        check_url(url, policy)
    except UnsafeCallbackURL as exc:
        raise ValueError(f"DEFAULT_CALLBACK_URL is not allowed: {exc}") from exc
    except CallbackHostUnresolvable as exc:
        log.warning("DEFAULT_CALLBACK_URL: %s", exc)
