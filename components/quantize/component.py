from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("quantize"), install_kfp_package=False)
def quantize(config: str, parent_run_id: str, merge: str, synth: str) -> str:
    """GGUF and NF4 variants of the merged model, each loaded and measured in its runtime; returns their references
    and the report (sizes, load times, tokens/s, perplexity ratios to the merged model)."""
    from doctune.stages import run_stage_component

    return run_stage_component("quantize", config, parent_run_id, merge=merge, synth=synth)
