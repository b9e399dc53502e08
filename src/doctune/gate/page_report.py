"""The page gate's report: the decision, each model's summary, the rules, per-key accuracy, the paired comparison and a
few pages side by side, as `page_gate_report.md` and a self-contained `page_gate_report.html` (no external assets;
every model output escaped).

`write_report(folder, result)` takes this result dict (the scores as `doctune.gate.page_metrics` returns them):

    {
      "decision": "promote" | "reject",
      "version": str | int,                       # the candidate's version
      "models": {"candidate": str, "champion": str | None, "base": str},  # names or URIs; champion None before one
      "reference": "champion" | "base",           # the model the rules compared the candidate against
      "summaries": {"candidate": summarize(...), "champion": ..., "base": ...},  # those scored; candidate required
      "latency_goal_ms": float,                   # PageGateConfig.latency_goal_ms
      "rules": [{"rule", "value", "threshold", "passed", "why"}, ...],  # decide(...)[0]
      "failed": [str, ...],                       # decide(...)[1]
      "comparison": compare(candidate, reference pages) | None,
      "samples": [score_page(...) record of the candidate, ...],  # up to 5 shown; pick_samples picks them
    }
"""

from __future__ import annotations

import html
import json
import math
import random
from pathlib import Path

MARKDOWN_FILE, HTML_FILE = "page_gate_report.md", "page_gate_report.html"
MODEL_ORDER = ("candidate", "champion", "base")
SAMPLES = 5
RATE_ROWS = (
    ("json_validity", "JSON validity"),
    ("first_try_validity", "first-try JSON validity"),
    ("schema_conformance", "schema conformance"),
    ("field_accuracy_exact", "field accuracy (exact)"),
    ("field_accuracy_normalized", "field accuracy (normalised)"),
)
STYLE = (
    "body{font-family:sans-serif;max-width:1100px}td{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}"
    "pre{background:#f6f6f6;padding:4px;white-space:pre-wrap;word-break:break-all}"
)


class _Bold(str):
    """A table cell or paragraph shown in bold."""


def pick_samples(pages: list[dict], k: int = SAMPLES, seed: int = 0) -> list[dict]:
    """`k` page records drawn at random (the same draw for the same pages and seed), in id order."""
    chosen = random.Random(seed).sample(range(len(pages)), min(k, len(pages)))
    return sorted((pages[i] for i in chosen), key=lambda p: str(p["id"]))


