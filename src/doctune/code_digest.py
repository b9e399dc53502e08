"""The code a stage's result depends on: its module and every doctune module it imports, transitively.

A stage's cache key, its synth resume key and its training checkpoint key use this digest, so editing a module the
stage does not use (the CLI, the README, another stage) leaves its earlier results reusable.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "doctune"
_ROOT = Path(__file__).resolve().parent


def _module_file(module: str, root: Path) -> Path | None:
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(path: Path, module: str) -> set[str]:
    """doctune modules named by the import statements of one file (function-level imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from doctune.x import submodule`
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def module_closure(module: str, root: Path = _ROOT) -> list[Path]:
    """The files of `module` and of every doctune module it imports, directly or not, with their packages'
    __init__ files and shipped data folders; sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [p for p in parents if p not in seen]
        todo += [m for m in _imports(path, name) if m not in seen]
    files = set(seen.values())
    for path in seen.values():  # shipped data (prompts, probes, texts) shapes results like code does
        data = path.parent / "data"
        if path.name == "__init__.py" and data.is_dir():
            files |= {p for p in data.rglob("*") if p.is_file()}
    return sorted(files)


def code_digest(module: str, root: Path = _ROOT) -> str:
    """sha256 over the source files `module` depends on (paths relative to the package root, then bytes)."""
    return _digest(module, root)


@cache
def _digest(module: str, root: Path) -> str:
    digest = hashlib.sha256()
    for path in module_closure(module, root):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
