"""The generation engine: scheduling, the paged KV cache, sampling, tokenization."""
