"""Log lines of the gateway and the workers: text or JSON (``LOG_FORMAT``), the job's ids on every
line of its path, and secrets masked.

- **Context.** ``scope(**fields)`` opens a scope (a gateway request, a Celery task) and ``bind``
  adds to it; both are ``contextvars``, so they follow a gevent greenlet (gateway) or a pool thread
  (worker) and do not leak into other requests. ``ContextFilter`` copies the scope's fields onto
  every record (``job_id``, ``generation_request_id``, ``stem``, ``task_id``, ``task``, the
  gateway's ``method``/``route``) and adds ``duration_seconds``: seconds since the scope opened
  (on a task's last line, the task's run time). Fields passed with ``extra=`` win.
- **Format.** ``json``: one JSON object a line (python-json-logger) with ``timestamp`` (UTC, ISO
  8601), ``level``, ``logger``, ``message``, ``component`` (gateway/worker), ``process``, the
  context fields and any ``extra``; ``exc_info`` holds a traceback. ``text``: one readable line,
  the context fields appended as ``[job_id=… stem=…]``.
- **Redaction.** ``Redactor`` masks the configured secrets (API keys, the callback secret, the
  storage account key) wherever they appear, and by pattern: SAS signatures (``sig=``),
  ``AccountKey=``/``SharedAccessSignature=`` in connection strings, ``Bearer`` credentials and
  passwords in URLs (``redis://:pw@host``). ``RedactingFilter`` masks a record's message and
  arguments; the formatters mask their whole output again (tracebacks, ``extra`` values).

``configure_logging(settings, component)`` installs one handler on the root logger; the gateway
calls it from deploy/gunicorn.conf.py (which also restyles gunicorn's own loggers), a worker from
Celery's ``setup_logging`` signal (tasks.worker).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import time
from typing import Iterable, Iterator

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

#: Context fields in the order text lines show them.
CONTEXT_FIELDS = ("job_id", "generation_request_id", "stem", "task", "task_id", "method", "route")
MASK = "***"

_STARTED = "_started"
_context: contextvars.ContextVar[dict | None] = contextvars.ContextVar("stemgen_log_context",
                                                                      default=None)


# --- context -------------------------------------------------------------------------------------

def scope(**fields) -> contextvars.Token:
    """Open a new scope (forgetting the current one) with ``fields``; its start is the zero of
    ``duration_seconds``. Returns the token for ``end_scope``."""
    return _context.set({**_clean(fields), _STARTED: time.perf_counter()})


def end_scope(token: contextvars.Token | None = None) -> None:
    """Close a scope: back to the one before ``token``'s, or to none."""
    if token is not None:
        try:
            _context.reset(token)
            return
        except ValueError:  # made in another context (another greenlet/thread): just clear
            pass
    _context.set(None)


def bind(**fields) -> None:
    """Add ``fields`` (None values are skipped) to the current scope (opening one if none is
    open)."""
    current = _context.get()
    if current is None:
        scope(**fields)
    else:
        _context.set({**current, **_clean(fields)})


@contextlib.contextmanager
def log_context(**fields) -> Iterator[None]:
    """``fields`` bound for the ``with`` block only (within the current scope)."""
    current = _context.get()
    token = _context.set({**(current or {_STARTED: time.perf_counter()}), **_clean(fields)})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict:
    """The fields bound now (without the scope's start)."""
    return {k: v for k, v in (_context.get() or {}).items() if k != _STARTED}


