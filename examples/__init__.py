"""Examples built on streamscore (import package ``streamscore_examples``, extra ``[demo]``).

``fraud``: card-transaction fraud scoring, the demo behind ``streamscore demo`` (``make demo``).
"""
