"""PDF ingest and chunking (the pipeline's first stage: see stage.py)."""
