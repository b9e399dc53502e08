"""Find the PDFs under the input folder, following symbolic links, and name everything that cannot be listed.

Every *.pdf (any case) becomes an entry; so does every thing that may have been one and cannot be read: a dangling
or looping link, a folder that cannot be listed, a file that cannot be stat'ed, a name that is not valid UTF-8. Such
an entry carries a `problem` and is reported as skipped with it: nothing under the folder is silently left out.

Names are shown as `source`: the path relative to the input folder, '/'-separated, with bytes that are not valid
UTF-8 written as backslash escapes (caf\\xe9.pdf), so a report, a console or MLflow never meets an unencodable name.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path


class IngestError(RuntimeError):
    """No usable document, or an input folder that cannot be read."""


@dataclass(frozen=True)
class Entry:
    path: Path  # where to read it (through any links)
    source: str  # how it is shown: see shown()
    problem: str = ""  # why it cannot be ingested; empty for a file to read


def shown(name: str | os.PathLike) -> str:
    """A file name as it can be printed and stored: bytes that are not UTF-8 become backslash escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # a name that is not UTF-8 on disk holds surrogate escapes here, which do not encode
    except UnicodeEncodeError:
        return False
    return True


def os_reason(exc: OSError) -> str:
    """Why an OS call failed, without the file name (which the caller shows its own way)."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    return exc.strerror or type(exc).__name__


_KINDS = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device", stat.S_ISBLK: "a device"}


def is_pdf_name(name: str) -> bool:
    return Path(name).suffix.lower() == ".pdf"  # any case; a bare ".pdf" is a hidden file without suffix, as before


def scan_folder(folder: Path) -> list[Entry]:
    """Entries in path order (as sorted paths would be), links followed; a folder is walked once however reached."""
    root = Path(folder)
    if not root.is_dir():
        raise IngestError(f"PDF folder {shown(root)} does not exist or is not a folder (set ingest.pdfs)")
    top = root.stat()
    entries: list[Entry] = []
    walked: dict[tuple[int, int], str] = {(top.st_dev, top.st_ino): ""}  # folder identity -> source it was listed as

    def folder_name(source: str) -> str:
        return f"{source}/" if source else "the input folder"

    def walk(directory: Path, prefix: str, chain: tuple[tuple[int, int], ...]) -> None:
        try:
            with os.scandir(directory) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError as exc:
            if not prefix:
                raise IngestError(f"PDF folder {shown(root)} cannot be read: {os_reason(exc)}") from None
            entries.append(Entry(directory, folder_name(shown(prefix)), f"folder cannot be read: {os_reason(exc)}"))
            return
        for item in items:
            relative = f"{prefix}/{item.name}" if prefix else item.name
            source, path = shown(relative), directory / item.name
            link = False
            try:
                link = item.is_symlink()
                info = path.stat()  # follows links
            except OSError as exc:
                if link or is_pdf_name(item.name) or _is_folder(item):
                    entries.append(Entry(path, source, _unstatable(path, item, exc)))
                continue
            if stat.S_ISDIR(info.st_mode):
                identity = (info.st_dev, info.st_ino)
                earlier = folder_name(walked.get(identity, ""))
                if identity in chain:  # a link to the folder it is in, or above: walking it would never end
                    entries.append(Entry(path, folder_name(source), f"symbolic link loop: leads back to {earlier}"))
                elif identity in walked:  # a second way to a folder: its PDFs are listed once
                    entries.append(Entry(path, folder_name(source), f"same folder as {earlier}, listed there"))
                else:
                    walked[identity] = source
                    walk(path, relative, (*chain, identity))
                continue
            if not is_pdf_name(item.name):
                continue
            if not valid_utf8(relative):
                what = "file" if valid_utf8(prefix) else "folder"
                entries.append(Entry(path, source, f"{what} name is not valid UTF-8 (shown as {source}); rename it to ingest it"))
            elif not stat.S_ISREG(info.st_mode):
                kind = next((what for test, what in _KINDS.items() if test(info.st_mode)), "not a regular file")
                entries.append(Entry(path, source, f"not a regular file: {kind}{' (through a symbolic link)' if link else ''}"))
            else:
                entries.append(Entry(path, source))

    walk(root, "", ((top.st_dev, top.st_ino),))
    if not entries:
        raise IngestError(f"no *.pdf files under {shown(root)}")
    return entries


def _is_folder(item: os.DirEntry) -> bool:
    try:
        return item.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _unstatable(path: Path, item: os.DirEntry, exc: OSError) -> str:
    """The reason for an entry that is listed but cannot be looked at. Every such link is reported, since what it
    leads to (a PDF, a folder of PDFs) cannot be known; other entries only when named *.pdf or a folder."""
    try:
        target = os.readlink(path) if item.is_symlink() else None
    except OSError:
        target = None
    if target is None:
        return f"cannot be read: {os_reason(exc)}"
    if exc.errno == errno.ELOOP:
        return f"symbolic link loop (links to {shown(target)})"
    if exc.errno == errno.ENOENT:
        return f"broken symbolic link to {shown(target)}"
    return f"symbolic link to {shown(target)} cannot be followed: {os_reason(exc)}"
