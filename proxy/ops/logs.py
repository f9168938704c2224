"""Log set-up: key=value lines for a terminal, or JSON lines for collectors.

Fields passed through `extra=` (breaker, from_state, to_state, …) appear in both forms.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f)}


def _quote(value: object) -> str:
    """A value on one line: control characters (CR, LF, …) escaped, so nothing a client sent
    (a path, a header) can start a line of its own in the log."""
    text = str(value).translate(_CONTROL)
    return f'"{text}"' if (" " in text or not text) else text


_ONE_LINE = {code: f"\\x{code:02x}" for code in (0x0a, 0x0d)}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = record.getMessage().translate(_ONE_LINE)
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {record.name}: {message}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_quote(v)}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {"at": record.created, "level": record.levelname, "logger": record.name,
                    "message": record.getMessage(), **_extras(record)}
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
