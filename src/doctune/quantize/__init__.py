"""Quantize: GGUF (llama.cpp) and bitsandbytes NF4 variants of the merged model, each checked in its runtime."""
