"""Tokenize documents, split train/val by work, pack into fixed-length rows, write Parquet shards.

Determinism: a document's split is a function of its work (``output.split_by``: by default its content
hash) and output.seed, so every version of one work lands on the same side; its shard is a function of
its content hash; a shard packs its documents in hash order. So shard bytes depend only on the cleaned corpus and the
config, never on Ray's block order or the number of CPUs. Each shard's tail that does not fill a
row of ``seq_len + 1`` tokens is dropped and counted (``dropped_tail_tokens``).
"""

from __future__ import annotations

import hashlib
import io
import re
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from data_pipeline import tokenizer as tok
from data_pipeline.config import SplitByConfig
from data_pipeline.row_index import RECORD

SPLITS = ("train", "val")
SHARD_FORMAT = "raylm-token-shard/1"


def split_of(work: str, val_fraction: float, seed: int) -> int:
    """0 = train, 1 = val: a uniform draw from sha256(seed, work), stable across runs and machines.
    ``work`` is what ``work_of`` returns (a document's content hash unless documents are grouped)."""
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{work}".encode()).digest()[:8], "big") / 2**64
    return 1 if draw < val_fraction else 0


def work_of(source: str, group: str, doc_hash: str, split_by: SplitByConfig) -> tuple[str, bool]:
    """(work, grouped): the name shared by every version of a document's work, or its content hash
    (grouped=False) when ``split_by`` finds no name for it: no pattern match, no metadata field."""
    if split_by.kind == "filename":
        match = re.search(split_by.pattern, source)
        group = (match.group(1) or "") if match else ""
    elif split_by.kind == "document":
        group = ""
    if not group:
        return doc_hash, False
    return split_by.aliases.get(group, group), True


def add_split(batch: pa.Table, *, split_by: SplitByConfig, val_fraction: float, seed: int) -> pa.Table:
    """Ray Data batch fn: adds ``work``, ``grouped`` and ``split`` (0 train, 1 val) to document rows."""
    works = [
        work_of(src, grp, h, split_by)
        for src, grp, h in zip(
            batch.column("source").to_pylist(), batch.column("group").to_pylist(), batch.column("doc_hash").to_pylist()
        )
    ]
    return (
        batch.append_column("work", pa.array([w for w, _ in works], pa.string()))
        .append_column("grouped", pa.array([g for _, g in works], pa.bool_()))
        .append_column("split", pa.array([split_of(w, val_fraction, seed) for w, _ in works], pa.int8()))
    )


def shard_of(doc_hash: str, num_shards: int) -> int:
    return int(doc_hash[16:32], 16) % num_shards


_ENCODINGS: dict = {}  # per worker process: tokenizer hash -> (Encoding, eot id)


def tokenize_batch(batch: pa.Table, *, spec_ref, tokenizer_hash: str) -> pa.Table:
    """Ray Data batch fn: (doc_hash, split, mixture, text) -> (doc_hash, split, mixture, tokens + eot, num_tokens).

    The spec travels once through the object store; each worker process builds its
    tiktoken.Encoding once (parsing 100k ranks takes ~0.3 s) and reuses it across tasks.
    """
    if tokenizer_hash not in _ENCODINGS:
        spec = ray.get(spec_ref)
        _ENCODINGS[tokenizer_hash] = (tok.encoding(spec), tok.eot_id(spec))
    enc, eot = _ENCODINGS[tokenizer_hash]
    # With no special token allowed or refused, encode_to_numpy gives encode_ordinary's ids (a literal
    # "<|endoftext|>" in a document is ordinary text) as one uint32 buffer per document: no Python list
    # of ints to build and copy back into an array (~15% of the encode's own time)
    docs = [enc.encode_to_numpy(text, disallowed_special=()) for text in batch.column("text").to_pylist()]
    # prepare's documents carry their mixture source; a bare (doc_hash, split, text) batch is source 0
    mixture = batch.column("mixture") if "mixture" in batch.column_names else pa.array(np.zeros(len(docs), np.int32))
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.empty(int(offsets[-1]), dtype=np.uint32)
    for doc, end in zip(docs, offsets[1:]):
        flat[end - 1 - len(doc) : end - 1] = doc
    flat[offsets[1:] - 1] = eot
    return pa.table(
        {
            "doc_hash": batch.column("doc_hash"),
            "split": batch.column("split"),
            "mixture": mixture,
            "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "num_tokens": pa.array(lengths),
        }
    )


def shard_ranges(num_shards: list[int]) -> list[range]:
    """Each mixture source's shard indexes within a split: consecutive ranges in source order."""
    first = np.concatenate([[0], np.cumsum(num_shards)]).tolist()
    return [range(first[m], first[m + 1]) for m in range(len(num_shards))]


