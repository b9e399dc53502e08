"""Where benchmarks put their results: bench/results/<name>.json and <name>.md, also printed."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(folder: Path, name: str, result: dict, markdown_lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / f"{name}.md").write_text("\n".join(markdown_lines) + "\n")
    print("\n".join(markdown_lines))
