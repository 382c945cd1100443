"""The fast path: batch decode of requests, feature assembly, prediction encode.

The compiled module (``_fast``, Cython) and its pure-Python twin (``_pure``) have one API; this is the one
place that picks between them. ``STREAMSCORE_PUREPYTHON=1`` (or true/yes/on) forces the twin; ``0``, ``false``,
``no``, ``off`` and empty mean compiled. Any other value is an error, so a typo cannot silently pick one.
A compiled module that fails to import is an error too, unless the twin was asked for: no silent fallback.
"""

from __future__ import annotations

import os

from ._types import (
    ERROR_KINDS,
    NO_DEADLINE,
    DecodedBatch,
    DecodeError,
    DecodeSpec,
    FastPath,
    InputColumn,
    PredictionBatch,
    RequestFeature,
    ViewBlock,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def parse_flag(name: str, raw: str | None) -> bool:
    """Parse a boolean environment flag strictly: a value that is neither true nor false is an error."""
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean: use 1/true/yes/on or 0/false/no/off")


PUREPYTHON = parse_flag("STREAMSCORE_PUREPYTHON", os.environ.get("STREAMSCORE_PUREPYTHON"))

impl: FastPath
"""The module in use. Typed as the protocol before either twin is picked (as aiokafka's record classes are), so
mypy checks both assignments below: each twin's signatures (``_pure.py``, ``_fast.pyi``) against ``FastPath``."""
if PUREPYTHON:
    from . import _pure

    impl = _pure
else:
    try:
        from . import _fast
    except ImportError as exc:  # pragma: no cover - exercised by a broken install
        raise ImportError(
            "the compiled fast path (streamscore.fastpath._fast) is not built: reinstall with "
            "`pip install -e .` (needs a C compiler), or set STREAMSCORE_PUREPYTHON=1 to run the pure-Python twin"
        ) from exc
    impl = _fast

IMPLEMENTATION: str = "pure" if PUREPYTHON else "compiled"
decode_batch = impl.decode_batch
assemble = impl.assemble
encode_predictions = impl.encode_predictions

__all__ = [
    "ERROR_KINDS",
    "IMPLEMENTATION",
    "NO_DEADLINE",
    "PUREPYTHON",
    "DecodeError",
    "DecodeSpec",
    "DecodedBatch",
    "FastPath",
    "InputColumn",
    "PredictionBatch",
    "RequestFeature",
    "ViewBlock",
    "assemble",
    "decode_batch",
    "encode_predictions",
]
