"""Retriever: the embedding model fine-tuned on the synthetic (question, source chunk) pairs, compared with ranx."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from doctune.config.base import Section

RETRIEVERS = ("base", "tuned", "bm25", "hybrid")
RANKING_METRICS = ("mrr@10", "recall@1", "recall@5", "recall@10", "ndcg@10")


class RetrieverConfig(Section):
    """Fine-tunes `retrieval.embedding_model` with MultipleNegativesRankingLoss on the SFT training questions and their
    source chunks, with mined hard negatives; the golden questions compare base, tuned, BM25 and hybrid."""

    enabled: bool = Field(
        True,
        description="run the retriever stage (off: the gate compares the base embedder with BM25; serving retrieves nothing)",
    )
    epochs: float = Field(3.0, gt=0, le=50, description="passes over the training pairs")
    batch_size: int = Field(
        32, ge=2, le=1024, description="pairs per batch: every other passage of the batch is an in-batch negative"
    )
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="AdamW learning rate")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps the learning rate warms up over")
    hard_negatives: int = Field(
        1, ge=0, le=16,
        description="mined negatives per pair: chunks the base retriever ranks high that do not hold the answer",
    )  # fmt: skip
    mining_depth: int = Field(
        30,
        ge=2,
        le=1000,
        description="how deep in the base ranking hard negatives are looked for (the source chunk itself is passed over)",
    )
    max_seq_length: int = Field(256, ge=16, le=8192, description="tokens of a passage the embedder reads")
    matryoshka_dims: list[int] = Field(
        [], description="train nested embedding sizes with MatryoshkaLoss (e.g. [384, 128, 64]); empty: off"
    )
    select: Literal["best", "base", "tuned", "bm25", "hybrid"] = Field(
        "best",
        description="the retriever whose index the stage hands on; best: highest `select_metric` on the SFT validation "
        "questions (on the golden ones where fewer than 10)",
    )
    select_metric: Literal[RANKING_METRICS] = Field(
        "mrr@10",
        description="the metric `select: best` ranks by: a context holds retrieval.top_k passages, so the first ranks count",
    )
    seed: int = Field(13, description="seed of the batch order")

    @field_validator("matryoshka_dims")
    @classmethod
    def _descending(cls, dims: list[int]) -> list[int]:
        if any(d <= 0 for d in dims) or dims != sorted(set(dims), reverse=True):
            raise ValueError("matryoshka_dims must be distinct positive sizes, largest first")
        return dims
