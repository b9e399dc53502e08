"""Retriever: the embedding model fine-tuned on the synthetic (question, source chunk) pairs, compared with ranx.

Training pairs are the SFT training split's questions and the chunks that hold their answers; synth's splits keep
eval chunks and eval questions out of it, and hard negatives come only from chunks training already sees. Each pair
gets the chunks the base retriever ranks highest for its question that do not hold the answer's evidence (never
its own chunk). MultipleNegativesRankingLoss contrasts each question with its positive, its hard negatives and every
other passage in the batch; batches hold no duplicate texts, so no positive serves as another pair's negative.
sentence-transformers' own miner is not used: it cannot tell a chunk that holds the answer from one that does not.

The golden questions, over the whole corpus as serving searches it, compare the base embedder, the tuned one, BM25
and the hybrid of tuned and BM25 (reciprocal rank fusion): MRR@10, Recall@1/5/10, NDCG@10, and ranx's paired
Fisher randomization test between every pair. The stage hands on the tuned model, an index of the selected
retriever (its chunk vectors, mode and chunk ids) and the report.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from doctune.artifacts import ArtifactRef, build_manifest, manifest_digest
from doctune.config import RetrieverConfig, RunConfig
from doctune.config.retriever import RANKING_METRICS, RETRIEVERS
from doctune.devices import cuda_available
from doctune.models import resolve_embedder
from doctune.records import (
    CHUNKS_FILE,
    EMBEDDINGS_FILE,
    GOLDEN_FILE,
    INDEX_FILE,
    PAGES_FILE,
    RETRIEVER_REPORT_FILE,
    TRAIN_FILE,
    UNSOURCED_FORMS,
    VALIDATION_FILE,
    eval_item,
    read_jsonl,
    read_parquet,
    read_records,
    skip,
)
from doctune.retrieval import ChunkIndex, compare_retrievers, ranx_runs, retrieval_mode
from doctune.tracking import StageRun

MIN_SELECTION_QUESTIONS = 10  # fewer validation questions than this: the selection falls back to the golden ones
MODES = {"base": "dense", "tuned": "dense", "bm25": "lexical", "hybrid": "hybrid"}


@dataclass(frozen=True)
class Pair:
    question: str
    chunk_id: str
    evidence: str  # the span the answer comes from; a chunk holding it is no negative


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def training_pairs(records: list[dict], chunk_ids: set[str], path: Path, skipped: list[dict]) -> list[Pair]:
    """One (question, source chunk) pair per distinct question of the SFT records; rehearsal chats and served
    questions have no source chunk."""
    pairs, seen = [], set()
    for record in records:
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        if meta.get("form") in UNSOURCED_FORMS:
            continue
        question, chunk_id = meta.get("question"), meta.get("chunk_id")
        if not isinstance(question, str) or not question.strip() or not isinstance(chunk_id, str):
            skip(skipped, path, record, "no meta.question and meta.chunk_id: not a (question, source chunk) pair")
            continue
        if chunk_id not in chunk_ids:
            skip(skipped, path, record, f"meta.chunk_id {chunk_id!r} is not a chunk of this corpus")
            continue
        if (question, chunk_id) in seen:
            continue  # the same question as an abstention record
        seen.add((question, chunk_id))
        evidence = meta.get("evidence") or meta.get("withheld_answer") or ""
        pairs.append(Pair(question, chunk_id, evidence if isinstance(evidence, str) else ""))
    return pairs


def training_chunks(records: list[dict]) -> set[str]:
    """Chunks the SFT data already shows a model: its source chunks and retrieved contexts (never eval chunks)."""
    seen = set()
    for record in records:
        meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
        contexts = meta.get("context_chunk_ids")
        for value in [meta.get("chunk_id"), *(contexts if isinstance(contexts, list) else [])]:
            if isinstance(value, str):
                seen.add(value)
    return seen


def mine_hard_negatives(
    index: ChunkIndex, pairs: list[Pair], chunk_ids: list[str], texts: list[str], allowed: set[str], count: int, depth: int
) -> list[list[int]]:
    """Per pair, up to `count` chunk indices the index ranks highest for the question, among `allowed` chunks,
    that are not its source chunk, do not repeat its text and do not hold its evidence."""
    if count == 0 or not pairs:
        return [[] for _ in pairs]
    position = {cid: i for i, cid in enumerate(chunk_ids)}
    normal = [_normal(t) for t in texts]
    ranked, _ = index.search([p.question for p in pairs], depth)
    out = []
    for pair, row in zip(pairs, ranked):
        source = position[pair.chunk_id]
        evidence = _normal(pair.evidence)
        holds = re.compile(rf"(?<!\w){re.escape(evidence)}(?!\w)") if evidence else None  # "3" is not in "30"
        negatives = []
        for i in (int(i) for i in row):
            if i == source or chunk_ids[i] not in allowed or normal[i] == normal[source]:
                continue
            if holds is not None and holds.search(normal[i]):
                continue  # holds the answer too: a false negative
            negatives.append(i)
            if len(negatives) == count:
                break
        out.append(negatives)
    return out


def train_embedder(
    base: Path,
    pairs: list[Pair],
    negatives: list[list[int]],
    texts: list[str],
    position: dict[str, int],
    cfg: RetrieverConfig,
    out: Path,
) -> dict:
    """Fine-tune with MultipleNegativesRankingLoss (inside MatryoshkaLoss when dims are set); saves to `out`.
    Pairs with fewer mined negatives than configured are left out (counted), unless too few are left to form a
    batch: then every pair trains on in-batch negatives alone."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    device = "cuda" if cuda_available() else "cpu"
    full, count = [(p, n) for p, n in zip(pairs, negatives) if len(n) == cfg.hard_negatives], cfg.hard_negatives
    if len(full) < 2:  # a corpus too small to mine from: in-batch negatives only
        full, count = [(p, []) for p in pairs], 0
    rows = {"anchor": [p.question for p, _ in full], "positive": [texts[position[p.chunk_id]] for p, _ in full]}
    for k in range(count):
        rows[f"negative_{k + 1}"] = [texts[n[k]] for _, n in full]
    dataset = Dataset.from_dict(rows)
    batch = min(cfg.batch_size, len(dataset))
    while True:
        model = SentenceTransformer(str(base), device=device)
        model.max_seq_length = cfg.max_seq_length
        loss = MultipleNegativesRankingLoss(model)
        if cfg.matryoshka_dims:
            loss = MatryoshkaLoss(model, loss, matryoshka_dims=cfg.matryoshka_dims)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(out.parent / "trainer"),
            num_train_epochs=cfg.epochs,
            per_device_train_batch_size=batch,
            learning_rate=cfg.learning_rate,
            warmup_ratio=cfg.warmup_ratio,
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            seed=cfg.seed,
            data_seed=cfg.seed,
            save_strategy="no",
            logging_steps=1,
            report_to="none",
            disable_tqdm=True,
            use_cpu=device == "cpu",
            dataloader_drop_last=len(dataset) > batch,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
        trainer.train()
        # A small corpus asks the same few chunks again and again: no batch of that many pairs without a repeated
        # passage (an in-batch "negative" that is the positive) can be drawn, and no step is taken. Smaller batches.
        if trainer.state.global_step > 0 or (batch <= 2 and count == 0):
            break
        if batch > 2:
            print(f"retriever: no batch of {batch} pairs with distinct passages; trying {batch // 2}", flush=True)
            batch //= 2
        else:  # the mined negatives repeat each other's positives: in-batch negatives only
            print("retriever: no batch without a repeated passage; training on in-batch negatives only", flush=True)
            dataset = dataset.remove_columns([f"negative_{k + 1}" for k in range(count)])
            count, batch = 0, min(cfg.batch_size, len(dataset))
    model.save(str(out))
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return {
        "pairs": len(full),
        "hard_negatives": count,
        "without_negatives": len(pairs) - len(full),
        "steps": trainer.state.global_step,
        "batch_size": batch,
        "losses": losses,
    } | ({"not_trained": "no batch of two pairs with distinct passages could be drawn"} if trainer.state.global_step == 0 else {})


