"""Synth: questions, answers, preference pairs and eval sets from the chunks; retrieval, teachers and replay."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from doctune.config.base import Section, absolute


class RetrievalConfig(Section):
    """How contexts are retrieved: shared by the RAG training data and the eval, so both see the same."""

    embedding_model: str = Field(
        "bundled:all-minilm-l6-v2", description="bundled:<name>, a sentence-transformers folder, or a hub id"
    )
    mode: Literal["auto", "dense", "lexical", "hybrid"] = Field(
        "auto",
        description="dense (embeddings), lexical (BM25), hybrid (reciprocal rank fusion of both); auto: dense when the "
        "embedding model covers every language of the corpus (the bundled one: English), else hybrid",
    )
    top_k: int = Field(
        2, ge=1, le=32,
        description="passages per context: two 384-token passages fit sft.max_length whole, four were cut",
    )  # fmt: skip


class EndpointConfig(Section):
    """An OpenAI-compatible chat API (vLLM, TGI, llama.cpp server, ...)."""

    base_url: str = Field("http://127.0.0.1:8080/v1", description="the API's base URL, up to /v1")
    model: str = Field("default", description="model name sent with each request")
    api_key_env: str = Field("DOCTUNE_TEACHER_API_KEY", description="environment variable holding the key; never logged")
    max_concurrency: int = Field(4, ge=1, le=256, description="requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="seconds per request")
    max_retries: int = Field(3, ge=0, le=10, description="retries of a failed or malformed request")
    temperature: float = Field(0.2, ge=0, le=2, description="sampling temperature of the teacher")
    max_tokens: int = Field(768, ge=16, description="tokens per teacher reply")
    response_format: Literal["json_object", "json_schema", "none"] = Field(
        "json_object", description="json_object (+ schema: llama.cpp, vLLM), json_schema (OpenAI structured outputs), none"
    )


class LocalTeacherConfig(Section):
    """A transformers model in this process writes the questions and answers."""

    model: str = Field("bundled:smollm2-135m-instruct", description="bundled:<name>, a local model folder, or a hub id")
    max_new_tokens: int = Field(384, ge=16, description="tokens per teacher reply")


class ReplayConfig(Section):
    """General text mixed into CPT (and chats into SFT) against forgetting."""

    share: float = Field(0.2, ge=0, lt=1, description="share of CPT characters that is replay text")
    dataset: Path | None = Field(
        None, description='a JSONL/Parquet dataset with a "text" column; null: the base model\'s own answers to shipped prompts'
    )
    max_new_tokens: int = Field(160, ge=8, description="tokens per base-model reply")
    temperature: float = Field(
        1.0, ge=0, le=2,
        description="sampling temperature of the base model's replies; 0 = greedy. Sampled replies follow the model's own "
        "distribution, so training on them keeps it; greedy ones sharpened the bundled model (general ppl 1.14x base)",
    )  # fmt: skip
    batch_size: int = Field(64, ge=1, description="prompts generated together (decoding is what costs: larger is faster)")
    max_prompts: int = Field(0, ge=0, description="use the first N shipped prompts; 0 = all")
    sft_share: float = Field(
        0.1, ge=0, lt=0.5,
        description="share of SFT training examples that are rehearsal chats (shipped prompts only), verified JSON "
        "replies and general replies taking turns until the JSON ones run out: without them SFT cost the bundled "
        "model 16% of its probe accuracy; 10% of general replies alone cut golden F1 0.240 -> 0.190",
    )  # fmt: skip

    @field_validator("dataset")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return absolute(value)


class DedupConfig(Section):
    """Near-duplicate questions are dropped: MinHash on shingles, then embedding similarity."""

    minhash_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity of question shingles")
    minhash_permutations: int = Field(64, ge=16, le=512, description="MinHash permutations (precision vs time)")
    embedding_threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity of question embeddings")


class SynthConfig(Section):
    """Training data (CPT texts, SFT chats, DPO pairs) and eval sets (golden, unanswerable, held-out text)."""

    teacher: Literal["extractive", "endpoint", "local"] = Field(
        "extractive",
        description="extractive (no model, deterministic), endpoint (OpenAI-compatible API), local (transformers)",
    )
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig, description="teacher: endpoint")
    local: LocalTeacherConfig = Field(default_factory=LocalTeacherConfig, description="teacher: local")
    min_questions: int = Field(3, ge=1, le=8, description="per chunk, asked of LLM teachers")
    max_questions: int = Field(8, ge=1, le=16, description="per chunk, asked of LLM teachers")
    split_by: Literal["chunk", "document"] = Field(
        "chunk", description="chunk or document: eval items never share one with training items"
    )
    eval_fraction: float = Field(
        0.15,
        gt=0,
        lt=0.5,
        description="least share of chunks (or documents) held out for eval sets; more are taken "
        "until the eval questions reach min_golden",
    )
    min_golden: int = Field(
        100,
        ge=0,
        description="answerable eval questions wanted: eval chunks are added (up to max_eval_fraction) until their "
        "questions reach it, so a small corpus still gives the gate's tests their power",
    )
    max_eval_fraction: float = Field(
        0.5, gt=0, lt=0.8, description="most share of the chunks (or documents), and of the questions, the eval sets take"
    )
    specificity_k: int = Field(
        5,
        ge=1,
        le=50,
        description="a question is kept when, asked alone, it retrieves a chunk holding its answer among the top k "
        "(questions too vague to be asked out of their passage are dropped)",
    )
    validation_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of training chunks for validation splits")
    heldout_fraction: float = Field(
        0.05, gt=0, lt=0.5,
        description="share of training chunks held out of all training (CPT text, SFT/DPO questions and contexts; at "
        "least one): perplexity before and after (CPT, quantize, gate)",
    )  # fmt: skip
    abstention_share: float = Field(0.175, ge=0.15, le=0.2, description="share of SFT examples that abstain")
    rag_share: float = Field(0.8, ge=0, le=1, description="share of answerable SFT examples with retrieved context")
    citations: bool = Field(
        True,
        description="answers with retrieved context end with the numbers of the passages that hold their evidence "
        "(`... 40 psi. [2]`); abstentions and closed-book answers cite nothing",
    )  # fmt: skip
    unanswerable_share: float = Field(
        0.65, gt=0, lt=1,
        description="share of held-out questions drawn to be asked without their answer in context; an open question "
        "(what a section or subject is about) whose subject the remaining context still names is golden instead",
    )  # fmt: skip
    judge: bool = Field(False, description="pairwise-judge DPO pairs through the endpoint, both orders")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="near-duplicate removal")
    ngram: int = Field(8, ge=4, le=32, description="n for the golden/training contamination check")
    max_contamination: float = Field(0.0, ge=0, le=1, description="the stage fails above this share of contaminated eval items")
    languages: list[str] | None = Field(
        None,
        description="document languages to generate from (ISO 639-1 codes); null: every language the corpus "
        "holds. Documents in other languages, or in a language the teacher cannot handle, are listed in the report",
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="general text against forgetting")
    seed: int = Field(13, description="seed of the splits and of sampling")

    @model_validator(mode="after")
    def _eval_range(self) -> SynthConfig:
        if self.eval_fraction > self.max_eval_fraction:
            raise ValueError(f"eval_fraction ({self.eval_fraction}) must not exceed max_eval_fraction ({self.max_eval_fraction})")
        return self

    @model_validator(mode="after")
    def _question_range(self) -> SynthConfig:
        if self.min_questions > self.max_questions:
            raise ValueError(f"min_questions ({self.min_questions}) must not exceed max_questions ({self.max_questions})")
        return self
