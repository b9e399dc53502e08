"""Domain continued pre-training."""
