"""structlog setup: JSON lines when not on a terminal (journald), readable text on one."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import msgspec

# structlog loads rich, when it is installed (textual brings it), for pretty tracebacks that
# lockerd does not use (format_exc_info renders them as plain text): about 25 ms of every
# lockerd start and a few MiB of the daemon's memory. rich is hidden while structlog is
# imported and available again right after, for the simulator's UI.
_HIDE_RICH = "rich" not in sys.modules
if _HIDE_RICH:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if _HIDE_RICH:
        del sys.modules["rich"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# Keys that must never reach a log line: the plain code a customer typed, a token, a secret.
_SECRET_KEYS = frozenset({"code", "plain_code", "token", "code_key", "private_key", "secret"})


def _drop_secrets(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _SECRET_KEYS & event_dict.keys():
        event_dict[key] = "<redacted>"
    return event_dict


# msgspec writes a log line in about half the time of json.dumps; an object it cannot encode
# is written as its repr, as structlog's own fallback does.
_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def _dumps(obj: Any, **_: Any) -> str:
    return _ENCODER.encode(obj).decode("utf-8")


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for the process. `fmt` is auto, json or console."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    # Libraries log through the standard library; only their errors are worth a line.
    logging.getLogger("lockerd.mqtt.client").setLevel(logging.ERROR)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write and flush per line (what PrintLogger does, without print's own overhead).
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
