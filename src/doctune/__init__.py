"""doctune: turn an organisation's documents into a tuned, aligned, quantized LLM."""

__version__ = "0.1.0"
