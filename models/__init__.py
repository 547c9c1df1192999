"""Llama-family models: config, weights from GGUF/HF/IRPA, the paged PyTorch model, tokenizers."""
