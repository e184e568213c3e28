"""Corpora from object storage to token shards with Ray Data, and the deterministic loader training reads.

Data flow, one module each: storage (URIs -> pyarrow filesystems; cloud_auth builds GCS's and Azure's from
the environment) -> sources (files -> document rows) -> clean (+ pii redaction) -> plant (the privacy
audit's text, when data.audit asks) -> dedup -> tokenizer (rustbpe-trained BPE, encoded with tiktoken)
-> shards (tokenize, split, pack, write) -> prepare (the
entry point; manifest.json, row_index's per-split row-group index).
Reading: manifest (typed manifest, checks) -> shard_reader (the one reader of shards: index records,
range reads, parquet_pages decode, CRC) -> order (which rows a stream position holds; mixture: which
source, for data prepared from data.mixture) -> loader (one rank's training micro-batches) or stream
(the Ray Data stream of fine-tuning and the demo).
Beside the pipeline: codecs (byte-level, BPE and Unigram tokenizers behind one interface, for
`raylm tokenizers`). Knows Ray Data, never Ray Train.
"""
