"""The one cache module: entries built once under a lock, corrupted copies replaced, `doctune cache prune`."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from doctune.cache import Cache
from doctune.stages import execute_stage
from doctune.tracking import Tracker
from doctune_kfp.pipelines.cli import main


def _build_slowly(root: str, marker: str) -> None:
    def build(scratch: Path) -> None:
        with open(marker, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)
        (scratch / "weights.bin").write_bytes(b"x" * 10)

    Cache(Path(root)).folder("models/bundled", "m", build)


def test_two_processes_asking_for_one_entry_build_it_once(tmp_path):
    marker = tmp_path / "builds.txt"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_build_slowly, args=(str(tmp_path / "cache"), str(marker))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert marker.read_text() == "built\n"
    entry = tmp_path / "cache" / "models" / "bundled" / "m"
    assert (entry / "weights.bin").read_bytes() == b"x" * 10
    assert [p.name for p in entry.parent.iterdir() if not p.name.startswith(".m.lock")] == ["m"]  # no scratch left


def test_a_failed_build_leaves_no_entry_and_the_next_use_builds_again(tmp_path):
    cache = Cache(tmp_path / "cache")

    def broken(scratch: Path) -> None:
        (scratch / "half.bin").write_bytes(b"h")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.folder("models/merged", "x", broken)
    assert not (tmp_path / "cache" / "models" / "merged" / "x").exists()
    path = cache.folder("models/merged", "x", lambda scratch: (scratch / "ok.bin").write_bytes(b"o"))
    assert (path / "ok.bin").is_file()


def test_a_corrupted_cached_artifact_is_discarded_and_fetched_again(make_config, small_corpus):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("cache-test")
    chunks = execute_stage("ingest", config, tracker, parent, {}).outputs["chunks"]
    local = tracker.fetch(chunks) / "chunks.parquet"
    good = local.read_bytes()
    local.write_bytes(good[:-10] + b"0123456789")  # edited on disk
    assert (tracker.fetch(chunks) / "chunks.parquet").read_bytes() == good


def test_cache_prune_removes_what_no_run_references_and_says_how_much(make_config, small_corpus, capsys):
    config = make_config(small_corpus)
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("prune-test")
    ingested = execute_stage("ingest", config, tracker, parent, {})
    execute_stage("synth", config, tracker, parent, {k: ingested.outputs[k] for k in ("chunks", "pages")})
    root = config.project.workdir / "cache"
    kept = {p.relative_to(root).as_posix() for _, p in Cache(root).entries()}
    assert any(k.startswith("artifacts/") for k in kept) and any(k.startswith("embeddings/") for k in kept)
    stale = [root / "artifacts" / "sha256-0000", root / "embeddings" / "stale.npy", root / "train" / "sft" / "old"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix:
            path.write_bytes(b"s" * 2048)
        else:
            path.mkdir()
            (path / "checkpoint.bin").write_bytes(b"s" * 4096)
    workdir = f"project.workdir={config.project.workdir}"
    assert main(["cache", "prune", "--dry-run", "--set", workdir]) == 0
    assert all(path.exists() for path in stale)
    assert main(["cache", "prune", "--set", workdir]) == 0
    out = capsys.readouterr().out
    assert "removed 2 cache entries no run references" in out and "artifacts/sha256-0000" in out
    assert not stale[0].exists() and not stale[1].exists()
    assert stale[2].exists()  # an unfinished stage's training checkpoint: what a rerun resumes from
    assert main(["cache", "prune", "--include-resume-state", "--set", workdir]) == 0
    assert "removed 1 cache entries" in capsys.readouterr().out and not stale[2].exists()
    assert {p.relative_to(root).as_posix() for _, p in Cache(root).entries()} == kept


def test_cache_prune_refuses_while_a_stage_uses_the_cache(tmp_path, capsys):
    from doctune.cache import in_use

    root = tmp_path / "work" / "cache"
    (root / "embeddings").mkdir(parents=True)
    (root / "embeddings" / "x.npy").write_bytes(b"v")
    with in_use(root):  # as a running stage holds it, in this process or another
        assert main(["cache", "prune", "--set", f"project.workdir={tmp_path / 'work'}"]) == 1
    assert "a stage is running with the cache" in capsys.readouterr().err
    assert (root / "embeddings" / "x.npy").exists()
