"""The gate report: every metric per model with the rule outcomes, charts, and answers side by side (markdown + HTML)."""

from __future__ import annotations

import html
import math
from pathlib import Path

CHART_METRICS = ("golden_f1", "golden_rouge_l", "abstention_accuracy", "capability_accuracy", "format_compliance",
                 "domain_perplexity", "general_perplexity")  # fmt: skip


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _ci(mean: float, ci: dict | None, digits: int = 3) -> str:
    """A mean with its 95% interval: "0.298 [0.251, 0.344]"."""
    if not ci or math.isnan(ci["ci_low"]):  # no items, no interval
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{ci['ci_low']:.{digits}f}, {ci['ci_high']:.{digits}f}]"


def _signed(diff: dict) -> str:
    return f"{diff['mean']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"


LABELS = {"golden_f1": "golden F1 (RAG)", "closed_book_f1": "golden F1 (closed book)", "production_f1": "production F1"}
BREAKDOWN_TITLES = {"qtype": "question type", "lang": "language", "document": "document"}
MAX_DOCUMENT_ROWS = 30  # a corpus of many manuals: the documents with most items; the JSON has them all


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
        values = [models[n]["metrics"][metric] for n in names]
        intervals = [models[n].get("intervals", {}).get(metric) for n in names]
        errors = None
        if all(intervals):  # whiskers: the 95% interval around each mean
            errors = [[max(v - ci["ci_low"], 0) for v, ci in zip(values, intervals)],
                      [max(ci["ci_high"] - v, 0) for v, ci in zip(values, intervals)]]  # fmt: skip
        ax.bar(range(len(names)), values, yerr=errors, capsize=3, color="C0")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def verdict_lines(result: dict) -> list[str]:
    """The decision, why, and what to do about it."""
    decision = result["decision"]
    lines = [f"# Gate: **{decision.upper()}** (candidate version {result['version']})", ""]
    if decision == "insufficient-evidence":
        lines += ["The eval sets are too small to tell whether the candidate is better: it is not promoted, and the "
                  "version is recorded like a rejection.", "", f"Why: {result.get('reason', '')}", ""]  # fmt: skip
    lines += [
        f"Failed rules: {', '.join(result['failed']) or 'none'}. Champion: {result['champion_label']}.",
        f"Transformers models scored in {result.get('precision', 'fp32')}; GGUF variants in llama.cpp.",
    ]
    return lines


def evidence_lines(result: dict) -> list[str]:
    """What the eval sets can detect (one-sided paired test, 80% power) against what the gate needs, and the
    candidate's paired F1 differences."""
    evidence, diffs = result.get("evidence"), result.get("f1_differences", {})
    if not evidence:
        return []
    lines = ["", "## What the eval sets can detect", "",
             "The smallest true candidate-vs-base difference each set finds with 80% power (one-sided paired test at "
             "alpha; citation precision: the shortfall below the champion's floor); the gate needs it at or below the "
             "margin.", "",
             "| set | items | detectable difference | margin | enough |", "|---|---:|---:|---:|---|"]  # fmt: skip
    for key, e in evidence.items():
        label = {"golden_f1": "golden F1 (RAG)", "abstention": "abstention (unanswerable)",
                 "citation_precision": "citation precision (candidate's citations)"}.get(key, key)  # fmt: skip
        enough = "not checked" if not e.get("checked", True) else "yes" if e["sufficient"] else "**no**"
        lines.append(f"| {label} | {e['n']} | {e['detectable']:.3f} | {e['margin']:g} | {enough} |")
    if diffs:
        lines += ["", "Golden F1 (RAG) differences per item, mean [95% paired bootstrap interval]:", ""]
        lines += [f"- {pair}: {_signed(d)} over {d['n']} items" for pair, d in diffs.items()]
    return lines


