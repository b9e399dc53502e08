"""The pages stage on real PDFs: page images with labels a person (and a VLM) can read off the page."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

import pymupdf
import pytest

from doctune.config import build_config
from doctune.page_schema import SELF_SUPERVISED_SCHEMA, SchemaError, load_schema, violations
from doctune.pages import render, split
from doctune.pages.labels import read_labels, resolve_document
from doctune.pages.selfsup import DocumentFurniture, clean, page_fields
from doctune.pages.stage import PagesError, external_digests
from doctune.stages import execute_stage
from doctune.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
MULTILINGUAL = (REPO.parent / "shared" / "corpus-multilingual").resolve()
MAX_PIXELS = 500_000  # below a 100 dpi A4 page (about 970k pixels): every page is scaled down


def _config(workdir: Path, pdfs: Path, **overrides: object):
    data = {
        "extends": str(REPO / "configs" / "cpu-demo.yaml"),
        "project": {"workdir": str(workdir)},
        "pages": {"pdfs": str(pdfs), "render": {"dpi": 100, "max_pixels": MAX_PIXELS}},
    }
    return build_config(data, [f"{key}={value}" for key, value in overrides.items()])


def _run(config):
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("pages-test")
    result = execute_stage("pages", config, tracker, parent, {})
    return tracker, result


def _records(folder: Path) -> dict[str, list[dict]]:
    return {
        name: [json.loads(line) for line in (folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        for name in ("train", "validation", "test")
    }


def _page_text(pdf: Path, page: int) -> str:
    with pymupdf.open(pdf) as doc:
        return clean(doc[page - 1].get_text())


@pytest.fixture(scope="module")
def english(tmp_path_factory, corpus):
    """Four real PDFs (one rasterized), a corrupt file and an encrypted copy, three pages per document."""
    folder = tmp_path_factory.mktemp("pdfs")
    for name in ("camlidl-1.04.doc.pdf", "sample-plain.pdf", "freefem.pdf", "freefem-scanned-pages.pdf"):
        (folder / name).write_bytes((corpus / name).read_bytes())
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a PDF body\n")
    with pymupdf.open(corpus / "camlidl-1.04.doc.pdf") as doc:
        doc.save(folder / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", user_pw="user")
    workdir = tmp_path_factory.mktemp("work")
    config = _config(workdir, folder, **{"pages.max_pages_per_document": 3, "pages.augment.fraction": 0.5})
    tracker, result = _run(config)
    return {
        "folder": folder,
        "workdir": workdir,
        "tracker": tracker,
        "result": result,
        "dataset": tracker.fetch(result.outputs["dataset"]),
        "report": json.loads((tracker.fetch(result.outputs["report"]) / "pages_report.json").read_text(encoding="utf-8")),
        "markdown": (tracker.fetch(result.outputs["report"]) / "pages_report.md").read_text(encoding="utf-8"),
    }


def test_self_supervised_labels_are_text_printed_on_the_page(english):
    records = [r for rows in _records(english["dataset"]).values() for r in rows if r["augmentation"] is None]
    assert len(records) == 9  # three digital documents, three pages each
    for record in records:
        fields = record["fields"]
        assert record["source"] == "text_layer" and violations(fields, SELF_SUPERVISED_SCHEMA) == []
        text = _page_text(english["folder"] / record["document"], record["page"])
        for key in ("title", "running_header", "page_number", "section"):
            assert fields[key] is None or fields[key] in text, (record["id"], key, fields[key])
        if fields["first_paragraph"]:
            assert len(fields["first_paragraph"]) <= 300
            assert " ".join(fields["first_paragraph"].split()[:4]) in text, record["id"]
    by_id = {r["id"]: r["fields"] for r in records}
    assert by_id["camlidl-1.04.doc.pdf#p1"]["title"] == "Camlidl user’s manual"
    assert by_id["camlidl-1.04.doc.pdf#p1"]["page_number"] == "1"
    assert by_id["camlidl-1.04.doc.pdf#p1"]["first_paragraph"].startswith("Camlidl generates stub code for interfacing Caml")
    assert by_id["sample-plain.pdf#p1"]["running_header"] == "SAMPLE TEST"  # on every page of the exam sheets
    assert sum(bool(f["title"]) for f in by_id.values()) >= 5 and sum(bool(f["page_number"]) for f in by_id.values()) >= 6


def test_unusable_files_and_pages_are_reported_and_the_rest_is_used(english):
    report, markdown = english["report"], english["markdown"]
    reasons = {(item["file"], item["page"]): item["reason"] for item in report["skipped"]}
    for page in (1, 2, 3, 4):  # the rasterized PDF: image-only pages
        assert "no text layer" in reasons[("freefem-scanned-pages.pdf", page)]
    assert "cannot be opened as a PDF" in reasons[("broken.pdf", None)]
    assert "encrypted" in reasons[("locked.pdf", None)]
    assert "freefem-scanned-pages.pdf | 1 |" in markdown and "no text layer: self-supervised labels need one" in markdown
    assert sorted(report["documents_used"]) == ["camlidl-1.04.doc.pdf", "freefem.pdf", "sample-plain.pdf"]
    metrics = english["tracker"].client.get_run(english["result"].run_id).data.metrics
    assert metrics["pages_skipped"] == len(report["skipped"]) and metrics["pages_train"] >= 1


def test_splits_hold_whole_documents_and_augmented_copies_only_in_train(english):
    folder, records = english["dataset"], _records(english["dataset"])
    sides = {}
    for name, rows in records.items():
        for record in rows:
            sides.setdefault(record["document"], set()).add(name)
            assert (record["augmentation"] is not None) <= (name == "train")
            image = folder / record["image"]
            assert image.is_file() and record["width"] * record["height"] <= MAX_PIXELS
    assert all(len(names) == 1 for names in sides.values()), sides  # no document in two splits
    assert english["report"]["split_mode"] == "document" and len(records["test"]) >= 1  # 3 documents: one for test
    copies = [r for r in records["train"] if r["augmentation"]]
    originals = {r["id"]: r for r in records["train"] if not r["augmentation"]}
    assert copies and all(c["fields"] == originals[c["id"].split("+")[0]]["fields"] for c in copies)
    assert all(c["image"] != originals[c["id"].split("+")[0]]["image"] for c in copies)
    assert json.loads((folder / "schema.json").read_text()) == SELF_SUPERVISED_SCHEMA
    assert (folder / "instruction.txt").read_text().startswith("Extract this page's fields as JSON")


def test_a_rerun_renders_nothing_it_rendered_before(english, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(render, "render_png", fail)
    config = _config(english["workdir"], english["folder"], **{"pages.max_pages_per_document": 3, "pages.split.seed": 7})
    tracker, result = _run(config)  # a new split seed: the stage runs again, its pages come from the render cache
    assert result.reused_from is None
    report = json.loads((tracker.fetch(result.outputs["report"]) / "pages_report.json").read_text())
    assert report["pages"] == 9 and report["render"]["rendered_now"] == 0


def test_user_labels_bad_lines_are_named_and_the_rest_used(tmp_path, small_corpus):
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["title"],
                "properties": {"title": {"type": "string"}, "total": {"type": ["number", "null"]}},
            }
        )
    )
    lines = [
        {"pdf": "camlidl-1.04.doc.pdf", "page": 1, "fields": {"title": "Camlidl user’s manual", "total": None}},  # 1
        "{not json",  # 2
        {"pdf": "camlidl-1.04.doc.pdf", "fields": {"title": "no page"}},  # 3
        {"pdf": "nowhere.pdf", "page": 1, "fields": {"title": "x"}},  # 4
        {"pdf": "sample-plain.pdf", "page": 99, "fields": {"title": "x"}},  # 5
        {"pdf": "sample-plain.pdf", "page": 2, "fields": {"title": 12}},  # 6
        {"pdf": "camlidl-1.04.doc.pdf", "page": 1, "fields": {"title": "again"}},  # 7
        {"pdf": "sample-plain.pdf", "page": 2, "fields": {"title": "SAMPLE TEST", "total": 20}},  # 8
        {"pdf": "./sample-plain.pdf", "page": 3, "fields": {"title": "SAMPLE TEST"}},  # 9
        {"pdf": "locked.pdf", "page": 1, "fields": {"title": "x"}},  # 10
    ]
    with pymupdf.open(small_corpus / "sample-plain.pdf") as doc:
        doc.save(small_corpus / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="o", user_pw="u")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    config = _config(tmp_path / "work", small_corpus, **{"pages.labels": labels, "pages.schema_file": schema})
    tracker, result = _run(config)
    records = _records(tracker.fetch(result.outputs["dataset"]))
    used = {r["id"]: r for rows in records.values() for r in rows if not r["augmentation"]}
    assert sorted(used) == ["camlidl-1.04.doc.pdf#p1", "sample-plain.pdf#p2", "sample-plain.pdf#p3"]
    assert used["sample-plain.pdf#p2"]["fields"] == {"title": "SAMPLE TEST", "total": 20}
    assert {r["source"] for r in used.values()} == {"labels"}

    report = json.loads((tracker.fetch(result.outputs["report"]) / "pages_report.json").read_text())
    bad = {item["line"]: item for item in report["skipped"]}
    bad = {line: item for line, item in bad.items() if line is not None}  # (locked.pdf itself is reported too)
    assert sorted(bad) == [2, 3, 4, 5, 6, 7, 10] and {item["file"] for item in bad.values()} == {"labels.jsonl"}
    assert bad[10]["key"] == "pdf" and "locked.pdf cannot be used (encrypted" in bad[10]["reason"]
    assert bad[3]["key"] == "page" and "missing key 'page'" in bad[3]["reason"]
    assert bad[4]["key"] == "pdf" and "nowhere.pdf" in bad[4]["reason"]
    assert bad[5]["key"] == "page" and "out of range" in bad[5]["reason"]
    assert bad[6]["key"] == "fields.title" and "fields.title: 12 is not of type 'string'" in bad[6]["reason"]
    assert "duplicate" in bad[7]["reason"] and "line 1" in bad[7]["reason"]
    markdown = (tracker.fetch(result.outputs["report"]) / "pages_report.md").read_text()
    # A line whose PDF and page are known names them beside the labels file's line and the key.
    assert bad[6]["document"] == "sample-plain.pdf" and bad[6]["page"] == 2
    assert "| labels.jsonl | sample-plain.pdf p2 | 6 | fields.title: 12 is not of type" in markdown
    assert report["split_mode"] == "page" and "by page" in report["split_note"]  # two documents: split by page


@pytest.mark.parametrize(
    ("pdf", "page", "title", "section"),
    [
        ("debian-faq.fr.pdf", 39, "7.5 Qu’est ce qu’un Debian conffile ?", "7.5"),
        ("developers-reference.de.pdf", 21, "3.2.6 Nach dem Ausscheiden zurückkehren", "3.2.6"),
    ],
)
def test_french_and_german_pages_keep_their_accents(pdf, page, title, section):
    with pymupdf.open(MULTILINGUAL / pdf) as doc:
        fields, why = page_fields(doc[page - 1], DocumentFurniture.of(doc))
        text = clean(doc[page - 1].get_text())
    assert why == "" and violations(fields, SELF_SUPERVISED_SCHEMA) == []
    assert fields["title"] == title and fields["section"] == section
    assert fields["running_header"] in text and fields["page_number"] in text
    assert fields["first_paragraph"][:60] in text
    accented = fields["first_paragraph"] + fields["running_header"]
    assert any(c in accented for c in "éèàçÈÉüöäß"), accented


def test_no_usable_page_is_an_error_naming_what_was_found(tmp_path, corpus):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    (folder / "scan.pdf").write_bytes((corpus / "freefem-scanned-pages.pdf").read_bytes())
    with pytest.raises(PagesError) as caught:
        _run(_config(tmp_path / "work", folder))
    message = str(caught.value)
    assert "no usable page" in message and "1 PDF file(s)" in message
    assert "scan.pdf page 1: no text layer" in message and "pages_report.md" in message


def test_split_is_deterministic_and_leaves_test_a_document():
    assert split.counts(3, 0.8, 0.1) == (2, 0, 1)
    assert split.counts(4, 0.8, 0.1) == (2, 1, 1)
    assert split.counts(10, 0.8, 0.1) == (8, 1, 1)
    documents = [f"doc{i}.pdf" for i in range(12)]
    first = split.assign(documents, 0.8, 0.1, seed=3)
    assert first == split.assign(list(reversed(documents)), 0.8, 0.1, seed=3)
    assert first != split.assign(documents, 0.8, 0.1, seed=4)
    sides, mode = split.split_pages([("a.pdf", p) for p in range(1, 11)], 0.8, 0.1, seed=0)
    assert mode == "page" and sorted(sides.values()).count("test") == 1


def test_reuse_key_follows_the_content_of_pdfs_labels_and_schema(tmp_path, small_corpus):
    labels, schema = tmp_path / "labels.jsonl", tmp_path / "schema.json"
    labels.write_text('{"pdf": "sample-plain.pdf", "page": 1, "fields": {}}\n')
    schema.write_text('{"type": "object", "properties": {}}')
    config = _config(tmp_path / "work", small_corpus, **{"pages.labels": labels, "pages.schema_file": schema})
    before = external_digests(config, {})
    labels.write_text('{"pdf": "sample-plain.pdf", "page": 2, "fields": {}}\n')
    schema.write_text('{"type": "object", "properties": {"a": {}}}')
    (small_corpus / "sample-plain.pdf").write_bytes((small_corpus / "sample-plain.pdf").read_bytes() + b"\n")
    after = external_digests(config, {})
    assert all(before[key] != after[key] for key in ("pdfs", "labels", "schema"))


def test_labels_as_windows_tools_and_real_folders_give_them_are_used(tmp_path, corpus):
    """A BOM and CRLF line ends, an absolute path, a page written 1.0, a label naming a copy of a PDF, a PDF whose
    name is not UTF-8 on disk, and half an emoji in a value: the stage runs, uses what it can, names what it skips."""
    folder = tmp_path / "pdfs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "sample-plain.pdf").write_bytes((corpus / "sample-plain.pdf").read_bytes())
    camlidl = (corpus / "camlidl-1.04.doc.pdf").read_bytes()
    (folder / "camlidl.pdf").write_bytes(camlidl)
    (folder / "copy of camlidl.pdf").write_bytes(camlidl)  # the same file twice: used once
    with pymupdf.open(corpus / "sample-plain.pdf") as doc:
        doc.select([0])
        doc.save(folder / "latin1.pdf")
    os.rename(os.fsencode(folder / "latin1.pdf"), os.fsencode(folder) + b"/r\xe9sum\xe9.pdf")  # a Windows archive's name
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"title": {"type": "string"}}}))
    lines = [
        {"pdf": str(folder / "sub" / "sample-plain.pdf"), "page": 1.0, "fields": {"title": "SAMPLE TEST"}},
        {"pdf": "copy of camlidl.pdf", "page": 1, "fields": {"title": "Camlidl user’s manual 📘"}},
        {"pdf": "sub/sample-plain.pdf", "page": 2, "fields": {"title": "cut \ud83d"}},
    ]
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(line) for line in lines).encode() + b"\r\n")
    config = _config(tmp_path / "work", folder, **{"pages.labels": labels, "pages.schema_file": schema})
    tracker, result = _run(config)
    records = _records(tracker.fetch(result.outputs["dataset"]))
    used = {r["id"]: r["fields"] for rows in records.values() for r in rows if not r["augmentation"]}
    assert used == {"sub/sample-plain.pdf#p1": {"title": "SAMPLE TEST"}, "camlidl.pdf#p1": {"title": "Camlidl user’s manual 📘"}}
    report = json.loads((tracker.fetch(result.outputs["report"]) / "pages_report.json").read_text())
    bad = [item for item in report["skipped"] if item["line"] is not None]
    assert [(item["line"], item["key"]) for item in bad] == [(3, "fields.title")]
    assert "half a UTF-16 surrogate pair" in bad[0]["reason"]
    assert {row["document"]: row["pages"] for row in report["documents"]}["r\\xe9sum\\xe9.pdf"] == 1


def test_labels_match_names_however_written_and_utf16_files_are_read(tmp_path):
    names = ["résumé.pdf", "2023/report.pdf", "2024/report.pdf"]
    decomposed = unicodedata.normalize("NFD", "résumé.pdf")  # as macOS writes file names
    assert resolve_document(decomposed, names) == ("résumé.pdf", "")
    assert resolve_document("/home/me/pdfs/2024/report.pdf", names) == ("2024/report.pdf", "")
    assert resolve_document("C:\\pdfs\\2023\\report.pdf", names) == ("2023/report.pdf", "")
    assert "ambiguous" in resolve_document("report.pdf", names)[1]
    labels = tmp_path / "labels.jsonl"  # PowerShell 5's `>` writes UTF-16 with a BOM
    labels.write_bytes(("\ufeff" + json.dumps({"pdf": "résumé.pdf", "page": 2, "fields": {}}) + "\r\n").encode("utf-16-le"))
    skipped: list[dict] = []
    read = read_labels(labels, {"résumé.pdf": 3, "2023/report.pdf": 1, "2024/report.pdf": 1}, {"type": "object"}, skipped)
    assert [(label.document, label.page) for label in read] == [("résumé.pdf", 2)] and skipped == []


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, "required key(s) 'b' not in properties"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}, "$ref 'https://example.com/a.json'"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}, "cannot be resolved"),
        ([{"type": "object"}], "must describe an object"),
    ],
)
def test_a_schema_that_cannot_be_used_is_one_line_naming_the_file(tmp_path, schema, message):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    with pytest.raises(SchemaError, match=re.escape(message)) as caught:
        load_schema(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    with pytest.raises(SchemaError, match="cannot be read"):
        load_schema(tmp_path)  # a folder


def test_a_schema_with_a_bom_refs_and_a_type_list_is_used(tmp_path):
    schema = {"type": ["object"], "$defs": {"money": {"type": "number"}}, "properties": {"total": {"$ref": "#/$defs/money"}}}
    path = tmp_path / "schema.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(schema).encode())
    loaded = load_schema(path)
    assert violations({"total": 12.5}, loaded) == [] and violations({"total": "12"}, loaded) == [
        "total: '12' is not of type 'number'"
    ]


def test_a_landscape_page_stored_rotated_gets_the_labels_of_the_page_as_shown():
    """A page with /Rotate 90 (how landscape table pages are stored): header, page number and title as on the image."""
    landscape = pymupdf.open()
    for number in range(1, 5):
        page = landscape.new_page(width=842, height=595)
        page.insert_text((40, 30), "Annual Report 2024", fontsize=9)
        page.insert_text((40, 80), "4.2 Quarterly revenue by region", fontsize=18)
        page.insert_text((40, 110), "This table gives the revenue of each region for the four quarters, in euros.", fontsize=10)
        page.insert_text((410, 580), str(number), fontsize=9)
    stored = pymupdf.open()
    for number in range(4):
        page = stored.new_page(width=595, height=842)
        page.show_pdf_page(page.rect, landscape, number, rotate=90)
        page.set_rotation(90)
    stored = pymupdf.open("pdf", stored.tobytes())
    assert stored[1].rotation == 90
    fields, _ = page_fields(stored[1], DocumentFurniture.of(stored))
    assert fields == page_fields(landscape[1], DocumentFurniture.of(landscape))[0]
    assert fields["running_header"] == "Annual Report 2024" and fields["page_number"] == "2"
    assert fields["title"] == "4.2 Quarterly revenue by region"


def test_a_label_key_the_schema_does_not_name_is_a_named_bad_line(tmp_path):
    """A typo ("titel") that a schema without additionalProperties lets through would be trained on and never scored."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"pdf": "a.pdf", "page": 1, "fields": {"titel": "Intro"}}) + "\n")
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    skipped: list[dict] = []
    assert read_labels(labels, {"a.pdf": 2}, schema, skipped) == []
    assert skipped[0]["line"] == 1 and skipped[0]["key"] == "fields.titel" and "not a key of the schema" in skipped[0]["reason"]
    assert read_labels(labels, {"a.pdf": 2}, schema | {"additionalProperties": True}, []) != []  # extra keys allowed


def test_a_table_the_finder_misreads_is_labeled_as_none_not_taught(corpus):
    """The live manual's contents page reads as a table of spaced-out letters ("Ab out"): not what the page shows."""
    import pymupdf

    from doctune.pages.selfsup import _table_rows, as_printed, clean

    with pymupdf.open(corpus / "live-manual.portrait.en.a4.pdf") as doc:
        rows, boxes = _table_rows(doc[2])
        assert rows == [] and boxes  # the table's area still keeps it out of the first paragraph
    with pymupdf.open(corpus / "sample-plain.pdf") as doc:
        page = next(p for p in doc if p.find_tables().tables)
        rows, _ = _table_rows(page)
        assert rows and as_printed(rows, clean(page.get_text()))
