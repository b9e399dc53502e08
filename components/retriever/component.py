from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("retriever"), install_kfp_package=False)
def retriever(
    config: str,
    parent_run_id: str,
    datasets: str,
    documents: str,
    embedding_model: dsl.Output[dsl.Model],
    chunk_index: dsl.Output[dsl.Dataset],
    retriever_report: dsl.Output[dsl.Markdown],
) -> NamedTuple("StageOutputs", refs=str):
    """The embedding model fine-tuned on the synthetic (question, source chunk) pairs with mined hard negatives, and
    base, tuned, BM25 and hybrid retrieval compared with ranx on the golden questions. `datasets`: the synth
    component's references; `documents`: the ingest component's.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"embedding_model": embedding_model, "chunk_index": chunk_index, "retriever_report": retriever_report}
    refs = run_stage_component("retriever", config, parent_run_id, typed, datasets=datasets, documents=documents)
    return namedtuple("StageOutputs", ["refs"])(refs)
