"""What every config section shares: pydantic settings that reject unknown keys, and the error type."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key path."""


class Section(BaseModel):
    """One section (or sub-section) of the run config: every key has a default and a description."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def absolute(value: Path | None) -> Path | None:
    """Relative paths resolve against the working directory at load time and are stored absolute."""
    return value.expanduser().resolve() if value is not None else None
