"""The page_sft component's wiring, without running the stage (tests/ cover the stage itself): the stage it runs, the
references it passes on and the typed outputs it fills."""

from __future__ import annotations

from doctune import stages
from doctune_kfp.components.page_sft.component import page_sft


def test_page_sft_component_trains_on_the_pages_references(monkeypatch, kfp_outputs):
    calls = []

    def run_stage_component(name, config, parent_run_id, kfp_outputs=None, **upstream):
        calls.append((name, kfp_outputs, upstream))
        return '{"model": "ref"}'

    monkeypatch.setattr(stages, "run_stage_component", run_stage_component)
    typed = kfp_outputs(page_sft)
    assert page_sft.python_func(config="", parent_run_id="p1", pages='{"dataset": "pages"}', **typed).refs == '{"model": "ref"}'
    ((name, outputs, upstream),) = calls
    assert name == "page_sft" and upstream == {"pages": '{"dataset": "pages"}'}
    assert set(upstream) == set(stages.STAGES["page_sft"].params)  # what run_stage_component maps to the stage's inputs
    assert outputs == typed and set(outputs) == set(stages.STAGES["page_sft"].kfp_outputs)
