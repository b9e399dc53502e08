"""Ingest on the real PDFs in ../shared/corpus."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pymupdf
import pytest

from doctune.config import IngestConfig
from doctune.ingest.clean import PAGE_SEPARATOR, is_page_number
from doctune.ingest.pdf import tesseract_available
from doctune.ingest.stage import IngestError, ingest_folder


def _ingest(folder: Path, tokenizer_dir: Path, **settings) -> object:
    config = IngestConfig(pdfs=folder, **settings)
    return ingest_folder(folder, config, tokenizer_dir / "tokenizer.json", progress=False)


@pytest.fixture(scope="module")
def corpus_result(corpus, tiny_tokenizer_dir):
    return _ingest(corpus, tiny_tokenizer_dir)


def _pages(result, source):
    return [p for p in result.pages if p["source"] == source]


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{3,}", text.lower())}


def test_every_corpus_file_is_ingested(corpus_result, corpus):
    rows = {row["source"]: row for row in corpus_result.files}
    assert set(rows) == {p.name for p in corpus.glob("*.pdf")}
    assert rows["gri.pdf"]["pages"] == 285
    assert all(row["lang"] == "en" for row in rows.values() if row["chunks"])
    assert {c["lang"] for c in corpus_result.chunks} == {"en"}  # each chunk's passage label is in its language


def test_gri_running_headers_and_page_numbers_are_removed(corpus_result, corpus):
    with pymupdf.open(corpus / "gri.pdf") as doc:
        printed = {
            i + 1: page.get_text("blocks", sort=True)[0][4].split("\n")[0]
            for i, page in enumerate(doc)
            if page.get_text().strip()
        }
    printed = {page: line for page, line in printed.items() if is_page_number(line)}
    assert len(printed) > 150  # gri prints its page number at the top of most pages
    pages = {p["page"]: p["text"].split("\n") for p in _pages(corpus_result, "gri.pdf") if p["text"]}
    left = [(n, printed[n]) for n, lines in pages.items() if n in printed and printed[n] in (lines[0], lines[-1])]
    assert not left, f"printed page numbers left at page edges: {left[:5]}"
    # "Gri" heads most even pages, "Chapter N: ..." many odd ones; neither may survive at a page top.
    tops = [lines[0] for lines in pages.values()]
    assert "Gri" not in tops
    assert not [t for t in tops if re.match(r"Chapter \d+: ", t)]
    # ...while the body text is still there.
    assert any("Box plots were invented by Tukey" in "\n".join(lines) for lines in pages.values())


def test_hyphenation_and_ligatures_are_repaired(corpus_result):
    gri = "\n".join(p["text"] for p in _pages(corpus_result, "gri.pdf"))
    assert "nonparametric statistics" in gri
    camlidl = "\n".join(p["text"] for p in _pages(corpus_result, "camlidl-1.04.doc.pdf"))
    assert "\ufb01" not in camlidl and "identifiers" in camlidl


def test_scanned_pages_are_ocrd_or_flagged(corpus_result):
    scanned = _pages(corpus_result, "freefem-scanned-pages.pdf")
    assert len(scanned) == 4
    if not tesseract_available():
        assert all(p["flags"] == ["image_only"] and not p["text"] for p in scanned)
        return
    assert all("ocr" in p["flags"] and p["text"] for p in scanned)
    reference = _words(" ".join(p["text"] for p in _pages(corpus_result, "freefem.pdf")[3:7]))
    ocr_words = _words(" ".join(p["text"] for p in scanned))
    assert len(ocr_words & reference) / len(ocr_words) >= 0.9


def test_scanned_pages_without_ocr_are_flagged_and_reported(tmp_path, corpus, tiny_tokenizer_dir):
    shutil.copy(corpus / "freefem-scanned-pages.pdf", tmp_path)
    shutil.copy(corpus / "camlidl-1.04.doc.pdf", tmp_path)
    result = _ingest(tmp_path, tiny_tokenizer_dir, ocr="never")
    scanned = _pages(result, "freefem-scanned-pages.pdf")
    assert [p["flags"] for p in scanned] == [["image_only"]] * 4
    row = next(r for r in result.files if r["source"] == "freefem-scanned-pages.pdf")
    assert row["status"] == "skipped"
    assert "4 image_only" in row["reason"] and "OCR disabled" in row["reason"]


def test_live_manual_empty_pages_are_flagged_not_chunked(corpus_result, corpus):
    pages = _pages(corpus_result, "live-manual.portrait.en.a4.pdf")
    with pymupdf.open(corpus / "live-manual.portrait.en.a4.pdf") as doc:
        blank = {i + 1 for i, page in enumerate(doc) if not page.get_text().strip()}
    assert len(blank) > 30
    flagged = {p["page"] for p in pages if "empty" in p["flags"]}
    assert blank <= flagged
    doc_id = pages[0]["doc_id"]
    # Empty pages hold no text, so no chunk can start or end on one.
    chunked_pages = {n for c in corpus_result.chunks if c["doc_id"] == doc_id for n in (c["page_start"], c["page_end"])}
    assert chunked_pages and not chunked_pages & flagged


def _doc_texts(result) -> dict[str, str]:
    texts: dict[str, list[str]] = {}
    for page in sorted(result.pages, key=lambda p: (p["doc_id"], p["page"])):
        if page["text"]:
            texts.setdefault(page["doc_id"], []).append(page["text"])
    return {doc_id: PAGE_SEPARATOR.join(parts) for doc_id, parts in texts.items()}


@pytest.mark.parametrize("mode", ["sections", "tokens"])
def test_every_chunk_is_an_exact_slice_of_its_document(corpus, tiny_tokenizer_dir, corpus_result, mode):
    result = (
        corpus_result if mode == "sections" else _ingest(corpus, tiny_tokenizer_dir, ocr="never", chunking={"mode": "tokens"})
    )
    texts = _doc_texts(result)
    size = IngestConfig().chunking.size
    assert len(result.chunks) > 500
    for chunk in result.chunks:
        assert texts[chunk["doc_id"]][chunk["char_start"] : chunk["char_end"]] == chunk["text"], chunk["chunk_id"]
        assert 0 < chunk["n_tokens"] <= size
        assert chunk["page_start"] <= chunk["page_end"]
    assert len({c["chunk_id"] for c in result.chunks}) == len(result.chunks)


def test_section_chunks_carry_section_titles(corpus_result):
    gri_id = _pages(corpus_result, "gri.pdf")[0]["doc_id"]
    sections = {c["section"] for c in corpus_result.chunks if c["doc_id"] == gri_id}
    assert "Box plots" in sections
    titled = [c for c in corpus_result.chunks if c["section"]]
    assert len(titled) > 0.8 * len(corpus_result.chunks)


def test_bad_files_are_reported_while_good_ones_succeed(tmp_path, corpus, tiny_tokenizer_dir):
    good = (corpus / "camlidl-1.04.doc.pdf").read_bytes()
    (tmp_path / "good.pdf").write_bytes(good)
    (tmp_path / "second-copy.PDF").write_bytes(good)
    (tmp_path / "zero.pdf").write_bytes(b"")
    (tmp_path / "truncated.pdf").write_bytes(good[: len(good) * 4 // 10])
    (tmp_path / "page.pdf").write_text("<!DOCTYPE html><html><body>Not found</body></html>")
    (tmp_path / "garbage.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(4096))
    with pymupdf.open(corpus / "sample-plain.pdf") as doc:
        doc.save(tmp_path / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner")

    result = _ingest(tmp_path, tiny_tokenizer_dir)
    rows = {row["source"]: row for row in result.files}
    assert len(rows) == 7
    assert rows["good.pdf"]["status"] == "ok" and rows["good.pdf"]["chunks"] > 0
    expected = {
        "second-copy.PDF": ("duplicate", "same content as good.pdf"),
        "zero.pdf": ("skipped", "empty file (0 bytes)"),
        "truncated.pdf": ("skipped", "truncated"),
        "page.pdf": ("skipped", "not a PDF"),
        "garbage.pdf": ("skipped", "cannot be opened"),
        "locked.pdf": ("skipped", "encrypted"),
    }
    for source, (status, reason) in expected.items():
        assert rows[source]["status"] == status, source
        assert reason in rows[source]["reason"], (source, rows[source]["reason"])
    assert {c["doc_id"] for c in result.chunks} == {rows["good.pdf"]["doc_id"]}


def test_a_folder_without_usable_documents_is_an_error(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "a.pdf").write_bytes(b"")
    result = _ingest(tmp_path, tiny_tokenizer_dir)
    assert result.summary["documents"] == 0
    with pytest.raises(IngestError, match="no \\*.pdf files"):
        _ingest(tmp_path / "nothing-here", tiny_tokenizer_dir) if (tmp_path / "nothing-here").mkdir() is None else None


def test_one_and_two_workers_give_identical_output(small_corpus, tiny_tokenizer_dir):
    one = _ingest(small_corpus, tiny_tokenizer_dir, workers=1)
    two = _ingest(small_corpus, tiny_tokenizer_dir, workers=2)
    assert one.pages == two.pages and one.chunks == two.chunks and one.files == two.files


def test_a_document_whose_processing_fails_is_skipped_with_the_reason(small_corpus, tiny_tokenizer_dir, monkeypatch):
    from doctune.ingest import stage

    original = stage.clean_document

    def broken(probe, raw, config):
        if probe.source == "sample-plain.pdf":
            raise ValueError("unexpected layout")
        return original(probe, raw, config)

    monkeypatch.setattr(stage, "clean_document", broken)
    result = _ingest(small_corpus, tiny_tokenizer_dir, workers=1)
    rows = {row["source"]: row for row in result.files}
    assert rows["sample-plain.pdf"]["status"] == "skipped"
    assert rows["sample-plain.pdf"]["reason"] == "clean step failed: ValueError: unexpected layout"
    assert rows["camlidl-1.04.doc.pdf"]["status"] == "ok" and result.chunks