def selected(cfg: RetrieverConfig, metrics: dict[str, dict[str, float]]) -> str:
    """The configured retriever, or the first of RETRIEVERS (simplest first) with the highest select_metric; the
    base embedder when nothing was measured."""
    if cfg.select != "best":
        return cfg.select
    if not metrics:
        return "base"
    best = max(metrics[name][cfg.select_metric] for name in RETRIEVERS)
    return next(name for name in RETRIEVERS if math.isclose(metrics[name][cfg.select_metric], best, abs_tol=1e-12))


def folder_digest(folder: Path) -> str:
    return manifest_digest(build_manifest(folder))


def report_markdown(report: dict) -> str:
    comparison, training = report["comparison"], report["training"]
    lines = ["# Retriever", ""]
    if "not_trained" in training:
        lines.append(f"Not trained ({training['not_trained']}): the tuned model is the base embedder.")
    else:
        batches = f" in batches of {training['batch_size']}" if "batch_size" in training else ""
        lines.append(
            f"Trained on {training['pairs']} (question, source chunk) pairs with {training['hard_negatives']} mined hard "
            f"negative(s) each ({training['without_negatives']} pairs left out: too few negatives), {training['steps']} "
            f"steps{batches}. Hard negatives were mined {report['mining']['mode']} ({report['mining']['why']})."
        )
    lines.append("")
    if not comparison["metrics"]:
        lines.append(f"Not measured: no usable golden question. Selected: {report['selected']}.")
    else:
        lines += [
            f"Measured on {comparison['queries']} golden questions (qrels: their source chunks) over {report['chunks']} "
            f"chunks; selected by {report['select_metric']} on {report['selected_on']['n']} "
            f"{report['selected_on']['questions']} questions.",
            "",
            "| retriever | " + " | ".join(RANKING_METRICS) + " |",
            "|---|" + "---:|" * len(RANKING_METRICS),
        ]
        for name, row in comparison["metrics"].items():
            mark = " (selected)" if name == report["selected"] else ""
            lines.append(f"| {name}{mark} | " + " | ".join(f"{row[m]:.3f}" for m in RANKING_METRICS) + " |")
        lines += ["", "Paired Fisher randomization test (ranx), p-values:", "", "| pair | " + " | ".join(RANKING_METRICS) + " |"]
        lines.append("|---|" + "---:|" * len(RANKING_METRICS))
        for pair, row in comparison["p_values"].items():
            lines.append(f"| {pair} | " + " | ".join(f"{row[m]:.4f}" for m in RANKING_METRICS) + " |")
    if report["skipped"]:
        lines += ["", f"{len(report['skipped'])} record(s) skipped:", ""]
        lines += [
            f"- {s['file']}{'' if s['line'] is None else ' line ' + str(s['line'])}: {s['reason']}"
            for s in report["skipped"][:50]
        ]
    return "\n".join(lines) + "\n"


