"""prepare(): corpus URIs -> cleaned, deduplicated documents -> tokenizer -> token shards + manifest.json.

Stages (Ray Data, all CPUs; the driver sees only counts, hashes, MinHash signatures and the
tokenizer's training sample):
  read -> clean (+hash, +MinHash) -> [driver] exact/near dedup -> [driver] train tokenizer on a
  hash-ordered sample -> tokenize + split -> group by shard -> pack + write Parquet -> manifest.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from tqdm import tqdm

from data_pipeline import tokenizer as tok
from data_pipeline.clean import REASONS, STEPS, clean_batch
from data_pipeline.config import DataConfig
from data_pipeline.dedup import select_duplicates
from data_pipeline.shards import SPLITS, add_shard_key, pack_and_write, split_of, tokenize_batch
from data_pipeline.sources import read_documents, resolve_sources
from data_pipeline.storage import DataSourceError, filesystem_for, join, write_bytes

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "raylm-token-manifest/1"


def _check_output(fs: pafs.FileSystem, path: str, uri: str, overwrite: bool) -> None:
    """Refuse to mix runs: an existing manifest needs output.overwrite, which removes its old shards."""
    try:
        info = fs.get_file_info(f"{path}/{MANIFEST}")
    except OSError as err:
        raise DataSourceError(
            f"{uri}: cannot access the output location ({err}); check bucket, credentials, output.endpoint_url"
        ) from err
    if info.type != pafs.FileType.File:
        return
    if not overwrite:
        raise DataSourceError(
            f"{join(uri, MANIFEST)} already exists; set output.overwrite=true to replace it "
            "or choose another output.uri"
        )
    with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
        old = json.loads(f.read())
    for split in old.get("splits", {}).values():
        for shard in split["shards"]:
            try:
                fs.delete_file(f"{path}/{shard['file']}")
            except FileNotFoundError:
                pass  # already gone: nothing stale to remove


def _keep_rows(batch: pa.Table, drop: dict) -> pa.Table:
    keys = [f"{s}#{i}" for s, i in zip(batch.column("source").to_pylist(), batch.column("doc_index").to_pylist())]
    reasons = batch.column("drop_reason").to_pylist()
    mask = pa.array([not r and k not in drop for k, r in zip(keys, reasons)])
    return batch.filter(mask).select(["doc_hash", "text"])


def _tokenizer_sample(kept: ray.data.Dataset, doc_bytes: dict[str, int], sample_bytes: int) -> list[str]:
    """Texts of the first documents in content-hash order up to ``sample_bytes``: deterministic."""
    chosen, total = set(), 0
    for h in sorted(doc_bytes):
        if total >= sample_bytes:
            break
        chosen.add(h)
        total += doc_bytes[h]
    if not chosen:
        raise DataSourceError(
            "no documents survived cleaning, so there is nothing to tokenize; check the "
            "cleaning counts and clean.min_chars / clean.min_alpha_ratio / clean.max_symbol_ratio"
        )
    rows = kept.filter(lambda r: r["doc_hash"] in chosen).take_all()
    return [r["text"] for r in sorted(rows, key=lambda r: r["doc_hash"])]


def _build_tokenizer(cfg: DataConfig, sample: list[str]) -> dict:
    tc = cfg.tokenizer
    if tc.kind == "tiktoken":
        return tok.tiktoken_named(tc.name)
    if tc.kind == "file":
        return tok.load_spec(tc.path, cfg.sources.endpoint_url, cfg.sources.region)
    print(
        f"[prepare] training BPE vocab_size={tc.vocab_size} pattern={tc.pattern} on {len(sample)} documents, "
        f"{sum(len(t.encode()) for t in sample):,} bytes"
    )
    return tok.train_bpe(sample, tc.vocab_size, tc.pattern)


def _num_shards(doc_bytes: dict[str, int], sample: list[str], spec: dict, oc) -> dict[int, int]:
    """Shards per split from its bytes and the sample's bytes/token: known before tokenizing, so the
    tokenize -> shard stages stream without a counting pass. Shard sizes are ~shard_tokens."""
    enc = tok.encoding(spec)
    sample_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(sample, num_threads=1))
    bytes_per_token = sum(len(t.encode()) for t in sample) / max(1, sample_tokens)
    split_bytes = Counter()
    for h, n in doc_bytes.items():
        split_bytes[split_of(h, oc.val_fraction, oc.seed)] += n
    return {s: max(1, math.ceil(split_bytes[s] / bytes_per_token / oc.shard_tokens)) for s in (0, 1)}


def _collect_clean_stats(cleaned: ray.data.Dataset, near_dedup: bool):
    cols = [
        "source",
        "doc_index",
        "doc_hash",
        "drop_reason",
        "chars_in",
        "chars_out",
        "bytes_out",
        "replaced_chars",
        *(f"removed_{s}" for s in STEPS),
    ] + (["signature"] if near_dedup else [])
    counts: Counter = Counter()
    reasons: Counter = Counter()
    keys, hashes, sigs, doc_bytes = [], [], [], {}
    for batch in tqdm(
        cleaned.select_columns(cols).iter_batches(batch_format="pyarrow", batch_size=4096),
        desc="[prepare] collect hashes",
        unit="batch",
    ):
        counts["documents_in"] += batch.num_rows
        for name in ("chars_in", "chars_out", "replaced_chars", *(f"removed_{s}" for s in STEPS)):
            counts[name] += int(np.sum(batch.column(name).to_numpy()))
        kept = np.array([not r for r in batch.column("drop_reason").to_pylist()])
        reasons.update(r for r in batch.column("drop_reason").to_pylist() if r)
        b = batch.filter(pa.array(kept))
        keys += [f"{s}#{i}" for s, i in zip(b.column("source").to_pylist(), b.column("doc_index").to_pylist())]
        hashes += b.column("doc_hash").to_pylist()
        doc_bytes.update(zip(b.column("doc_hash").to_pylist(), b.column("bytes_out").to_pylist()))
        if near_dedup:
            flat = b.column("signature").combine_chunks().flatten().to_numpy()
            sigs.append(flat.reshape(b.num_rows, -1))
    signatures = np.concatenate(sigs) if sigs else None
    return counts, reasons, keys, hashes, signatures, doc_bytes


def prepare(cfg: DataConfig, *, verbose: bool = True) -> str:
    """Build token shards for ``cfg`` and return the manifest URI.

    Writes ``<output.uri>/{train,val}/shard-NNNNN.parquet``, ``tokenizer.tiktoken``, ``tokenizer.json``
    and ``manifest.json``; prints a summary. Same config + same inputs -> byte-identical shards.
    """
    t0 = time.time()
    oc = cfg.output
    out_fs, out_path = filesystem_for(oc.uri, oc.endpoint_url, oc.region)
    _check_output(out_fs, out_path, oc.uri, oc.overwrite)
    sources = resolve_sources(cfg.sources)
    corpus_bytes = sum(s.bytes for s in sources)
    if verbose:
        print(
            f"[prepare] {sum(len(s.files) for s in sources)} files, {corpus_bytes / 1e6:.1f} MB from "
            f"{', '.join(cfg.sources.uris)}"
        )

    cleaned = (
        read_documents(sources, cfg.sources)
        .map_batches(
            clean_batch,
            batch_format="pyarrow",
            batch_size=64,
            fn_kwargs={"clean": cfg.clean, "near_dedup": cfg.near_dedup},
        )
        .materialize()
    )
    counts, reasons, keys, hashes, signatures, doc_bytes = _collect_clean_stats(cleaned, cfg.near_dedup.enabled)
    drop = select_duplicates(
        keys, hashes, signatures, cfg.clean.exact_dedup, cfg.near_dedup if cfg.near_dedup.enabled else None
    )
    reasons.update(drop.values())
    key_hash = dict(zip(keys, hashes))
    for key, reason in drop.items():
        if reason == "near_duplicate":  # an exact duplicate shares its hash with the copy that stays
            doc_bytes.pop(key_hash[key], None)
    kept = cleaned.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"drop": drop}).materialize()

    sample = _tokenizer_sample(kept, doc_bytes, cfg.tokenizer.sample_bytes)
    spec = _build_tokenizer(cfg, sample)
    dtype = tok.token_dtype(spec["n_vocab"])
    num_shards = _num_shards(doc_bytes, sample, spec, oc)
    del sample
    num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    tokenized = kept.map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        batch_size=64,
        fn_kwargs={
            "spec_ref": ray.put(spec),
            "tokenizer_hash": spec["hash"],
            "val_fraction": oc.val_fraction,
            "seed": oc.seed,
        },
    )
    sharded = (
        tokenized.map_batches(add_shard_key, batch_format="pyarrow", fn_kwargs={"num_shards": num_shards})
        .groupby("shard_key", num_partitions=min(sum(num_shards.values()), 8 * num_cpus))
        .map_groups(
            pack_and_write,
            batch_format="pyarrow",
            fn_kwargs={
                "fs": out_fs,
                "out_path": out_path,
                "seq_len": oc.seq_len,
                "dtype": dtype,
                "tokenizer_hash": spec["hash"],
            },
        )
    )
    descriptors = sharded.take_all()

    for name, data in tok.to_files(spec).items():
        write_bytes(out_fs, f"{out_path}/{name}", data)
    manifest = _manifest(cfg, sources, counts, reasons, spec, dtype, descriptors)
    manifest_uri = join(oc.uri, MANIFEST)
    write_bytes(out_fs, f"{out_path}/{MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode())
    if verbose:
        _print_summary(manifest, corpus_bytes, time.time() - t0, manifest_uri)
    return manifest_uri


def _manifest(cfg, sources, counts, reasons, spec, dtype, descriptors) -> dict:
    splits = {}
    for split in SPLITS:
        shards = sorted((d for d in descriptors if d["split"] == split), key=lambda d: d["index"])
        splits[split] = {
            "documents": sum(d["documents"] for d in shards),
            "tokens": sum(d["tokens"] for d in shards),
            "sequences": sum(d["sequences"] for d in shards),
            "dropped_tail_tokens": sum(d["dropped_tail_tokens"] for d in shards),
            "num_shards": len(shards),
            "shards": [{"file": d["file"], "sequences": d["sequences"], "sha256": d["sha256"]} for d in shards],
        }
    documents_out = sum(s["documents"] for s in splits.values())
    return {
        "format": MANIFEST_FORMAT,
        "sources": [{"uri": s.uri, "files": len(s.files), "bytes": s.bytes} for s in sources],
        "cleaning": {
            "documents_in": counts["documents_in"],
            "documents_out": documents_out,
            "chars_in": counts["chars_in"],
            "chars_removed": {s: counts[f"removed_{s}"] for s in STEPS},
            "replacement_chars": counts["replaced_chars"],
            "dropped": {r: reasons.get(r, 0) for r in sorted(set(REASONS) | set(reasons))},
        },
        "tokenizer": {
            "name": spec["name"],
            "hash": spec["hash"],
            "n_vocab": spec["n_vocab"],
            "eot_token": tok.eot_id(spec),
            "ranks_file": tok.RANKS_FILE,
            "meta_file": tok.META_FILE,
        },
        "seq_len": cfg.output.seq_len,
        "row_tokens": cfg.output.seq_len + 1,
        "dtype": dtype,
        "splits": splits,
        "config": dataclasses.asdict(cfg),
    }


def _print_summary(m: dict, corpus_bytes: int, wall_s: float, manifest_uri: str) -> None:
    c = m["cleaning"]
    dropped = ", ".join(f"{k}={v}" for k, v in c["dropped"].items() if v) or "none"
    print(
        f"[prepare] corpus {corpus_bytes / 1e6:.1f} MB, documents {c['documents_in']} -> {c['documents_out']} "
        f"(dropped: {dropped}; U+FFFD replacements {c['replacement_chars']})"
    )
    for split, s in m["splits"].items():
        print(
            f"[prepare] {split}: {s['tokens']:,} tokens in {s['sequences']:,} rows of {m['row_tokens']} "
            f"({s['num_shards']} shards, {s['dropped_tail_tokens']:,} tail tokens dropped)"
        )
    print(
        f"[prepare] tokenizer {m['tokenizer']['name']} n_vocab={m['tokenizer']['n_vocab']} dtype={m['dtype']}; "
        f"wall {wall_s:.1f} s"
    )
    print(f"[prepare] wrote {manifest_uri}")
