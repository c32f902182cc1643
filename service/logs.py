"""JSON logs with the request id of the request being served (a context variable set by the middleware)."""

from __future__ import annotations

import contextvars
import logging

from pythonjsonlogger.json import JsonFormatter

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Root logging to stderr: one JSON object per line (or plain text), each with `request_id`."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    fmt = "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s"
    handler.setFormatter(JsonFormatter(fmt, rename_fields={"levelname": "level", "asctime": "time"})
                         if json_lines else logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
