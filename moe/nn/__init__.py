"""The model, plain PyTorch: GPT blocks, dense and MoE FFNs, expert backends."""
