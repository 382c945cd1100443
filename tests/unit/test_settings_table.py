"""README's settings table is the one the settings model generates: it cannot drift."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from streamscore.settings import TABLE_BEGIN, TABLE_END, Settings, settings_table

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_table_is_the_generated_one() -> None:
    text = README.read_text()
    assert TABLE_BEGIN in text and TABLE_END in text, "README.md lost its settings table markers"
    in_readme = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].lstrip("\n")
    assert in_readme == settings_table(), (
        "README.md's settings table is out of date: run `.venv/bin/streamscore settings --write README.md`")


def _leaves(prefix: str, fields: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for name, field in fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            yield from _leaves(f"{prefix}{name.upper()}__", section.model_fields)
        else:
            yield f"{prefix}{name.upper()}", field


def test_every_setting_is_documented_and_listed() -> None:
    table = settings_table()
    leaves = list(_leaves("STREAMSCORE_", Settings.model_fields))
    for variable, field in leaves:
        assert field.description, f"{variable} has no docstring"
        assert f"| `{variable}` |" in table
    assert "STREAMSCORE_STACK__CLUSTER__KAFKA_PORTS" in dict(leaves), "a nested section's settings are listed"
    for tls in ("KAFKA__SSL_CAFILE", "KAFKA__SSL_CERTFILE", "CASSANDRA__SSL_KEYFILE", "REDIS__SSL_CAFILE",
                "REDIS__PASSWORD_FILE", "KAFKA__SASL_PASSWORD_FILE"):
        assert f"`STREAMSCORE_{tls}`" in table
