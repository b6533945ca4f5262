"""The model, plain PyTorch. A batch of token ids through it, one line per module:

- gpt.py: embedding -> blocks [RMSNorm -> causal attention (RoPE, KV cache) -> RMSNorm -> FFN] -> LM head.
- ffn.py: the dense SwiGLU FFN of dense blocks (and of shared experts).
- moe_layer.py: the MoE FFN: router -> routing index -> permute -> experts -> unpermute (+ shared experts).
- experts.py: the routed experts' GEMMs, by a backend chosen by name (loop, padded, grouped).
- stats.py: the router statistics each MoE layer accumulates in training, for the metrics.
- init.py: the layout-free init of a model built on `meta` (per parameter name, per global expert id).
- accounting.py: total and active parameters, training FLOPs per token (for logs and dense matching).

Nothing is re-exported: import from the module (`from moe.nn.gpt import GPT`).
"""
