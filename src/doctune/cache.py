"""The work directory's cache: entries built once under a lock, written beside their final place and renamed into
it, so a reader sees a whole entry or none, and two processes never build the same entry at once.

Entries live at `<workdir>/cache/<kind>/<name>`. Each use is remembered for the stage run that made it (the runner
records the list with the run), so `doctune cache prune` can remove what no recorded run uses any more.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Kinds of entries; a name under a kind is one entry. Anything else under cache/ is left alone by prune.
KINDS = (
    "artifacts",  # fetched MLflow artifacts, by digest
    "models/bundled",  # bundled models converted to safetensors
    "models/merged",  # adapter inputs merged into their base, by the adapter's digest
    "embeddings",  # chunk vectors, by embedding model and texts
    "rehearsal",  # the base model's sampled replies to the shipped general prompts
    "gate_scores",  # a model's scores on the gate's sets, by model, sets, scoring settings and code
    "synth",  # teacher generation checkpoints (resume)
    "train/cpt",  # training checkpoints (resume); removed when the stage finishes
    "train/sft",
    "train/dpo",
    "train/page_sft",
    "pages",  # rendered page images, by PDF digest, page and render settings
)

# Resume state of a stage that did not finish (teacher generation so far, training checkpoints): no finished run
# names it, so prune keeps it unless asked not to.
RESUME_KINDS = ("synth", "train/cpt", "train/sft", "train/dpo", "train/page_sft")
IN_USE_LOCK = ".in-use.lock"

_used: set[str] = set()


class CacheBusy(RuntimeError):
    """The cache cannot be pruned now: a stage is using it."""


def used_entries() -> list[str]:
    """Entries (kind/name) used by this process since the last `forget_used()`."""
    return sorted(_used)


def forget_used() -> None:
    _used.clear()


def note_use(root: Path, path: Path) -> None:
    """Remember that `path` (an entry, or a file or folder inside one) under cache `root` was used."""
    try:
        relative = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return
    for kind in KINDS:
        if relative.startswith(kind + "/"):
            name = relative[len(kind) + 1 :].split("/", 1)[0]
            _used.add(f"{kind}/{name}")
            return


@contextmanager
def _flocked(lock_path: Path, operation: int):
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, operation)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def locked(lock_path: Path):
    """An exclusive lock held on `lock_path` (created) while the block runs."""
    return _flocked(lock_path, fcntl.LOCK_EX)


@dataclass(frozen=True)
class Cache:
    root: Path  # <workdir>/cache

    def entry(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; kinds: {', '.join(KINDS)}")
        path = Path(self.root) / kind / name
        note_use(self.root, path)
        return path

    def folder(self, kind: str, name: str, build: Callable[[Path], None], complete: str | None = None) -> Path:
        """The entry folder, built by `build(scratch_folder)` when absent. `complete` names a file whose presence
        says the folder is whole (default: the folder exists, since it only appears by rename)."""
        target = self.entry(kind, name)
        done = (lambda: (target / complete).is_file()) if complete else target.is_dir
        if done():
            return target
        with locked(target.parent / f".{target.name}.lock"):
            if done():
                return target
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover
            scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build(scratch)
                scratch.rename(target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        return target

    def file(self, kind: str, name: str, write: Callable[[Path], None]) -> Path:
        """The entry file, written by `write(scratch_path)` when absent."""
        target = self.entry(kind, name)
        if target.is_file():
            return target
        with locked(target.parent / f".{target.name}.lock"):
            if target.is_file():
                return target
            handle, scratch = tempfile.mkstemp(prefix=f".{target.name}-", suffix=target.suffix, dir=target.parent)
            os.close(handle)
            try:
                write(Path(scratch))
                os.replace(scratch, target)
            finally:
                Path(scratch).unlink(missing_ok=True)
        return target

    def json(self, kind: str, name: str, make: Callable[[], object]) -> object:
        """A JSON value computed once by `make()`."""
        path = self.file(kind, name, lambda scratch: scratch.write_text(json.dumps(make())))
        return json.loads(path.read_text())

    def discard(self, kind: str, name: str) -> None:
        """Remove one entry (e.g. a corrupted one) so the next use builds it again."""
        target = Path(self.root) / kind / name
        with locked(target.parent / f".{target.name}.lock"):
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, Path]]:
        """Every entry on disk as (kind/name, path); lock files and unfinished scratch copies are not entries."""
        found = []
        for kind in KINDS:
            folder = Path(self.root) / kind
            if folder.is_dir():
                found += [(f"{kind}/{p.name}", p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
        return found


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def in_use(root: Path):
    """Held (shared) while a stage runs: prune waits for no stage, it refuses while one runs."""
    return _flocked(Path(root) / IN_USE_LOCK, fcntl.LOCK_SH)


@contextmanager
def exclusive(root: Path):
    """Held while pruning; CacheBusy at once if a stage holds `in_use`."""
    hold = _flocked(Path(root) / IN_USE_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        hold.__enter__()
    except BlockingIOError:
        raise CacheBusy(f"a stage is running with the cache {root}; prune it when the stage has ended") from None
    try:
        yield
    finally:
        hold.__exit__(None, None, None)


def prune(
    cache: Cache, referenced: Iterable[str], dry_run: bool = False, include_resume_state: bool = False
) -> tuple[list[tuple[str, int]], int]:
    """Remove every entry not in `referenced` (kind/name), and not resume state unless `include_resume_state`;
    returns ([(entry, bytes)], bytes freed)."""
    keep = set(referenced)
    removed = []
    for key, path in cache.entries():
        if key in keep or (not include_resume_state and key.rsplit("/", 1)[0] in RESUME_KINDS):
            continue
        size = size_of(path)
        if not dry_run:
            kind, name = key.rsplit("/", 1)
            cache.discard(kind, name)
        removed.append((key, size))
    return removed, sum(size for _, size in removed)
