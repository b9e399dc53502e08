"""The page_gate component's wiring, without running the stage (tests/ cover the gate itself): it runs the page gate
through the one gate entry point and hands its decision to the pipeline's If/Else."""

from __future__ import annotations

from doctune import stages
from doctune_kfp.components.page_gate.component import page_gate


def test_page_gate_component_runs_the_page_gate_and_returns_its_decision(monkeypatch, kfp_outputs):
    calls = []

    def gate_component(config, parent_run_id, kfp_outputs=None, stage="eval_gate", **upstream):
        calls.append((stage, kfp_outputs, upstream))
        return '{"report": "ref"}', "reject", "3", '["min_json_validity"]'

    monkeypatch.setattr(stages, "gate_component", gate_component)
    typed = kfp_outputs(page_gate)
    upstream = {"model": '{"model": "merged"}', "quantized": '{"report": "q"}', "pages": '{"dataset": "pages"}'}
    outputs = page_gate.python_func(config="", parent_run_id="p1", **upstream, **typed)
    assert tuple(outputs) == ('{"report": "ref"}', "reject", "3", '["min_json_validity"]')
    ((stage, typed_outputs, passed),) = calls
    assert stage == "page_gate" and passed == upstream and set(passed) == set(stages.STAGES["page_gate"].params)
    assert typed_outputs == typed and set(typed_outputs) == set(stages.STAGES["page_gate"].kfp_outputs)
