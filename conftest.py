"""Shared fixtures: the real PDF corpus, a tiny locally trained tokenizer, configs in a temp workdir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from doctune.config import build_config

REPO = Path(__file__).resolve().parent
CORPUS = (REPO.parent / "shared" / "corpus").resolve()


@pytest.fixture(scope="session")
def corpus() -> Path:
    assert CORPUS.is_dir(), f"the shared corpus is expected at {CORPUS}"
    return CORPUS


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, corpus) -> Path:
    """A byte-level BPE tokenizer trained in a second on a few pages: a stand-in for a model's tokenizer."""
    import pymupdf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    with pymupdf.open(corpus / "camlidl-1.04.doc.pdf") as doc:
        text = [doc[i].get_text() for i in range(6)]
    tokenizer.train_from_iterator(text, trainer=trainer)
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture
def make_config(tmp_path, tiny_tokenizer_dir, corpus):
    """Build a RunConfig in a fresh workdir with the tiny tokenizer; extra keys as dotted overrides."""

    def factory(pdfs: Path | None = None, **overrides: object):
        data = {
            "project": {"workdir": str(tmp_path / "work")},
            "model": {"base_model": str(tiny_tokenizer_dir)},
            "ingest": {"pdfs": str(pdfs or corpus)},
        }
        return build_config(data, [f"{key}={value}" for key, value in overrides.items()])

    return factory


@pytest.fixture
def small_corpus(tmp_path, corpus) -> Path:
    """Two short real PDFs: enough for pipeline plumbing tests in seconds."""
    folder = tmp_path / "pdfs"
    folder.mkdir()
    for name in ("camlidl-1.04.doc.pdf", "sample-plain.pdf"):
        (folder / name).write_bytes((corpus / name).read_bytes())
    return folder
