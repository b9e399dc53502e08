"""The page_merge component's wiring, without running the stage (tests/ cover the stage itself): the stage it runs,
the references it passes on and the typed outputs it fills."""

from __future__ import annotations

from doctune import stages
from doctune_kfp.components.page_merge.component import page_merge


def test_page_merge_component_merges_the_page_sft_model(monkeypatch, kfp_outputs):
    calls = []

    def run_stage_component(name, config, parent_run_id, kfp_outputs=None, **upstream):
        calls.append((name, kfp_outputs, upstream))
        return '{"model": "merged"}'

    monkeypatch.setattr(stages, "run_stage_component", run_stage_component)
    typed = kfp_outputs(page_merge)
    tuned, pages = '{"model": "tuned"}', '{"dataset": "pages"}'
    assert page_merge.python_func(config="", parent_run_id="p1", model=tuned, pages=pages, **typed).refs == '{"model": "merged"}'
    ((name, outputs, upstream),) = calls
    assert name == "page_merge" and upstream == {"model": tuned, "pages": pages}
    assert set(upstream) == set(stages.STAGES["page_merge"].params)
    assert outputs == typed and set(outputs) == set(stages.STAGES["page_merge"].kfp_outputs)
