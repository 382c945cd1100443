"""One log format for every line a process writes: streamscore's, Faust's and the libraries' (``log_format``).

``text`` is one readable line per record; ``json`` one JSON object per line, for log collectors. The worker
hands the same configuration to Faust (``logging_config``), which otherwise installs its own colored format.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "message": ..., "exc": ...}``, one object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` configuration: one stderr handler in the chosen format at ``level``."""
    formatter: dict[str, Any] = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"streamscore": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "streamscore",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
    }


def setup_logging(level: str, log_format: str) -> None:
    logging.config.dictConfig(logging_config(level, log_format))
