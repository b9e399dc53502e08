"""Container images the components run in (built from images/). The compiled IR names these defaults;
`pipelines.cluster` rewrites registry and tag from the run config's `cluster` section."""

import re

from doctune import __version__

DEFAULT_REGISTRY = "ghcr.io/doctune"
CPU_IMAGE = f"{DEFAULT_REGISTRY}/doctune-cpu:{__version__}"
# Training, merge and quantize (of both tracks): CUDA torch, DeepSpeed, bitsandbytes.
GPU_IMAGE = f"{DEFAULT_REGISTRY}/doctune-cuda:{__version__}"

# Stages whose component runs in the CUDA image.
CUDA_STAGES = frozenset({"cpt", "sft", "dpo", "merge", "quantize", "page_sft", "page_merge", "page_quantize", "page_gate"})

_IMAGE = re.compile(r"^.+/(doctune-(?:cpu|cuda)):[^/]+$")


def retag(image: str, registry: str, tag: str) -> str:
    """A doctune image under another registry and tag; any other image unchanged."""
    match = _IMAGE.match(image)
    return f"{registry.rstrip('/')}/{match.group(1)}:{tag}" if match else image


def image_for(stage: str) -> str:
    return GPU_IMAGE if stage in CUDA_STAGES else CPU_IMAGE
