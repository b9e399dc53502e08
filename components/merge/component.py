from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("merge"), install_kfp_package=False)
def merge(config: str, parent_run_id: str, dpo: str) -> str:
    """The final adapter folded into full-precision base weights, checked against the adapter model; `dpo` is the
    DPO output or, with DPO off, the SFT output handed on. Returns the merged model reference."""
    from doctune.stages import run_stage_component

    return run_stage_component("merge", config, parent_run_id, dpo=dpo)
