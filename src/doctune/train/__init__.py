"""The training core shared by CPT, SFT (and DPO): model artifacts, methods, checkpoints, launch."""