def write_report(folder: Path, result: dict) -> None:
    """`page_gate_report.md` and `page_gate_report.html` in `folder` (made if missing) from `result` (see the module
    docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blocks = report_blocks(result)
    (folder / MARKDOWN_FILE).write_text(to_markdown(blocks), encoding="utf-8")
    (folder / HTML_FILE).write_text(to_html(blocks), encoding="utf-8")


# -- content ---------------------------------------------------------------------------------------------------------


def _ci(value: dict) -> str:
    """A rate with its 95% interval: "0.980 [0.953, 1.000]"."""
    if math.isnan(value["mean"]):
        return "n/a"
    if math.isnan(value["ci_low"]):
        return f"{value['mean']:.3f} (no interval from {value.get('n', 0)} page)"
    return f"{value['mean']:.3f} [{value['ci_low']:.3f}, {value['ci_high']:.3f}]"


def _signed_ci(value: dict) -> str:
    """A difference with its 95% interval: "+0.120 [+0.050, +0.190]"; the difference alone without an interval."""
    if math.isnan(value["mean"]):
        return "n/a"
    if math.isnan(value["ci_low"]):
        return f"{value['mean']:+.3f} (no interval from one page)"
    return f"{value['mean']:+.3f} [{value['ci_low']:+.3f}, {value['ci_high']:+.3f}]"


def _num(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f}"


def report_blocks(result: dict) -> list[tuple]:
    """The report as blocks: ("h", level, text), ("p", text), ("table", header, rows), ("pre", text)."""
    summaries, reference = result["summaries"], result["reference"]
    models = {name: result["models"].get(name) for name in MODEL_ORDER if name in summaries}
    blocks: list[tuple] = [
        ("h", 1, f"Page gate: {result['decision'].upper()} (candidate version {result['version']})"),
        ("p", _Bold(f"Decision: {result['decision']}. Failed rules: {', '.join(result['failed']) or 'none'}.")),
        ("p", f"The rules compared the candidate against the {reference} ({result['models'].get(reference) or 'n/a'})."),
        ("table", ["model", "name"], [[name, str(label)] for name, label in result["models"].items() if label]),
    ]
    blocks += _summary_blocks(summaries, models, result["latency_goal_ms"])
    blocks += [
        ("h", 2, "Rules"),
        ("table", ["rule", "outcome", "value", "threshold", "why"],
         [[r["rule"], "pass" if r["passed"] else _Bold("FAIL"), _num(r["value"]), _num(r["threshold"]), r["why"]]
          for r in result["rules"]]),
    ]  # fmt: skip
    blocks += _per_key_blocks(summaries, reference)
    blocks += _comparison_blocks(result.get("comparison"), reference)
    blocks += _sample_blocks(result.get("samples") or [])
    skipped = result.get("skipped") or []
    if skipped:
        blocks += [
            ("h", 2, f"Test pages left out ({len(skipped)})"),
            ("table", ["page", "reason"], [[item["id"], item["reason"]] for item in skipped]),
        ]
    return blocks


def _summary_blocks(summaries: dict, models: dict, goal_ms: float) -> list[tuple]:
    names = list(models)
    rows = [[label, *(_ci(summaries[n][key]) for n in names)] for key, label in RATE_ROWS]
    rows.append(["latency p50 (ms)", *(_ms(summaries[n]["latency_ms"]["p50"]) for n in names)])
    p95 = []
    for n in names:
        value = summaries[n]["latency_ms"]["p95"]
        p95.append(_ms(value) if math.isnan(value) else f"{_ms(value)} ({'meets' if value <= goal_ms else 'misses'} goal)")
    rows.append([f"latency p95 (ms), goal {goal_ms:g}", *p95])
    rows.append(["pages retried", *(str(summaries[n]["retried"]) for n in names)])
    rows.append(["pages", *(str(summaries[n]["n"]) for n in names)])
    return [
        ("h", 2, "Summary"),
        ("p", "Rates: mean [95% bootstrap interval over pages]. Valid JSON: the whole reply is one JSON object, after at "
         "most one retry, never repaired; first-try: without the retry. Latency is reported, not a rule."),
        ("table", ["metric", *names], rows),
    ]  # fmt: skip


def _per_key_blocks(summaries: dict, reference: str) -> list[tuple]:
    cand = summaries["candidate"]["per_key"]
    ref = (summaries.get(reference) or {}).get("per_key", {})
    keys = list(dict.fromkeys([*cand, *ref]))
    if not keys:
        return []
    rows = []
    for key in keys:
        c, r = cand.get(key), ref.get(key)
        diff = f"{c['normalized'] - r['normalized']:+.3f}" if c and r else ""
        rows.append([key, str((c or r)["n"]), _num(c["exact"], 3) if c else "", _num(c["normalized"], 3) if c else "",
                     _num(r["exact"], 3) if r else "", _num(r["normalized"], 3) if r else "", diff])  # fmt: skip
    header = ["key", "pages", "candidate exact", "candidate normalised", f"{reference} exact", f"{reference} normalised",
              "difference (normalised)"]  # fmt: skip
    return [("h", 2, f"Accuracy per key (candidate vs {reference})"), ("table", header, rows)]


def _comparison_blocks(comparison: dict | None, reference: str) -> list[tuple]:
    blocks: list[tuple] = [("h", 2, f"Paired comparison (candidate vs {reference})")]
    if not comparison or not comparison["n"]:
        return [*blocks, ("p", "Not compared: no pages scored by both.")]
    d = comparison["difference"]
    rows = [
        ["pages", str(comparison["n"])],
        ["candidate mean", _num(comparison["candidate_mean"], 3)],
        [f"{reference} mean", _num(comparison["reference_mean"], 3)],
        ["difference [95% paired bootstrap]", _signed_ci(d)],
        ["pages better / worse / tied", f"{comparison['wins']} / {comparison['losses']} / {comparison['ties']}"],
        ["p (candidate better, one-sided)", _num(comparison["p"])],
        ["p (candidate worse, one-sided)", _num(comparison["p_worse"])],
    ]
    if "min_p" in comparison:
        rows.append([f"smallest p {comparison['n']} pages allow (2^-n)", _num(float(comparison["min_p"]))])
    return [
        *blocks,
        ("p", "Per-page field accuracy (normalised), pages matched by id; p: paired sign-flip randomization test."),
        ("table", ["", ""], rows),
    ]


def _sample_blocks(samples: list[dict]) -> list[tuple]:
    if not samples:
        return []
    blocks: list[tuple] = [("h", 2, f"Sample pages ({min(len(samples), SAMPLES)})")]
    for page in samples[:SAMPLES]:
        problems = [page["error"]] if page.get("error") else page.get("violations") or []
        score = [[
            "yes" if page["valid_json"] else _Bold("no"), "yes" if page.get("retried") else "no",
            "yes" if page["conforms"] else _Bold("no"), _num(page["exact"], 3), _num(page["normalized"], 3),
            f"{page['seconds'] * 1000:.0f}", "; ".join(problems),
        ]]  # fmt: skip
        blocks += [
            ("h", 3, f"page {page['id']}"),
            ("table", ["valid JSON", "retried", "conforms", "exact", "normalised", "ms", "problems"], score),
            ("p", "reference:"),
            ("pre", _one_key_a_line(page["reference"])),
        ]
        if page.get("first_reply") is not None:
            blocks += [("p", "candidate's first reply (invalid):"), ("pre", page["first_reply"])]
        blocks += [("p", "candidate reply:"), ("pre", page["reply"])]
    return blocks


def _one_key_a_line(fields: dict) -> str:
    lines = [f"  {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in fields.items()]
    return "{\n" + ",\n".join(lines) + "\n}" if lines else "{}"


# -- rendering -------------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    cell = " ".join(str(text).split()).replace("|", "\\|")
    return f"**{cell}**" if isinstance(text, _Bold) else cell


def _fence(text: str) -> str:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def to_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + block[2], ""]
        elif kind == "p":
            lines += [_md_cell(block[1]), ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "pre":
            fence = _fence(block[1])
            lines += [fence, block[1], fence, ""]
    return "\n".join(lines)


def _html_text(text: str) -> str:
    escaped = html.escape(str(text))
    return f"<b>{escaped}</b>" if isinstance(text, _Bold) else escaped


def to_html(blocks: list[tuple]) -> str:
    out: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{_html_text(block[1])}</p>")
        elif kind == "table":
            header, rows = block[1], block[2]
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{_html_text(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</table>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(block[1])}</pre>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Page gate report</title><style>{STYLE}</style></head>"
        "<body>\n" + "\n".join(out) + "\n</body></html>\n"
    )
