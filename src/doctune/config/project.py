"""The project: its name and where local state lives."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from doctune.config.base import Section, absolute


class ProjectConfig(Section):
    """Names the MLflow experiment and registered model, and holds local state."""

    name: str = Field("doctune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="experiment and registered-model name")
    workdir: Path = Field(
        Path(".doctune"), description="local state: the sqlite tracking store, artifacts, model and fetch caches"
    )

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return absolute(value)
