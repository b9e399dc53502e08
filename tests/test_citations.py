"""Citations: passage labels, cited training answers, and citation precision/recall on hand-built answers."""

from collections import Counter

from doctune.citations import (
    chunk_passage,
    cite,
    cited_numbers,
    document_title,
    strip_citations,
    supporting_passages,
)
from doctune.config import SynthConfig
from doctune.gate.evaluate import citation_precision, citation_scores
from doctune.gate.metrics import token_f1
from doctune.retrieval import ChunkIndex
from doctune.synth.build import Builder
from doctune.synth.extractive import QA

EVIDENCE = "The relief valve opens at 40 psi during normal operation."


def test_passages_carry_the_document_title_and_pages():
    chunk = {"chunk_id": "d-0001", "doc_id": "d", "title": "Pump Manual", "page_start": 12, "page_end": 13, "text": "x"}
    assert chunk_passage(chunk) == "Pump Manual, pp. 12–13\nx"
    assert chunk_passage({**chunk, "page_end": 12}) == "Pump Manual, p. 12\nx"
    # Chunks ingested before titles existed: the file name where known, else no label (a digest tells nobody).
    assert chunk_passage({**chunk, "title": None, "source": "manuals/pump_v2.pdf", "page_end": 12}).startswith("pump v2, p. 12")
    assert chunk_passage({**chunk, "title": None}) == "x"
    # In the document's language, as ingest detected it; English's where no abbreviation is known.
    assert chunk_passage({**chunk, "lang": "de"}) == "Pump Manual, S. 12–13\nx"
    assert chunk_passage({**chunk, "lang": "es", "page_end": 12}) == "Pump Manual, pág. 12\nx"
    assert chunk_passage({**chunk, "lang": "es"}) == "Pump Manual, págs. 12–13\nx"
    assert chunk_passage({**chunk, "lang": "und"}) == "Pump Manual, pp. 12–13\nx"
    # Synth labels as the gate and serving will: from the chunks file, whatever language the teacher writes in.
    assert chunk_passage({**chunk, "lang": "de", "label_lang": "en"}) == "Pump Manual, pp. 12–13\nx"
    for generated in ("Microsoft Word - draft7.docx", "Microsoft PowerPoint - deck", "Document1", "untitled", "a.pdf"):
        assert document_title(generated, "sub/field_guide.pdf") == "field guide"
    assert document_title("  La FAQ  Debian ", "x.pdf") == "La FAQ Debian"
    assert document_title("Untitled Goose Game Manual", "x.pdf") == "Untitled Goose Game Manual"


def test_only_the_markers_an_answer_ends_with_are_citations():
    assert cited_numbers("It opens at 40 psi. [2][7]", 5) == {2}  # [7]: no such passage
    assert cited_numbers("It opens at 40 psi [1][3].", 5) == {1, 3}
    # The documents' own brackets are text: a reference, an index.
    assert cited_numbers(cite("Limits are given in [1] and x[2].", [3]), 3) == {3}
    assert strip_citations(cite("Limits are given in [1].", [2])) == "Limits are given in [1]."
    assert strip_citations("40 psi [1][3].") == "40 psi."
    assert token_f1(strip_citations("40 psi [1]"), "40 psi") == 1.0


def test_citation_precision_and_recall_on_hand_built_answers():
    items = [
        {"context": ["a", "b", "c"], "supporting": [2]},
        {"context": ["a", "b", "c"], "supporting": [1, 3]},  # the answer's paragraph appears twice
        {"context": ["a", "b", "c"], "supporting": [3]},
        {"context": ["a", "b", "c"], "supporting": [1]},
    ]
    replies = ["40 psi [2]", "In the cellar. [3]", "Blue. [1][3]", "I cannot answer that."]
    per_example = citation_scores(replies, items)
    assert per_example["citations_made"] == [1, 1, 2, 0]
    assert per_example["source_cited"] == [1, 1, 1, 0]
    assert citation_precision(per_example) == 3 / 4  # [1] of item 3 does not hold its answer
    assert citation_precision(citation_scores(["no markers"], items[:1])) == 0.0


def test_the_passages_that_support_an_answer_are_its_source_and_exact_copies_of_its_evidence():
    ids = ["a", "b", "c"]
    texts = ["Unrelated text.", f"Copied:  {EVIDENCE.lower()}", "Also 40 psi."]
    assert supporting_passages(ids, texts, ["c"], EVIDENCE) == [2, 3]
    assert supporting_passages(ids, texts, ["a"], "40 psi") == [1]  # a short span is found by chance: not evidence


def test_training_answers_cite_the_passages_that_hold_their_evidence_and_abstentions_cite_nothing(tmp_path):
    texts = [
        EVIDENCE,
        "The drain plug sits under the motor housing.",
        "Replace the filter cartridge every six months.",
        "The display shows error E4 when the tank is empty.",
        "Wear gloves when handling the coolant.",
    ]
    chunks = [
        {"chunk_id": f"d-{i:04d}", "doc_id": "d", "title": "Pump Manual", "page_start": i + 1, "page_end": i + 1, "text": t}
        for i, t in enumerate(texts)
    ]
    config = SynthConfig(rag_share=1.0, seed=3)
    index = ChunkIndex(texts, "bundled:all-minilm-l6-v2", tmp_path, mode="lexical")
    builder = Builder(config, chunks, index, 3, Counter())
    builder.split = {c["chunk_id"]: "train" for c in chunks}
    qa = QA("When does the relief valve open?", "At 40 psi.", "d-0000", "fact", evidence=EVIDENCE)
    (record,), abstaining = builder.sft_records([qa])
    user, answer = record["messages"][1]["content"], record["messages"][2]["content"]
    number = record["meta"]["context_chunk_ids"].index("d-0000") + 1
    assert f"[{number}] Pump Manual, p. 1\n{EVIDENCE}" in user
    assert answer == f"At 40 psi. [{number}]" and record["meta"]["cited"] == [number]
    assert all(not cited_numbers(r["messages"][2]["content"], 9) for r in abstaining)
    pairs, _ = builder.dpo_pairs([record], [qa])
    assert pairs
    for pair in pairs:  # the wrong answer cites as the right one does, so the pair is about what it says
        rejected = pair["rejected"][0]["content"]
        assert rejected.endswith(f"[{number}]") or pair["meta"]["strategy"] == "needless_abstention"

    builder.config = SynthConfig(rag_share=1.0, seed=3, citations=False)
    (plain,), _ = builder.sft_records([qa])
    assert plain["messages"][2]["content"] == "At 40 psi."
