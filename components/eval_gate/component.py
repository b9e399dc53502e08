from typing import NamedTuple

from kfp import dsl

from doctune_kfp.components.images import image_for


@dsl.component(base_image=image_for("eval_gate"), install_kfp_package=False)
def eval_gate(
    config: str,
    parent_run_id: str,
    model: str,
    quantized: str,
    datasets: str,
    documents: str,
    retriever: str,
    gate_report: dsl.Output[dsl.HTML],
    gate_metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("GateOutputs", refs=str, decision=str, version=str, failed=str):
    """Score candidate, champion and base on the same sets; register the candidate (`challenger`); decide.
    `model`: the merged model's references; `quantized`: the quantize component's; `datasets`: synth's; `documents`:
    ingest's; `retriever`: the retriever's (its comparison is the report's retrieval table), or "{}" when it is off.
    The report is also the `gate_report` HTML artifact, the metrics `gate_metrics`."""
    from collections import namedtuple

    from doctune.stages import gate_component

    typed = {"gate_report": gate_report, "gate_metrics": gate_metrics}
    outputs = namedtuple("GateOutputs", ["refs", "decision", "version", "failed"])
    return outputs(
        *gate_component(
            config,
            parent_run_id,
            typed,
            model=model,
            quantized=quantized,
            datasets=datasets,
            documents=documents,
            retriever=retriever,
        )
    )
