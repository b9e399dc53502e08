"""The gate report: every metric per model with the rule outcomes, charts, and answers side by side (markdown + HTML)."""

from __future__ import annotations

import html
from pathlib import Path

CHART_METRICS = ("golden_f1", "golden_rouge_l", "abstention_accuracy", "capability_accuracy", "format_compliance",
                 "domain_perplexity", "general_perplexity")  # fmt: skip


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def loss_curves(histories: dict[str, list[tuple[int, float]]], path: Path) -> bool:
    """One line per training stage; False when no stage logged a loss."""
    histories = {k: v for k, v in histories.items() if v}
    if not histories:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(4 * len(histories), 3), squeeze=False)
    for ax, (stage, points) in zip(axes[0], histories.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_title(f"{stage} training loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def metric_bars(models: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CHART_METRICS), figsize=(3 * len(CHART_METRICS), 3))
    names = list(models)
    for ax, metric in zip(axes, CHART_METRICS):
        ax.bar(range(len(names)), [models[n]["metrics"][metric] for n in names], color="C0")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict) -> str:
    models = result["models"]
    names = list(models)
    metrics = list(next(iter(models.values()))["metrics"])
    lines = [
        f"# Gate: **{result['decision'].upper()}** (candidate version {result['version']})",
        "",
        f"Failed rules: {', '.join(result['failed']) or 'none'}. Champion: {result['champion_label']}.",
        f"Transformers models scored in {result.get('precision', 'fp32')}; GGUF variants in llama.cpp.",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        *(f"| {m} | " + " | ".join(_fmt(models[n]["metrics"][m]) for n in names) + " |" for m in metrics),
        "",
        "## Rules",
        "",
        "| rule | outcome | value | threshold | |",
        "|---|---|---:|---:|---|",
        *(
            f"| {r['name']} | {'pass' if r['passed'] else '**FAIL**'} | {_fmt(r['value'])} | {_fmt(r['threshold'])} | "
            f"{r['detail']} |"
            for r in result["rules"]
        ),
    ]
    quantized = result.get("quantized", {})
    if quantized:
        lines += [
            "",
            "## Quantized variants (vs merged)",
            "",
            "| variant | MiB | perplexity ratio | tokens/s |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {v} | {r['size_bytes'] / 2**20:.1f} | {r['perplexity_ratio']:.4f} | {r['tokens_per_s']:.1f} |"
                  for v, r in quantized.items()]  # fmt: skip
    retrieval = result["retrieval"]
    lines += ["", f"## Retrieval ({retrieval['queries']} golden questions, qrels = their source chunks)", ""]
    lines += ["| retriever | " + " | ".join(next(iter(retrieval["metrics"].values()))) + " |"]
    lines += ["|---|" + "---:|" * len(next(iter(retrieval["metrics"].values())))]
    lines += [f"| {name} | " + " | ".join(f"{v:.4f}" for v in row.values()) + " |" for name, row in retrieval["metrics"].items()]
    if "fisher_p" in retrieval:
        lines += [
            "",
            "Fisher randomization test p-values: " + ", ".join(f"{m} {p:.4f}" for m, p in retrieval["fisher_p"].items()),
        ]
    if result.get("charts"):
        lines += ["", "## Charts", "", *(f"![{c}]({c})" for c in result["charts"])]
    if result["samples"]:
        lines += ["", "## Answers side by side", ""]
        for sample in result["samples"]:
            lines += [f"**Q:** {sample['question']}", "", f"- reference: {sample['reference']}"]
            lines += [f"- {name}: {answer}" for name, answer in sample["answers"].items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def to_html(text: str) -> str:
    """The markdown report as a standalone HTML page (tables, headings, images, lists)."""
    out, table = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-:") for c in cells):
                continue
            if not table:
                out.append("<table>")
                table = True
            out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if table:
            out.append("</table>")
            table = False
        if line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            out.append(f'<img src="{html.escape(src)}" alt="{html.escape(src)}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if table:
        out.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:1100px}td{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>\n"
        + "\n".join(out)
        + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    escaped = html.escape(text)
    parts = escaped.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
