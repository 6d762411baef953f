"""Model runner: Llama in torch, paged KV cache, loader, tokenizers (see runner.py for the flow)."""
