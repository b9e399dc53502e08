from __future__ import annotations

import pytest

from doctune.config import ChunkingConfig
from doctune.ingest.chunking import Span, chunk_document, windows
from doctune.ingest.clean import Heading, find_headings, furniture_key, join_block, normalize_line, remove_furniture


def test_windows_overlap_and_end_aligned_tail():
    spans = windows(0, 25, size=10, overlap=3)
    assert [(s.first, s.last) for s in spans] == [(0, 10), (5, 15), (10, 20), (15, 25)]
    spans = windows(0, 24, size=10, overlap=3)
    assert [(s.first, s.last) for s in spans] == [(0, 10), (7, 17), (14, 24)]
    assert windows(5, 9, size=10, overlap=3) == [Span(5, 9)]


def _char_tokens(text: str) -> list[tuple[int, int]]:
    """One token per word: offsets as a real tokenizer would give them."""
    import re

    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def test_sections_never_cross_a_heading_and_pack_paragraphs():
    intro = "Intro\n\n" + "alpha " * 5 + "end.\n\n" + "beta " * 5 + "end."
    usage = "Usage\n\n" + "gamma " * 30 + "end."
    text = intro + "\n\n" + usage
    headings = [Heading(0, "Intro"), Heading(len(intro) + 2, "Usage")]
    cfg = ChunkingConfig(mode="sections", size=16, overlap=4, min_tokens=2)
    chunks = chunk_document("d", text, _char_tokens(text), [(1, 0, len(text))], headings, cfg)
    assert chunks[0]["section"] == "Intro" and "beta" in chunks[0]["text"] and "gamma" not in chunks[0]["text"]
    usage_chunks = [c for c in chunks if c["section"] == "Usage"]
    assert len(usage_chunks) >= 2 and all(c["n_tokens"] <= 16 for c in chunks)
    for c in chunks:
        assert text[c["char_start"] : c["char_end"]] == c["text"]


def test_sections_know_the_heading_they_sit_under():
    """A standard titles a "Purpose" under every directory: each chunk names its parent heading, never a wrong one."""
    blocks = [
        "Chapter 3. The Root Filesystem", "3.2. Requirements", "The root must hold what boots the system.",
        "3.4. /bin : Essential user command binaries", "3.4.1. Purpose", "/bin holds commands for all users.",
        "3.13. /opt : Add-on application software\npackages", "3.13.1. Purpose", "/opt is reserved for add-on packages.",
        "3.16.1. Purpose", "Its parent heading was lost in extraction.",
        "1. Install the package\nwith apt",  # a two-line list item with a one-level number: no heading
        "3.16.2 GHz radios are used by default in\nmost routers",  # a measure, not a heading
    ]  # fmt: skip
    text = "\n\n".join(blocks)
    headings = find_headings(text, [(1, 0, len(text))], toc=[])
    assert [(h.title, h.level) for h in headings] == [
        ("Chapter 3. The Root Filesystem", 1), ("3.2. Requirements", 2), ("3.4. /bin : Essential user command binaries", 2),
        ("3.4.1. Purpose", 3), ("3.13. /opt : Add-on application software packages", 2), ("3.13.1. Purpose", 3),
        ("3.16.1. Purpose", 3),
    ]  # fmt: skip
    cfg = ChunkingConfig(mode="sections", size=64, overlap=4, min_tokens=1)
    chunks = chunk_document("d", text, _char_tokens(text), [(1, 0, len(text))], headings, cfg)
    parents = {c["section"]: c["section_parent"] for c in chunks if "Purpose" in c["section"] or "Requirements" in c["section"]}
    assert parents == {
        "3.2. Requirements": "Chapter 3. The Root Filesystem",
        "3.4.1. Purpose": "3.4. /bin : Essential user command binaries",
        "3.13.1. Purpose": "3.13. /opt : Add-on application software packages",
        "3.16.1. Purpose": "",  # not "3.13. /opt ...": a wrong parent would name the wrong directory
    }


def test_small_chunks_merge_into_a_neighbour():
    text = "A\n\n" + "word " * 10 + "end."
    cfg = ChunkingConfig(mode="sections", size=32, overlap=4, min_tokens=4)
    chunks = chunk_document("d", text, _char_tokens(text), [(1, 0, len(text))], [Heading(0, "A")], cfg)
    assert len(chunks) == 1 and chunks[0]["text"].startswith("A\n\nword")


def test_page_spans_map_chunks_to_pages():
    text = "one two three\n\nfour five six"
    cfg = ChunkingConfig(mode="tokens", size=4, overlap=1, min_tokens=1)
    chunks = chunk_document("d", text, _char_tokens(text), [(3, 0, 13), (4, 15, 28)], [], cfg)
    assert [(c["page_start"], c["page_end"], c["text"]) for c in chunks] == [
        (3, 4, "one two three\n\nfour"),
        (3, 4, "three\n\nfour five six"),
    ]


def test_line_cleaning():
    assert normalize_line("  ﬁnd\tthe \x08 ﬂag\u00a0 ") == "find the flag"
    assert join_block(["a hyphen-", "ated word", "Keep-", "Capital"]) == "a hyphenated word\nKeep-\nCapital"
    assert furniture_key("Chapter 3: Page 12") == "chapter #: page #"


def test_furniture_needs_repetition_or_a_page_number():
    pages = [[["Manual"], [f"body {i}"], [str(i)]] for i in range(1, 5)]
    pages.append([["Unique top"], ["body"], ["end line"]])
    cleaned = remove_furniture(pages, lines_per_edge=1, min_repeats=3)
    assert cleaned[0] == [["body 1"]]
    assert cleaned[4] == [["Unique top"], ["body"], ["end line"]]


@pytest.mark.parametrize("size,overlap", [(8, 8), (8, 9)])
def test_invalid_overlap_is_rejected(size, overlap):
    with pytest.raises(ValueError, match="overlap"):
        ChunkingConfig(size=size, overlap=overlap)
