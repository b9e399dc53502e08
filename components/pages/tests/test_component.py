"""The pages component's wiring, without running the stage (tests/ cover the stage itself): the stage it runs and the
typed outputs it fills."""

from __future__ import annotations

from doctune import stages
from doctune_kfp.components.pages.component import pages


def test_pages_component_runs_the_pages_stage_and_fills_its_typed_outputs(monkeypatch, kfp_outputs):
    calls = []

    def run_stage_component(name, config, parent_run_id, kfp_outputs=None, **upstream):
        calls.append((name, config, parent_run_id, kfp_outputs, upstream))
        return '{"dataset": "ref"}'

    monkeypatch.setattr(stages, "run_stage_component", run_stage_component)
    typed = kfp_outputs(pages)
    assert pages.python_func(config="task: page_extraction\n", parent_run_id="p1", **typed).refs == '{"dataset": "ref"}'
    ((name, config, parent, outputs, upstream),) = calls
    assert (name, config, parent, upstream) == ("pages", "task: page_extraction\n", "p1", {})
    assert outputs == typed and set(outputs) == set(stages.STAGES["pages"].kfp_outputs)
