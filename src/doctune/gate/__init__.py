"""Eval gate: candidate vs champion vs base on the same sets, config rules, the MLflow Model Registry aliases."""
