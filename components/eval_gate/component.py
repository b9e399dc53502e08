from typing import NamedTuple

from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("eval_gate"), install_kfp_package=False)
def eval_gate(config: str, parent_run_id: str, merge: str, quantize: str, synth: str, ingest: str) -> NamedTuple(
    "GateOutputs", refs=str, decision=str, version=str, failed=str
):
    """Score candidate, champion and base on the same sets; register the candidate (`challenger`); decide."""
    from collections import namedtuple

    from doctune.gate.stage import gate_component

    outputs = namedtuple("GateOutputs", ["refs", "decision", "version", "failed"])
    return outputs(*gate_component(config, parent_run_id, merge=merge, quantize=quantize, synth=synth, ingest=ingest))
