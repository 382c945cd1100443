"""Type stub of the compiled fast path (``_fast.pyx``): the same functions as the twin, ``_types.FastPath``."""

from collections.abc import Sequence

import numpy as np

from ._types import DecodedBatch, DecodeSpec, InputColumn, PredictionBatch, ViewBlock

def decode_batch(messages: Sequence[bytes | None], spec: DecodeSpec) -> DecodedBatch:
    """Decode raw request messages (single requests or msgpack arrays of them) into columns.

    Never raises for a message: each bad message (or bad element of a batch message) becomes one DecodeError.
    """

def assemble(
    request_features: np.ndarray,
    blocks: Sequence[ViewBlock],
    columns: Sequence[InputColumn],
) -> np.ndarray:
    """Build the float32 (n x inputs) model input in the manifest's column order."""

def encode_predictions(batch: PredictionBatch, sent_ms: int) -> list[bytes]:
    """One msgpack map per prediction, keys in the documented order: the bytes ``msgpack.packb`` gives."""