def metric_table(models: dict[str, dict]) -> list[str]:
    """Every metric of every model: mean [95% bootstrap interval] and the number of items it rests on."""
    names = list(models)
    metrics = list(next(iter(models.values()))["metrics"])
    lines = ["", "## Metrics", "", "Mean [95% bootstrap interval over items]; n: items per model.", "",
             "| metric | n | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]  # fmt: skip
    for m in metrics:
        intervals = [models[n].get("intervals", {}).get(m) for n in names]
        count = next((ci["n"] for ci in intervals if ci), "")
        cells = [_ci(models[n]["metrics"][m], ci) if ci else _fmt(models[n]["metrics"][m]) for n, ci in zip(names, intervals)]
        lines.append(f"| {LABELS.get(m, m)} | {count} | " + " | ".join(cells) + " |")
    reused = [n for n in names if models[n].get("cached")]
    if reused:
        lines += ["", f"Scores reused from an earlier scoring of the same model files on the same sets: {', '.join(reused)}."]
    return lines


def closed_book_lines(result: dict) -> list[str]:
    """Closed-book vs RAG F1 on the same golden items: what the model knows itself, what retrieval adds."""
    rows = result.get("closed_book_vs_rag") or {}
    if not rows:
        return []
    lines = ["", "## Closed book vs RAG (golden F1 on the same items)", "",
             "| model | n | closed book | RAG | RAG - closed book |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in rows.items():
        closed, rag = row["closed_book"], row["rag"]
        lines.append(f"| {name} | {closed['n']} | {_ci(closed['mean'], closed)} | {_ci(rag['mean'], rag)} | "
                     f"{_signed(row['gain'])} |")  # fmt: skip
    return lines


def abstention_bound_lines(result: dict) -> list[str]:
    """The abstention threshold per model with its stated bound, and what it did on the test split."""
    rows = result.get("abstention_bound") or {}
    if not rows:
        return []
    first = next(iter(rows.values()))
    rate = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731  (no test items)
    lines = ["", f"## Abstention with a stated bound (hallucination rate <= {first['alpha']:g} with confidence "
             f"{first['confidence']:g})", "",
             f"The threshold is set on {first['calibration_items']} unanswerable items (at least "
             f"{first['items_needed']} are needed to state the bound), tested on {first['test_items']} others; the "
             f"answer rate and F1 are over all {first['answered_items']} answerable items. The model declines when its "
             "mean log-probability of the abstention sentence as the reply reaches the threshold (never: its own "
             "abstentions meet the bound; always: too few items to state it).", "",
             "| model | threshold | hallucination rate (test) [95% exact] | without threshold | answer rate | "
             "without threshold | F1 at threshold |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, b in rows.items():
        low, high = b["hallucination_ci"]
        lines.append(f"| {name} | {_fmt(b['threshold'])} | {rate(b['hallucination_rate'])} [{low:.3f}, {high:.3f}] | "
                     f"{rate(b['raw_hallucination_rate'])} | {rate(b['answer_rate'])} | {rate(b['raw_answer_rate'])} | "
                     f"{rate(b['f1_at_threshold'])} |")  # fmt: skip
    return lines


def breakdown_lines(result: dict) -> list[str]:
    """Golden RAG F1 per question type, and per language and per document where there is more than one."""
    lines = []
    for label, groups in (result.get("breakdowns") or {}).items():
        if label != "qtype" and len(groups) < 2:
            continue
        rows = sorted(groups.items(), key=lambda kv: -kv[1]["n"])
        title = BREAKDOWN_TITLES.get(label, label)
        lines += ["", f"## Golden F1 (RAG) per {title}", ""]
        if label == "document" and len(rows) > MAX_DOCUMENT_ROWS:
            lines += [f"The {MAX_DOCUMENT_ROWS} documents with the most items of {len(rows)}.", ""]
            rows = rows[:MAX_DOCUMENT_ROWS]
        lines += [f"| {title} | n | candidate | base |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {g['n']} | {_ci(g['candidate'], g)} | {g['reference']:.3f} |" for name, g in rows]
    return lines


def judge_lines(result: dict) -> list[str]:
    """The pairwise judge's win rate of the candidate against the champion, per set."""
    j = result.get("judge")
    if not j:
        return []
    lines = ["", f"## Pairwise judge ({j['model']} at {j['base_url']}) vs {j['against']}", "",
             "Each pair judged twice, A/B swapped; a verdict stands where both orders agree, otherwise a tie. Win "
             "rate = (wins + ties / 2) / items [95% bootstrap interval]; raw verdicts in judge_verdicts.jsonl.", "",
             "| set | items | wins | losses | ties | unusable | win rate |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in [*j["sets"].items(), ("all", j["overall"])]:
        if row["win_rate"] is not None:
            rate = row["win_rate"]
            lines.append(f"| {name} | {row['n']} | {row['wins']} | {row['losses']} | {row['ties']} | {row['unusable']} | "
                         f"{_ci(rate['mean'], rate)} |")  # fmt: skip
    return lines


def citation_lines(result: dict) -> list[str]:
    """Per model: how many passages it cited on the golden set, how many of them hold the answer, and how many
    answers cite a passage that does."""
    models = {n: m for n, m in result["models"].items() if "citations_made" in m.get("per_example", {})}
    if not models:
        return []
    lines = ["", "## Citations (golden set, checked against the passages that hold the answer; no judge)", "",
             "Precision: cited passages that hold the answer span, over all passages cited. Recall: answers that cite "
             "a passage holding their answer [95% bootstrap interval].", *first_passage_line(result), "",
             "| model | answers | passages cited | holding the answer | precision | recall |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in models.items():
        pe, recall = m["per_example"], m.get("intervals", {}).get("citation_recall")
        lines.append(f"| {name} | {len(pe['citations_made'])} | {sum(pe['citations_made']):.0f} | "
                     f"{sum(pe['citations_supported']):.0f} | {m['metrics']['citation_precision']:.3f} | "
                     f"{_ci(m['metrics']['citation_recall'], recall)} |")  # fmt: skip
    return lines


def first_passage_line(result: dict) -> list[str]:
    share = result.get("citation_first_passage")
    if share is None:
        return []
    return ["", f"Citing passage [1] every time would score precision and recall {share:.3f}: the first passage holds "
            "the answer of that share of the items (retrieval ranks the source first), so only a model above it "
            "reads its passages to cite."]  # fmt: skip


def production_lines(result: dict) -> list[str]:
    n = (result.get("items") or {}).get("production", 0)
    if not n:
        return []
    return ["", f"## Production set ({n} relabeled served failures, never trained on)", "",
            "Questions users asked `doctune serve`, answered badly, relabeled by a person and held out by synth; the "
            "production F1 row of the metrics table scores every model against the labeled answers."]  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        *verdict_lines(result),
        *evidence_lines(result),
        *metric_table(result["models"]),
        *closed_book_lines(result),
        *citation_lines(result),
        *production_lines(result),
        *judge_lines(result),
        *abstention_bound_lines(result),
        *breakdown_lines(result),
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
    metrics = list(next(iter(retrieval["metrics"].values()), {}))
    lines += [
        "",
        f"## Retrieval ({retrieval['queries']} golden questions, qrels = their source chunks; from the {retrieval['source']})",
        "",
    ]
    lines += ["| retriever | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)] if metrics else ["Not measured."]
    for name, row in retrieval["metrics"].items():
        mark = " (selected)" if name == retrieval.get("selected") else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + " |")
    if retrieval.get("p_values"):
        lines += ["", "Paired Fisher randomization test (ranx), p-values:", "", "| pair | " + " | ".join(metrics) + " |"]
        lines += ["|---|" + "---:|" * len(metrics)]
        lines += [
            f"| {pair} | " + " | ".join(f"{row[m]:.4f}" for m in metrics) + " |" for pair, row in retrieval["p_values"].items()
        ]
    if result.get("charts"):
        lines += ["", "## Charts", "", *(f"![{c}]({c})" for c in result["charts"])]
    if result["samples"]:
        lines += ["", "## Answers side by side", ""]
        for sample in result["samples"]:
            lines += [f"**Q:** {sample['question']}", "", f"- reference: {sample['reference']}"]
            lines += [f"- {name}: {answer}" for name, answer in sample["answers"].items()]
            lines += [f"- {name}, closed book: {answer}" for name, answer in sample.get("closed_book", {}).items()]
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
