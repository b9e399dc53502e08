from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("pages"), install_kfp_package=False)
def pages(
    config: str,
    parent_run_id: str,
    page_dataset: dsl.Output[dsl.Dataset],
    pages_report: dsl.Output[dsl.Markdown],
) -> NamedTuple("StageOutputs", refs=str):
    """The PDFs' pages rendered to images with their JSON labels (the user's, or derived from the text layer), hard
    negatives added to the training split, split by document. Reads its PDFs from the run config (pages.pdfs).

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"page_dataset": page_dataset, "pages_report": pages_report}
    return namedtuple("StageOutputs", ["refs"])(run_stage_component("pages", config, parent_run_id, typed))
