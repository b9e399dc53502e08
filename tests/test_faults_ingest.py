"""Faults at the file level during ingest: nothing lost, nothing trusted blindly.

One unreadable file, a name that is not UTF-8 or a bad symbolic link must not stop the ingest: each becomes a
skipped report row with its reason, and the good PDFs beside it (and those behind a linked folder) are ingested.
Run through the real CLI on real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from doctune.ingest.stage import external_digests
from doctune.records import CHUNKS_FILE, INGEST_REPORT_FILE
from doctune.tracking import TAG, Tracker
from doctune_kfp.pipelines.cli import main

pytestmark = pytest.mark.faults

GOOD = ("camlidl-1.04.doc.pdf", "sample-plain.pdf")


def _readable_by(kwargs: dict, path: Path) -> bool:
    try:
        done = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read(1)", str(path)], **kwargs)
    except subprocess.SubprocessError as exc:  # the capabilities could not be dropped here
        pytest.skip(f"cannot run a process that file permissions apply to: {exc}")
    return done.returncode == 0


def _cli(config, kwargs: dict) -> subprocess.CompletedProcess:
    path = config.project.workdir.parent / "run.yaml"
    path.write_text(config.to_yaml())
    return subprocess.run([sys.executable, "-m", "doctune_kfp.pipelines.cli", "stage", "ingest", "--config", str(path)], **kwargs)


def _ingest_run(config):
    tracker = Tracker(config)
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG}stage` = 'ingest'")
    assert len(runs) == 1
    return tracker, runs[0]


def _report(tracker, run) -> dict[str, dict]:
    report = json.loads((tracker.fetch(tracker.outputs_of(run)["report"]) / INGEST_REPORT_FILE).read_text())
    return {row["source"]: row for row in report["files"]}


def _write_non_utf8(folder: Path, name: bytes, data: bytes) -> str:
    with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
        handle.write(data)
    return name.decode("utf-8", "backslashreplace")


@pytest.fixture
def faulty_folder(tmp_path, corpus):
    """Two good PDFs; beside them every file-level fault the listing and reading can meet."""
    folder = tmp_path / "pdfs"
    folder.mkdir()
    for name in GOOD:
        (folder / name).write_bytes((corpus / name).read_bytes())
    elsewhere = tmp_path / "elsewhere"  # a folder outside, linked in: its PDFs belong to the input
    elsewhere.mkdir()
    (elsewhere / "linked-manual.PDF").write_bytes((corpus / "freefem-scanned-pages.pdf").read_bytes())
    (folder / "linked").symlink_to(elsewhere)
    (folder / "unreadable.pdf").write_bytes((corpus / "sample-plain.pdf").read_bytes()[:-1] + b"\n")
    (folder / "unreadable.pdf").chmod(0)
    locked = folder / "locked"
    locked.mkdir()
    (locked / "inside.pdf").write_bytes((corpus / "sample-plain.pdf").read_bytes())
    locked.chmod(0)
    non_utf8 = _write_non_utf8(folder, b"caf\xe9.pdf", (corpus / "sample-plain.pdf").read_bytes())
    (folder / "x.pdf").symlink_to(tmp_path / "gone" / "x.pdf")  # dangling
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)  # a folder loop: sub/up/sub/up/...
    (folder / "self.pdf").symlink_to("self.pdf")  # a link to itself
    yield folder, non_utf8
    locked.chmod(0o755)
    (folder / "unreadable.pdf").chmod(0o644)


def test_file_faults_are_reported_and_the_good_pdfs_are_ingested(make_config, faulty_folder, tmp_path, as_a_user):
    folder, non_utf8 = faulty_folder
    kwargs = as_a_user(tmp_path / "home")
    if _readable_by(kwargs, folder / "unreadable.pdf"):
        pytest.skip("a file with mode 000 is still readable here (the user may ignore file permissions)")
    config = make_config(folder)

    done = _cli(config, kwargs)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    tracker, run = _ingest_run(config)
    rows = _report(tracker, run)
    for source in (*GOOD, "linked/linked-manual.PDF"):
        assert rows[source]["status"] == "ok" and rows[source]["chunks"] > 0, rows[source]
    expected = {
        "unreadable.pdf": "cannot be read: permission denied",
        "locked/": "folder cannot be read: permission denied",
        non_utf8: f"file name is not valid UTF-8 (shown as {non_utf8})",
        "x.pdf": f"broken symbolic link to {tmp_path / 'gone' / 'x.pdf'}",
        "sub/up/": "symbolic link loop: leads back to the input folder",
        "self.pdf": "symbolic link loop",
    }
    for source, reason in expected.items():
        assert rows[source]["status"] == "skipped", rows[source]
        assert reason in rows[source]["reason"], rows[source]
    assert set(rows) == {*GOOD, "linked/linked-manual.PDF", *expected}

    chunks = pq.read_table(tracker.fetch(tracker.outputs_of(run)["chunks"]) / CHUNKS_FILE).to_pylist()
    assert {c["doc_id"] for c in chunks} == {rows[s]["doc_id"] for s in (*GOOD, "linked/linked-manual.PDF")}
    # The console names every skipped file and why; the Markdown report too, the odd name escaped.
    for source in expected:
        assert source in done.stdout
    markdown = (tracker.fetch(tracker.outputs_of(run)["report"]) / "ingest_report.md").read_text()
    assert f"| {non_utf8} | skipped |" in markdown and "| unreadable.pdf | skipped |" in markdown
    # The linked folder's PDF travels in the sources artifact as a file; what could not be read is not there.
    sources = tracker.fetch(tracker.outputs_of(run)["sources"])
    assert (sources / "linked" / "linked-manual.PDF").is_file() and not (sources / "unreadable.pdf").exists()


def test_an_unreadable_file_is_in_the_cache_key_by_its_reason(make_config, faulty_folder, tmp_path, as_a_user):
    """chmod changes neither size nor mtime: the key must still change when a skipped file becomes readable."""
    folder, _ = faulty_folder
    kwargs = as_a_user(tmp_path / "home")
    if _readable_by(kwargs, folder / "unreadable.pdf"):
        pytest.skip("a file with mode 000 is still readable here (the user may ignore file permissions)")
    script = (
        "import json, sys; from doctune.config import config_from_yaml; from doctune.ingest.stage import external_digests; "
        "print(json.dumps(external_digests(config_from_yaml(sys.stdin.read()), {})))"
    )
    config = make_config(folder)

    def key() -> str:
        done = subprocess.run([sys.executable, "-c", script], input=config.to_yaml(), **kwargs)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        return json.loads(done.stdout)["sources"]

    unreadable = key()
    assert key() == unreadable  # nothing changed: an earlier result may be reused
    (folder / "unreadable.pdf").chmod(0o644)
    assert key() != unreadable


def test_a_mended_link_changes_the_cache_key(make_config, faulty_folder, tmp_path, corpus):
    folder, _ = faulty_folder
    config = make_config(folder)
    dangling = external_digests(config, {})["sources"]
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "x.pdf").write_bytes((corpus / "sample-plain.pdf").read_bytes())
    assert external_digests(config, {})["sources"] != dangling


def test_a_folder_where_every_file_is_skipped_fails_in_one_line(make_config, tmp_path, corpus, capsys):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    non_utf8 = _write_non_utf8(folder, b"r\xe9sum\xe9.pdf", (corpus / "sample-plain.pdf").read_bytes())
    (folder / "x.pdf").symlink_to("missing.pdf")
    (folder / "empty.pdf").write_bytes(b"")
    config = make_config(folder)
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())

    code = main(["stage", "ingest", "--config", str(path)])

    assert code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # beside MLflow's own INFO lines
    assert len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    assert line.startswith("error: IngestError: no usable document: all 3 files in ")
    assert non_utf8 in line and "broken symbolic link to missing.pdf" in line and "empty file" in line
    assert "report/ingest_report.md of MLflow run " in line
    tracker = Tracker(config)
    failed = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TAG}stage` = 'ingest'")[0]
    assert failed.info.status == "FAILED" and non_utf8 in failed.data.tags[f"{TAG}error"]
    assert line.endswith(failed.info.run_id)
    report = tracker.client.download_artifacts(failed.info.run_id, "report", str(tmp_path / "dl"))
    rows = {r["source"]: r for r in json.loads((Path(report) / INGEST_REPORT_FILE).read_text())["files"]}
    assert {s: r["status"] for s, r in rows.items()} == {"empty.pdf": "skipped", non_utf8: "skipped", "x.pdf": "skipped"}


def test_a_link_to_a_file_and_a_second_link_to_a_folder_are_followed_once(tmp_path, corpus, tiny_tokenizer_dir):
    from doctune.config import IngestConfig
    from doctune.ingest.stage import ingest_folder, report_markdown

    folder, shared = tmp_path / "pdfs", tmp_path / "shared"
    folder.mkdir()
    shared.mkdir()
    (shared / "manual.pdf").write_bytes((corpus / "sample-plain.pdf").read_bytes())
    (folder / "a").symlink_to(shared)
    (folder / "b").symlink_to(shared)
    (folder / "file-link.pdf").symlink_to(corpus / "camlidl-1.04.doc.pdf")
    (folder / "odd|name.pdf").write_bytes(b"<html>")
    result = ingest_folder(folder, IngestConfig(pdfs=folder, workers=1), tiny_tokenizer_dir / "tokenizer.json", progress=False)
    rows = {row["source"]: row for row in result.files}
    assert rows["a/manual.pdf"]["status"] == "ok" and rows["file-link.pdf"]["status"] == "ok"
    assert rows["b/"]["status"] == "skipped" and rows["b/"]["reason"] == "same folder as a/, listed there"
    assert "| odd\\|name.pdf | skipped |" in report_markdown(result)  # a '|' in a name does not break the table
