"""Models as checkpoints: identity without loading weights (`identity`: revision, tokenizer hash,
depth, blocks), GGUF import (`gguf`), the offline demo Qwen3 (`demo`), the prompt format (`prompt`)
and greedy generation (`generate`)."""
