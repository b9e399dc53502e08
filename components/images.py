"""Container images the components run in (built from images/); registry and tag are configurable."""

import os

from doctune import __version__

REGISTRY = os.environ.get("DOCTUNE_IMAGE_REGISTRY", "ghcr.io/doctune")
TAG = os.environ.get("DOCTUNE_IMAGE_TAG", __version__)
CPU_IMAGE = f"{REGISTRY}/doctune-cpu:{TAG}"
# Training, merge and quantize: CUDA torch, DeepSpeed, bitsandbytes.
GPU_IMAGE = f"{REGISTRY}/doctune-cuda:{TAG}"
