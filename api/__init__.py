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
    from api.errors import register_error_handlers
    from api.routes import generate_bp, health_bp, jobs_bp, openapi_bp

    settings = settings or load_settings()
    if service is None:
        from tasks.service import JobService

        service = JobService(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.extensions["stemgen.settings"] = settings
    app.extensions["stemgen.service"] = service
    for bp in (generate_bp, jobs_bp, health_bp, openapi_bp):
        app.register_blueprint(bp)
    register_error_handlers(app)
    return app
