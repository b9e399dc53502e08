from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("quantize"), install_kfp_package=False)
def quantize(
    config: str,
    parent_run_id: str,
    model: str,
    datasets: str,
    quantize_report: dsl.Output[dsl.Dataset],
    quantize_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", refs=str):
    """GGUF and NF4 variants of the merged model, each loaded and measured in its runtime (size, load time,
    tokens/s, perplexity on the held-out text). `model`: the merged model's references; `datasets`: synth's.

    Returns the stage's MLflow references (refs JSON) as `refs`; the typed outputs point at the same MLflow
    artifacts (URI and digest) for Kubeflow's lineage view."""
    from collections import namedtuple

    from doctune.stages import run_stage_component

    typed = {"quantize_report": quantize_report, "quantize_metrics": quantize_metrics}
    return namedtuple("StageOutputs", ["refs"])(
        run_stage_component("quantize", config, parent_run_id, typed, model=model, datasets=datasets)
    )
