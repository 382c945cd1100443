"""Kafka side: topic naming, the wire format's Python side, the worker's Faust app, the client SDK."""
