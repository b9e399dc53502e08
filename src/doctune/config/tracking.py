"""MLflow tracking: where runs, metrics, artifacts and the model registry live."""

from __future__ import annotations

from pydantic import Field

from doctune.config.base import Section


class TrackingConfig(Section):
    """Where runs and the registry are recorded, and whether unchanged stages reuse earlier results."""

    uri: str | None = Field(
        None, description="null: a sqlite store sqlite:///<workdir>/mlflow.db, no server needed; or http://mlflow:5000"
    )
    experiment: str | None = Field(None, description="null: project.name")
    reuse_stage_results: bool = Field(
        True, description="a stage with unchanged config, inputs and code reuses its earlier outputs"
    )
