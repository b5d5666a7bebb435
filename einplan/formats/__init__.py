"""File formats einplan reads and writes: safetensors weights (local, sharded, hub), GGUF,
training checkpoints, PEFT adapters and tokenizer files."""
