from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("ingest"), install_kfp_package=False)
def ingest(
    config: str,
    parent_run_id: str,
    pages_dataset: dsl.Output[dsl.Dataset],
    chunks_dataset: dsl.Output[dsl.Dataset],
    ingest_report: dsl.Output[dsl.Markdown],
) -> NamedTuple("StageOutputs", refs=str):
    """PDFs -> cleaned pages and chunks, with a report row per input file.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"pages_dataset": pages_dataset, "chunks_dataset": chunks_dataset, "ingest_report": ingest_report}
    return namedtuple("StageOutputs", ["refs"])(run_stage_component("ingest", config, parent_run_id, typed))
