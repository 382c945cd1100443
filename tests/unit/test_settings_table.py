"""README's settings table is the one the settings model generates: it cannot drift."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from streamscore.settings import TABLE_BEGIN, TABLE_END, Settings, settings_table

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_table_is_the_generated_one() -> None:
    text = README.read_text()
    assert TABLE_BEGIN in text and TABLE_END in text, "README.md lost its settings table markers"
    in_readme = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].lstrip("\n")
    assert in_readme == settings_table(), (
        "README.md's settings table is out of date: run `.venv/bin/streamscore settings --write README.md`")


def test_every_setting_is_documented_and_listed() -> None:
    table = settings_table()
    for name, field in Settings.model_fields.items():
        section = field.annotation
        fields = section.model_fields if isinstance(section, type) and issubclass(section, BaseModel) else {"": field}
        for inner, inner_field in fields.items():
            variable = f"STREAMSCORE_{name.upper()}" + (f"__{inner.upper()}" if inner else "")
            assert inner_field.description, f"{variable} has no docstring"
            assert f"| `{variable}` |" in table
    for tls in ("KAFKA__SSL_CAFILE", "KAFKA__SSL_CERTFILE", "CASSANDRA__SSL_KEYFILE", "REDIS__SSL_CAFILE",
                "REDIS__PASSWORD_FILE", "KAFKA__SASL_PASSWORD_FILE"):
        assert f"`STREAMSCORE_{tls}`" in table
