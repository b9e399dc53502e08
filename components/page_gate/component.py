from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("page_gate"), install_kfp_package=False)
def page_gate(
    config: str,
    parent_run_id: str,
    model: str,
    quantized: str,
    pages: str,
    gate_report: dsl.Output[dsl.HTML],
    gate_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("GateOutputs", refs=str, decision=str, version=str, failed=str):
    """Score candidate, champion and base on the same test pages (field accuracy, JSON validity, schema conformance,
    latency); register the candidate (`challenger`); decide. `model`: the page_merge component's references;
    `quantized`: the page_quantize component's; `pages`: the pages component's. The report is also the `gate_report`
    HTML artifact, the metrics `gate_metrics`."""
    from collections import namedtuple

    from doctune.stages import gate_component

    typed = {"gate_report": gate_report, "gate_metrics": gate_metrics}
    outputs = namedtuple("GateOutputs", ["refs", "decision", "version", "failed"])
    return outputs(
        *gate_component(config, parent_run_id, typed, stage="page_gate", model=model, quantized=quantized, pages=pages)
    )
