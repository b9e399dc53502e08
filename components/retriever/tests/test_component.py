"""The retriever component's Python function, fed the ingest and synth components' output as the pipeline would."""

from __future__ import annotations

import json

from doctune.artifacts import refs_from_json
from doctune.records import INDEX_FILE, RETRIEVER_REPORT_FILE
from doctune.tracking import Tracker
from doctune_kfp.components.ingest.component import ingest
from doctune_kfp.components.retriever.component import retriever
from doctune_kfp.components.synth.component import synth


def test_retriever_component_tunes_the_embedder_and_compares_four_retrievers(make_config, small_corpus, call_component):
    config = make_config(small_corpus, **{"retriever.epochs": 1, "retriever.max_seq_length": 32, "retriever.select": "tuned"})
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("component-test")
    documents = call_component(ingest, config=config.to_yaml(), parent_run_id=parent)
    data = call_component(synth, config=config.to_yaml(), parent_run_id=parent, documents=documents)
    refs = refs_from_json(
        call_component(retriever, config=config.to_yaml(), parent_run_id=parent, datasets=data, documents=documents)
    )
    assert set(refs) == {"model", "index", "report"}
    report = json.loads((tracker.fetch(refs["report"]) / RETRIEVER_REPORT_FILE).read_text())
    assert list(report["comparison"]["metrics"]) == ["base", "tuned", "bm25", "hybrid"]
    assert len(report["comparison"]["p_values"]) == 6 and report["selected"] == "tuned"
    assert report["training"]["pairs"] > 0 and report["training"]["steps"] >= 1
    assert report["selected_on"]["questions"] in ("validation", "golden") and report["selected_on"]["n"] > 0
    index = json.loads((tracker.fetch(refs["index"]) / INDEX_FILE).read_text())
    assert index["retriever"] == "tuned" and index["mode"] == "dense" and index["embedder"] == "model"
    assert (tracker.fetch(refs["model"]) / "config_sentence_transformers.json").is_file()
    (run,) = tracker.stage_runs(parent, "retriever")
    assert run.data.tags["doctune.upstream.sft"] == refs_from_json(data)["sft"].digest
    assert run.data.tags["doctune.retriever.selected"] == "tuned" and "retriever.tuned.mrr_at_10" in run.data.metrics
