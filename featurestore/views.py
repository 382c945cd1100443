"""Feature views: what a model can join to a request by an entity key.

Declared in a JSON file::

    {"views": [
      {"name": "card_stats", "entity": "card_id", "ttl_s": 604800,
       "description": "rolling statistics of a card",
       "features": [{"name": "txn_count_24h", "type": "int", "default": 0}, ...]}
    ]}

Every feature is typed (``float``, ``int`` or ``bool``) and has a default, used when the entity is unknown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


class ViewsError(ValueError):
    """A feature view file that cannot be used; the message says what and where."""


class Feature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """Column name: lower-case letters, digits and '_', starting with a letter."""
    type: Literal["float", "int", "bool"] = "float"
    """Stored as CQL double, bigint or boolean; handed to the model as float32."""
    default: float = 0.0
    """Value used when the entity has no row (or the row expired)."""
    description: str = ""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not _NAME.match(name) or name in ("entity", "event_ts"):
            raise ValueError(f"feature name {name!r} must match {_NAME.pattern} and not be 'entity'/'event_ts'")
        return name

    @property
    def cql_type(self) -> str:
        return {"float": "double", "int": "bigint", "bool": "boolean"}[self.type]


class FeatureView(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    """View name; its Cassandra table is ``view_<name>``."""
    entity: str
    """The join key in a request's ``entities`` map, e.g. ``card_id``."""
    features: tuple[Feature, ...] = Field(min_length=1)
    ttl_s: int | None = None
    """Rows are written ``USING TTL`` this many seconds; None keeps them until overwritten."""
    description: str = ""

    @field_validator("name", "entity")
    @classmethod
    def _valid_identifier(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} must match {_NAME.pattern}")
        return name

    @model_validator(mode="after")
    def _unique_features(self) -> FeatureView:
        names = [feature.name for feature in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"view {self.name!r} declares a feature twice: {names}")
        return self

    @property
    def table(self) -> str:
        return f"view_{self.name}"

    @property
    def feature_names(self) -> list[str]:
        return [feature.name for feature in self.features]

    @property
    def defaults(self) -> list[float]:
        return [feature.default for feature in self.features]


class _ViewsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    views: list[FeatureView]


def parse_views(document: dict) -> dict[str, FeatureView]:
    try:
        views = _ViewsFile.model_validate(document).views
    except ValidationError as exc:
        raise ViewsError(f"invalid feature views: {exc}") from exc
    by_name = {view.name: view for view in views}
    if len(by_name) != len(views):
        raise ViewsError("two feature views share a name")
    return by_name


def load_views(path: Path) -> dict[str, FeatureView]:
    """Read and validate a views file; errors name the file and the field."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ViewsError(f"feature views file {path} does not exist: create it or set STREAMSCORE_VIEWS_FILE") from None
    except json.JSONDecodeError as exc:
        raise ViewsError(f"feature views file {path} is not valid JSON: {exc}") from exc
    try:
        return parse_views(document)
    except ViewsError as exc:
        raise ViewsError(f"{path}: {exc}") from exc


def dump_views(views: list[FeatureView], path: Path) -> None:
    Path(path).write_text(json.dumps({"views": [view.model_dump() for view in views]}, indent=2) + "\n")
