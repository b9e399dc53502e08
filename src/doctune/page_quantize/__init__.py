"""Page quantize: quantized variants of the merged page model, checked on validation pages."""