def add_shard_key(batch: pa.Table, num_shards: dict) -> pa.Table:
    """shard_key = split * 1_000_000 + shard index (one Ray groupby key for both splits). A document's
    shard is one of its mixture source's (``num_shards[split][source]`` of them, see ``shard_ranges``)."""
    ranges = {split: shard_ranges(n) for split, n in num_shards.items()}
    keys = [
        s * 1_000_000 + ranges[s][m][shard_of(h, len(ranges[s][m]))]
        for s, m, h in zip(
            batch.column("split").to_pylist(), batch.column("mixture").to_pylist(), batch.column("doc_hash").to_pylist()
        )
    ]
    return batch.append_column("shard_key", pa.array(keys, pa.int64()))


BLOCK_ROWS = 8  # rows per Parquet row group: the unit a training rank reads (see loader.py)
CODEC = "ZSTD"  # of every shard's chunks, recorded in the manifest's index entry


def shard_bytes(
    tokens: np.ndarray, row_tokens: int, dtype: str, meta: dict, block_rows: int = BLOCK_ROWS
) -> tuple[bytes, np.ndarray]:
    """Rows of ``row_tokens`` tokens as a Parquet file (fixed_size_list column ``tokens``), and its
    row-group index records (``row_index.RECORD``: where each row group's chunk lies, rows, CRC-32).

    One small row group per ``block_rows`` rows lets a training rank fetch just the blocks it trains on
    with one range read each; the writer is pinned (zstd, PLAIN, v1 data pages, no dictionary, no
    statistics) because ranks decode chunks from their own bytes (``parquet_pages``). Shard metadata
    carries the tokenizer hash, seq_len and each block's CRC-32 (``raylm.block_crc32``, 8 hex digits per
    row group) so a shard alone can be checked by any Parquet reader.
    """
    rows = tokens.astype(dtype).reshape(-1, row_tokens)
    crcs = [zlib.crc32(rows[i : i + block_rows].tobytes()) for i in range(0, max(len(rows), 1), block_rows)]
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), row_tokens)})
    table = table.replace_schema_metadata(
        {
            f"raylm.{k}": str(v)
            for k, v in {**meta, "block_rows": block_rows, "block_crc32": "".join(f"{c:08x}" for c in crcs)}.items()
        }
    )
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression=CODEC,
        row_group_size=block_rows,
        use_dictionary=False,
        write_statistics=False,
        data_page_version="1.0",
        column_encoding="PLAIN",
    )
    data = buf.getvalue()
    md = pq.read_metadata(pa.BufferReader(data))
    records = np.zeros(md.num_row_groups if len(rows) else 0, dtype=RECORD)  # no rows: pyarrow's empty group
    for g in range(len(records)):
        chunk = md.row_group(g).column(0)
        records[g] = (chunk.data_page_offset, chunk.total_compressed_size, md.row_group(g).num_rows, crcs[g])
    return data, records


def pack_and_write(
    group: pa.Table, *, fs: pafs.FileSystem, out_path: str, seq_len: int, dtype: str, tokenizer_hash: str
) -> pa.Table:
    """Ray Data map_groups fn: one shard's documents -> one Parquet file; returns its descriptor row."""
    group = group.sort_by("doc_hash")
    key = group.column("shard_key")[0].as_py()
    split, index = SPLITS[key // 1_000_000], key % 1_000_000
    row_tokens = seq_len + 1
    stream = pc.list_flatten(group.column("tokens")).to_numpy()
    num_rows = len(stream) // row_tokens
    data, records = shard_bytes(
        stream[: num_rows * row_tokens],
        row_tokens,
        dtype,
        {"format": SHARD_FORMAT, "tokenizer_hash": tokenizer_hash, "seq_len": seq_len, "split": split, "index": index},
    )
    name = f"{split}/shard-{index:05d}.parquet"
    fs.create_dir(f"{out_path}/{split}", recursive=True)
    with fs.open_output_stream(f"{out_path}/{name}") as f:
        f.write(data)
    return pa.table(
        {
            "split": [split],
            "index": [index],
            "file": [name],
            "sequences": [num_rows],
            "tokens": [num_rows * row_tokens],
            "documents": [group.num_rows],
            "dropped_tail_tokens": [len(stream) - num_rows * row_tokens],
            "sha256": [hashlib.sha256(data).hexdigest()],
            "bytes": [len(data)],
            "row_groups": [len(records)],
            "index_records": [records.tobytes()],
        }
    )
