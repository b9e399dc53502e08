from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("page_quantize"), install_kfp_package=False)
def page_quantize(
    config: str,
    parent_run_id: str,
    model: str,
    pages: str,
    quantize_report: dsl.Output[dsl.Dataset],
    quantize_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", refs=str):
    """Quantized variants of the merged VLM (NF4; GGUF with its vision projector where llama.cpp supports the
    architecture), each checked on validation pages against the merged model. `model`: the page_merge component's
    references; `pages`: the pages component's.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"quantize_report": quantize_report, "quantize_metrics": quantize_metrics}
    return namedtuple("StageOutputs", ["refs"])(
        run_stage_component("page_quantize", config, parent_run_id, typed, model=model, pages=pages)
    )
