"""Models in: loading, GGUF files, adapters (peft), precision, the tiny model's tokenizer."""
