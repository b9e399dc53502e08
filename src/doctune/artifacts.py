"""Content-addressed artifacts: a folder, its sha256 manifest, and the reference passed downstream."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_NAME = "MANIFEST.json"
# Kinds of artifacts that hold model weights: checked byte for byte before they are reused, registered or promoted.
MODEL_KIND = "model"
GGUF_KIND = "gguf_model"
NF4_KIND = "nf4_model"
WEIGHT_KINDS = frozenset({MODEL_KIND, GGUF_KIND, NF4_KIND})
_REF_KEYS = ("run_id", "artifact_path", "digest", "kind")


class ArtifactIntegrityError(RuntimeError):
    """A fetched artifact does not match the digest its reference promised."""


@dataclass(frozen=True)
class ArtifactRef:
    """What one stage hands the next: where an artifact lives and what it must hash to."""

    run_id: str
    artifact_path: str
    digest: str
    kind: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ArtifactRef:
        missing = [key for key in _REF_KEYS if not data.get(key)]
        if missing:
            raise ValueError(f"artifact reference {data!r} lacks {', '.join(missing)}")
        return cls(**{key: str(data[key]) for key in _REF_KEYS})


def refs_to_json(refs: dict[str, ArtifactRef]) -> str:
    return json.dumps({name: ref.to_dict() for name, ref in sorted(refs.items())}, sort_keys=True)


def refs_from_json(text: str) -> dict[str, ArtifactRef]:
    if not text or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"artifact references are not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("artifact references must be a JSON object of name -> reference")
    return {name: ArtifactRef.from_dict(ref) for name, ref in data.items()}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(root: Path, files: list[Path] | None = None) -> dict:
    """Every file under root (or the given ones) with its size and sha256, sorted by path."""
    root = Path(root)
    if files is None:
        files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    entries = []
    for path in files:
        entries.append({"path": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)})
    entries.sort(key=lambda e: e["path"])
    return {"files": entries}


def manifest_digest(manifest: dict) -> str:
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def write_manifest(root: Path) -> str:
    """Write MANIFEST.json into root and return the folder's digest."""
    manifest = build_manifest(root)
    (Path(root) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest_digest(manifest)


def verify_folder(root: Path, expected_digest: str, what: str) -> None:
    """Check a downloaded folder against its manifest and the expected digest; name the first mismatch."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactIntegrityError(f"{what}: no {MANIFEST_NAME} in the artifact")
    recorded = json.loads(manifest_path.read_text())
    if manifest_digest(recorded) != expected_digest:
        raise ArtifactIntegrityError(
            f"{what}: manifest digest {manifest_digest(recorded)} does not match the reference's {expected_digest}"
        )
    listed = {entry["path"] for entry in recorded["files"]}
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    if extra := sorted(present - listed):
        raise ArtifactIntegrityError(f"{what}: file {extra[0]} is not in the manifest")
    for entry in recorded["files"]:
        path = root / entry["path"]
        if not path.is_file():
            raise ArtifactIntegrityError(f"{what}: file {entry['path']} is missing")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ArtifactIntegrityError(
                f"{what}: file {entry['path']} has sha256 {actual}, manifest says {entry['sha256']} (tampered or corrupted)"
            )
