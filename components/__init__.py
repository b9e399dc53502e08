"""Thin KFP lightweight components: each imports doctune and calls one function of it."""
