"""Corpora from object storage to token shards with Ray Data, and the deterministic loader training reads.

Data flow, one module each: storage (URIs -> pyarrow filesystems) -> sources (files -> document rows)
-> clean (+ dedup) -> tokenizer (rustbpe-trained BPE, encoded with tiktoken) -> shards (tokenize, split,
pack, write) -> prepare (the entry point, manifest.json) -> loader (manifest -> ordered rows for workers).
Knows Ray Data, never Ray Train.
"""
