"""The base model every stage starts from."""

from __future__ import annotations

from pydantic import Field

from doctune.config.base import Section


class ModelConfig(Section):
    """The model that is adapted to the documents."""

    base_model: str = Field(
        "bundled:smollm2-135m-instruct",
        description="bundled:<name>, a local model folder, or a hub id where a hub is reachable",
    )