def _clean(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


class ContextFilter(logging.Filter):
    """Copies the scope's fields and ``duration_seconds`` onto each record (``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        if context:
            for key, value in context.items():
                if key == _STARTED:
                    if not hasattr(record, "duration_seconds"):
                        record.duration_seconds = round(time.perf_counter() - value, 4)
                elif not hasattr(record, key):
                    setattr(record, key, value)
        return True


# --- redaction -----------------------------------------------------------------------------------

#: (trigger, pattern, replacement): a pattern runs only on text whose lower case holds its trigger
#: (a substring test is much cheaper than the case-insensitive regular expression).
_PATTERNS = (
    # SAS tokens: the signature (and only it) of a query string or connection string
    ("sig=", re.compile(r"(?i)(\bsig=)[^&\s\"'<>;,]+"), r"\1" + MASK),
    ("accountkey=", re.compile(r"(?i)(\bAccountKey=)[^;\s\"'<>]+"), r"\1" + MASK),
    ("sharedaccesssignature=", re.compile(r"(?i)(\bSharedAccessSignature=)[^;\s\"'<>]+"),
     r"\1" + MASK),
    # credentials in headers as they may be dumped: "Authorization: Bearer x", "X-API-Key: x"
    ("bearer", re.compile(r"(?i)(\bBearer\s+)[^\s\"',;]+"), r"\1" + MASK),
    ("x-api-key", re.compile(r"(?i)(\bx-api-key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"), r"\1" + MASK),
    # a password in a URL: scheme://user:password@host
    ("@", re.compile(r"([a-z][a-z0-9+.\-]*://[^:/@\s\"']*:)[^@\s\"'/]+@"), r"\1" + MASK + "@"),
)

#: Literal secrets shorter than this are not masked as text (they would mask ordinary words); the
#: API refuses nothing, but warns about keys under 16 characters (api.auth).
MIN_SECRET_LENGTH = 4


class Redactor:
    """Masks ``secrets`` (literal strings, also as they appear JSON-escaped) and the patterns above."""

    def __init__(self, secrets: Iterable[str] = ()):
        literals = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_LENGTH:
                literals.add(secret)
                literals.add(json.dumps(secret)[1:-1])  # as it appears inside a JSON string
        self._literals = sorted(literals, key=len, reverse=True)  # a longer one may hold a shorter

    def __call__(self, text: str) -> str:
        for secret in self._literals:
            if secret in text:
                text = text.replace(secret, MASK)
        lower = text.lower()
        for trigger, pattern, replacement in _PATTERNS:
            if trigger in lower:
                text = pattern.sub(replacement, text)
        return text


def secrets_from_settings(settings) -> list[str]:
    """The secrets of ``settings`` that must never be logged: the API keys, the callback secret,
    the storage account key and SAS of the connection string."""
    secrets = list(settings.api_keys)
    if settings.callback_secret:
        secrets.append(settings.callback_secret)
    for part in settings.azure_storage_connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() in ("accountkey", "sharedaccesssignature") and value:
            secrets.append(value.strip())
    return secrets


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message and arguments (the message is rendered first)."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format/args pair: logging reports it when formatting
            return True
        record.msg, record.args = self.redactor(message), None
        return True


# --- formatters ----------------------------------------------------------------------------------

class JsonFormatter(_JsonFormatter):
    """One JSON object a line; the whole line passes the redactor."""

    def __init__(self, redactor: Redactor | None = None, component: str = ""):
        super().__init__("{levelname}{name}{message}{process}", style="{", timestamp=True,
                         rename_fields={"levelname": "level", "name": "logger"},
                         static_fields={"component": component} if component else None,
                         json_ensure_ascii=False)
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(super().format(record))


class TextFormatter(logging.Formatter):
    """``time level logger: message [job_id=… stem=… duration_seconds=…]``; redacted."""

    def __init__(self, redactor: Redactor | None = None, component: str = ""):
        prefix = f"[{component}] " if component else ""
        super().__init__(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS if hasattr(record, key)]
        if hasattr(record, "duration_seconds") and fields:
            fields.append(f"duration_seconds={record.duration_seconds}")
        if fields:
            head, sep, tail = text.partition("\n")  # after the message, before a traceback
            text = f"{head} [{' '.join(fields)}]{sep}{tail}"
        return self.redactor(text)


def make_formatter(fmt: str, redactor: Redactor, component: str = "") -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(redactor, component)
    if fmt == "text":
        return TextFormatter(redactor, component)
    raise ValueError(f"unknown log format {fmt!r} (text or json)")


def style_handler(handler: logging.Handler, fmt: str, redactor: Redactor, component: str = "") -> None:
    """Give ``handler`` stemgen's formatter and filters (once)."""
    handler.setFormatter(make_formatter(fmt, redactor, component))
    for old in [f for f in handler.filters if isinstance(f, (ContextFilter, RedactingFilter))]:
        handler.removeFilter(old)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter(redactor))


def configure_logging(settings, component: str = "", *, level: str | int | None = None,
                      stream=None, loggers: Iterable[logging.Logger] = (),
                      capture_warnings: bool = True) -> logging.Handler:
    """Log through one stemgen handler on the root logger (to stderr unless ``stream``), in
    ``settings.log_format`` at ``level`` (default ``settings.log_level``), with the job context and
    ``settings``' secrets masked; Python warnings become log lines too (``capture_warnings``). The
    handlers of ``loggers`` (e.g. gunicorn's, which do not propagate) get the same formatter and
    filters. Calling it again replaces the handler. Returns the root handler."""
    redactor = Redactor(secrets_from_settings(settings))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_stemgen", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._stemgen = True
    style_handler(handler, settings.log_format, redactor, component)
    root.addHandler(handler)
    root.setLevel(level if level is not None else settings.log_level)
    logging.captureWarnings(capture_warnings)
    for logger in loggers:
        for other in logger.handlers:
            style_handler(other, settings.log_format, redactor, component)
    # The Azure SDK logs every request's headers at INFO (SAS included): keep logs about our work.
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
    return handler
