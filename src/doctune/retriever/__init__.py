"""The retriever: the embedding model tuned on the synthetic questions, compared with ranx."""
