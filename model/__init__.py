"""The models, from scratch in PyTorch, and their accounting; knows nothing of Ray.

config (ModelConfig, presets) -> layers (attention, MLP, norms, positions) and documents (document
masking: each document's positions and block-diagonal causal mask) -> loss (the LM head and its
chunked fp32 cross-entropy) -> gpt (the decoder-only transformer) -> build (meta-device build, init);
generate (KV-cache sampling), quantize (weight-only int8/int4 modules and their math), prune (Taylor
importance of heads and MLP units, and the GPT physically shrunk to what it keeps), lora (adapters),
classifier (a GPT backbone with a task head), lstm (RNN, GRU, LSTM) and ngram (baselines); flops
(parameters, FLOPs, activation and training memory).
"""
