"""Synthetic training and eval data from chunks: QA, abstention, preference pairs, CPT text (see stage.py)."""
