"""Instruction SFT on the synthetic chat data."""
