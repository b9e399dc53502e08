"""Merge: the trained adapter chain folded into a standalone full-precision model with a model card."""