def run(config: RunConfig, inputs: dict[str, ArtifactRef], tracker: StageRun) -> dict[str, ArtifactRef]:
    cfg = config.retriever
    cache = config.project.workdir / "cache"
    chunks = read_parquet(tracker.fetch(inputs["chunks"]) / CHUNKS_FILE)
    chunk_ids, texts = [c["chunk_id"] for c in chunks], [c["text"] for c in chunks]
    position = {cid: i for i, cid in enumerate(chunk_ids)}
    languages = {p["lang"] for p in read_parquet(tracker.fetch(inputs["pages"]) / PAGES_FILE) if p.get("lang")} - {"und"}
    skipped: list[dict] = []
    sft_path = tracker.fetch(inputs["sft"]) / TRAIN_FILE
    records = read_jsonl(sft_path, skipped)
    pairs = training_pairs(records, set(chunk_ids), sft_path, skipped)
    golden_path = tracker.fetch(inputs["golden"]) / GOLDEN_FILE
    seen = training_chunks(records)
    golden = []
    for item in read_records(golden_path, eval_item, skipped):
        sources = set(item.source_ids) & set(position)
        if not sources:
            skipped.append({"file": GOLDEN_FILE, "line": None, "reason": f"{item.question!r}: no source chunk in the corpus"})
        elif sources & seen:
            skipped.append({"file": GOLDEN_FILE, "line": None, "reason": f"{item.question!r}: its source chunk is in training"})
        else:
            golden.append(item)
    if not golden:
        print("retriever: no usable golden question: the retrievers are not compared and the base embedder is kept", flush=True)

    # Questions to select a retriever on, apart from the golden ones it is reported on: SFT validation pairs.
    validation_path = tracker.fetch(inputs["sft"]) / VALIDATION_FILE
    validation_records = read_jsonl(validation_path, skipped) if validation_path.is_file() else []
    trained_sources = {p.chunk_id for p in pairs}
    validation = [
        p for p in training_pairs(validation_records, set(chunk_ids), validation_path, skipped)
        if p.chunk_id not in trained_sources
    ]  # fmt: skip
    negatives_pool = seen - {p.chunk_id for p in validation}

    mode, why = retrieval_mode(config.retrieval.mode, config.retrieval.embedding_model, languages)
    spec = config.retrieval.embedding_model
    base = ChunkIndex(texts, spec, cache, mode=mode)
    negatives = mine_hard_negatives(base, pairs, chunk_ids, texts, negatives_pool, cfg.hard_negatives, cfg.mining_depth)
    with tempfile.TemporaryDirectory(prefix="doctune-retriever-") as tmp:
        model_dir = Path(tmp) / "model"
        if len(pairs) >= 2:
            training = train_embedder(resolve_embedder(spec, cache), pairs, negatives, texts, position, cfg, model_dir)
        else:  # the base embedder is handed on unchanged, and the report says why
            reason = f"{len(pairs)} (question, source chunk) pair(s) in the SFT training data: too few to train on"
            print(f"retriever: not trained: {reason}", flush=True)
            shutil.copytree(resolve_embedder(spec, cache), model_dir)
            training = {"pairs": 0, "hard_negatives": 0, "without_negatives": len(pairs), "steps": 0, "losses": [],
                        "not_trained": reason}  # fmt: skip
        tuned = ChunkIndex(texts, str(model_dir), cache, mode="hybrid", identity=folder_digest(model_dir))
        searches = {name: (base if name == "base" else tuned, mode) for name, mode in MODES.items()}

        def measured(items: list[tuple[str, set[str]]]) -> dict:
            query_ids = [f"q{i}" for i in range(len(items))]
            qrels = {q: {c: 1 for c in sources} for q, (_, sources) in zip(query_ids, items)}
            runs = ranx_runs(searches, [question for question, _ in items], query_ids, chunk_ids)
            return compare_retrievers(qrels, runs, list(RANKING_METRICS), seed=cfg.seed)

        comparison = measured([(item.question, set(item.source_ids) & set(position)) for item in golden])
        if len(validation) >= MIN_SELECTION_QUESTIONS:
            selection, selected_on = measured([(p.question, {p.chunk_id}) for p in validation]), "validation"
        else:  # too few validation questions: selected on the questions it is reported on (optimistic for the selected)
            selection, selected_on = comparison, "golden"
        chosen = selected(cfg, selection["metrics"])

        index_dir = Path(tmp) / "index"
        index_dir.mkdir()
        uses_tuned = chosen in ("tuned", "hybrid")  # BM25 needs no embedder: the base one stands in
        np.save(index_dir / EMBEDDINGS_FILE, (tuned if uses_tuned else base).vectors)
        index = {
            "retriever": chosen,
            "mode": MODES[chosen],
            "embedder": "model" if uses_tuned else spec,
            "chunk_ids": chunk_ids,
            "chunks_digest": inputs["chunks"].digest,
        }
        (index_dir / INDEX_FILE).write_text(json.dumps(index))
        report = {
            "selected": chosen,
            "select_metric": cfg.select_metric,
            "selected_on": {"questions": selected_on, "n": selection["queries"], "metrics": selection["metrics"]},
            "chunks": len(chunks),
            "comparison": comparison,
            "training": {k: v for k, v in training.items() if k != "losses"},
            "mining": {"mode": mode, "why": why},
            "settings": cfg.model_dump(mode="json"),
            "skipped": skipped,
        }
        report_dir = Path(tmp) / "report"
        report_dir.mkdir()
        (report_dir / RETRIEVER_REPORT_FILE).write_text(json.dumps(report, indent=1))
        (report_dir / "retriever_report.md").write_text(report_markdown(report))
        for step, value in training["losses"]:
            tracker.log_metrics({"retriever.loss": value}, step=step)
        tracker.log_metrics(
            {
                f"retriever.{name}.{m.replace('@', '_at_')}": v
                for name, row in comparison["metrics"].items()
                for m, v in row.items()
            }
            | {"retriever.pairs": training["pairs"], "retriever.golden": len(golden)}
        )
        tracker.set_tags({"doctune.retriever.selected": chosen})
        return {
            "model": tracker.log_output("model", model_dir, kind="embedding_model"),
            "index": tracker.log_output("index", index_dir, kind="chunk_index"),
            "report": tracker.log_output("report", report_dir, kind="retriever_report"),
        }
