"""The page_quantize component's wiring, without running the stage (tests/ cover the stage itself): the stage it
runs, the references it passes on and the typed outputs it fills."""

from __future__ import annotations

from doctune import stages
from doctune_kfp.components.page_quantize.component import page_quantize


def test_page_quantize_component_quantizes_the_merged_model(monkeypatch, kfp_outputs):
    calls = []

    def run_stage_component(name, config, parent_run_id, kfp_outputs=None, **upstream):
        calls.append((name, kfp_outputs, upstream))
        return '{"report": "ref"}'

    monkeypatch.setattr(stages, "run_stage_component", run_stage_component)
    typed = kfp_outputs(page_quantize)
    merged, pages = '{"model": "merged"}', '{"dataset": "pages"}'
    outputs = page_quantize.python_func(config="", parent_run_id="p1", model=merged, pages=pages, **typed)
    assert outputs.refs == '{"report": "ref"}'
    ((name, filled, upstream),) = calls
    assert name == "page_quantize" and upstream == {"model": merged, "pages": pages}
    assert set(upstream) == set(stages.STAGES["page_quantize"].params)
    assert filled == typed and set(filled) == set(stages.STAGES["page_quantize"].kfp_outputs)
