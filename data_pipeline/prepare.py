"""prepare(): corpus URIs -> cleaned, deduplicated documents -> tokenizer -> token shards + manifest.json.

Stages, all in Ray Data (the driver holds counts, the tokenizer's training sample, at most
``VAL_DOCUMENTS_LISTED`` val document names and, with data.audit, the planted documents and the
``AUDIT_SAMPLE_BYTES`` of text they are drawn from; never one entry per corpus document):
  read -> clean (+hash, +MinHash) -> [+ the privacy audit's planted documents, data.audit; see plant]
  -> exact/near dedup (group by band key, then by hash; see dedup)
  -> split by work (output.split_by) -> train the tokenizer on the first documents in hash order
  -> tokenize -> group by shard -> pack + write Parquet -> manifest.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections import Counter
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.data.expressions import col

from data_pipeline import tokenizer as tok
from data_pipeline.clean import REASONS, STEPS, clean_batch
from data_pipeline.config import DataConfig
from data_pipeline.dedup import DOC_COLUMNS, mark_duplicates
from data_pipeline.manifest import (
    MANIFEST,
    VAL_DOCUMENTS_LISTED,
    AuditEntry,
    CleaningStats,
    Manifest,
    MixtureEntry,
    MixtureSplit,
    ShardEntry,
    SourceEntry,
    SplitEntry,
    SplitPlan,
    TokenizerEntry,
    ValDocument,
    write_manifest,
)
from data_pipeline.pii import PII_TYPES
from data_pipeline.plant import (
    AUDIT_FILE,
    AUDIT_SAMPLE_BYTES,
    AUDIT_SOURCE,
    audit_bytes,
    corpus_lines,
    plan_audit,
    planted_table,
    with_copies_kept,
)
from data_pipeline.row_index import write_index
from data_pipeline.shards import (
    CODEC,
    SPLITS,
    add_shard_key,
    add_split,
    pack_and_write,
    shard_ranges,
    tokenize_batch,
)
from data_pipeline.sources import read_documents, resolve_mixture, resolve_sources, union
from data_pipeline.storage import DataSourceError, filesystem_for, join, write_bytes

__all__ = ["MANIFEST", "prepare"]


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
        for name in [s["file"] for s in split["shards"]] + ([split["index"]["file"]] if "index" in split else []):
            _delete(fs, f"{path}/{name}")
    if old.get("audit"):
        _delete(fs, f"{path}/{old['audit']['file']}")


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass  # already gone: nothing stale to remove


def _long(counts: dict[str, int]) -> pa.Table:
    return pa.table({"name": pa.array(list(counts), pa.string()), "value": pa.array(list(counts.values()), pa.int64())})


def _sum_counts(ds: ray.data.Dataset, fn: Callable[[pa.Table], dict[str, int]]) -> Counter:
    """Sums ``fn``'s per-batch counters: each Ray task sends (name, value) rows, the driver adds them up."""
    totals: Counter = Counter()
    partial = ds.map_batches(lambda b: _long(fn(b)), batch_format="pyarrow", batch_size=None)
    for batch in partial.iter_batches(batch_format="pyarrow", batch_size=None):
        for name, value in zip(batch.column("name").to_pylist(), batch.column("value").to_pylist()):
            totals[name] += value
    return totals


def _clean_counts(batch: pa.Table) -> dict[str, int]:
    counts = {"documents_in": batch.num_rows}
    for name in ("chars_in", "replaced_chars", *(f"removed_{s}" for s in STEPS), *(f"pii_{t}" for t in PII_TYPES)):
        counts[name] = int(pc.sum(batch.column(name)).as_py() or 0)
    counts.update((f"dropped:{r}", n) for r, n in Counter(batch.column("drop_reason").to_pylist()).items() if r)
    return counts


def _passed_cleaning(batch: pa.Table, *, near_dedup: bool) -> pa.Table:
    keep = pc.equal(batch.column("drop_reason"), "")
    return batch.filter(keep).select(list(DOC_COLUMNS) + (["signature"] if near_dedup else []))


def _dedup_counts(batch: pa.Table) -> dict[str, int]:
    """Documents dedup dropped, by reason; the audit's planted copies are counted in its own entry."""
    corpus = _corpus_only(batch)
    return {f"dropped:{r}": n for r, n in Counter(corpus.column("dup_reason").to_pylist()).items() if r}


def _planted(batch: pa.Table):
    """Which rows are the privacy audit's planted documents (their source names them)."""
    return pc.starts_with(batch.column("source"), AUDIT_SOURCE)


def _corpus_only(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(_planted(batch)))


def _survivors(batch: pa.Table, *, split_by, val_fraction: float, seed: int, mixture_of: dict) -> pa.Table:
    """Documents dedup kept, with their split and their data.mixture source (index; 0 without a mixture)."""
    kept = batch.filter(pc.equal(batch.column("dup_reason"), "")).drop_columns(["dup_reason"])
    kept = add_split(kept, split_by=split_by, val_fraction=val_fraction, seed=seed)
    sources = kept.column("source").to_pylist()
    kept = kept.append_column("mixture", pa.array([mixture_of.get(src, 0) for src in sources], pa.int32()))
    planted = _planted(kept)  # the audit's text: always trained on
    for name, value in (("split", pa.scalar(0, pa.int8())), ("grouped", pa.scalar(True))):
        column = kept.column(name)
        kept = kept.set_column(kept.schema.get_field_index(name), name, pc.if_else(planted, value, column))
    # identical copies share a content hash, which picks the shard and the order in it: each copy gets
    # its own key so copies spread over the stream as duplicates in a corpus do, not one run of rows
    keys = [
        hashlib.sha256(f"{h}:{src}:{i}".encode()).hexdigest() if p else h
        for h, src, i, p in zip(
            kept.column("doc_hash").to_pylist(),
            kept.column("source").to_pylist(),
            kept.column("doc_index").to_pylist(),
            planted.to_pylist(),
        )
    ]
    return kept.set_column(kept.schema.get_field_index("doc_hash"), "doc_hash", pa.array(keys, pa.string()))


def _planted_counts(batch: pa.Table) -> dict[str, int]:
    sources = batch.column("source").filter(_planted(batch))
    return dict(Counter(sources.to_pylist()))


def _plant(cfg: DataConfig, passed: ray.data.Dataset, near) -> tuple[ray.data.Dataset, dict]:
    """``passed`` with the audit's planted documents added (``data_pipeline.plant``), and its record.
    Their lines come from train-split documents only: a val line planted in train would leak into val loss."""
    oc = cfg.output
    train_docs = passed.map_batches(
        add_split,
        batch_format="pyarrow",
        fn_kwargs={"split_by": oc.split_by, "val_fraction": oc.val_fraction, "seed": oc.seed},
    ).filter(expr=col("split") == 0)
    pool = _ordered_prefix(
        train_docs, ["doc_hash", "bytes_out", "text"], [("doc_hash", "ascending")], 2**62, AUDIT_SAMPLE_BYTES
    )
    record, documents = plan_audit(cfg.audit, corpus_lines(pool.column("text").to_pylist()))
    table = planted_table(documents, near).cast(passed.schema().base_schema)
    return passed.union(ray.data.from_arrow(table)), record


def _split_counts(batch: pa.Table) -> dict[str, int]:
    """Bytes and documents per split, and per (split, mixture source)."""
    counts: Counter = Counter()
    for split, n, grouped, m in zip(
        batch.column("split").to_pylist(),
        batch.column("bytes_out").to_pylist(),
        batch.column("grouped").to_pylist(),
        batch.column("mixture").to_pylist(),
    ):
        counts[f"bytes:{split}"] += n
        counts[f"bytes:{split}:{m}"] += n
        counts[f"documents:{split}"] += 1
        counts[f"documents:{split}:{m}"] += 1
        counts["ungrouped"] += not grouped
    return dict(counts)


def _first_rows(table: pa.Table, sort_keys: list[tuple[str, str]], limit_rows: int, limit_bytes: int) -> pa.Table:
    """The first rows in ``sort_keys`` order, while fewer than ``limit_rows`` and their bytes before the row
    are under ``limit_bytes``: a prefix that a merge of such prefixes reproduces exactly."""
    table = table.sort_by(sort_keys).slice(0, limit_rows)
    before = pc.subtract(pc.cumulative_sum(table.column("bytes_out")), table.column("bytes_out")).to_numpy()
    return table.slice(0, int((before < limit_bytes).sum()))


def _ordered_prefix(
    ds: ray.data.Dataset, columns: list[str], sort_keys: list[tuple[str, str]], limit_rows: int, limit_bytes: int
) -> pa.Table:
    """The global first rows of ``ds`` in ``sort_keys`` order (see ``_first_rows``) without sorting the
    dataset: each Ray task keeps its own prefix, the driver merges them; memory is bounded by the limits."""
    kwargs = {"sort_keys": sort_keys, "limit_rows": limit_rows, "limit_bytes": limit_bytes}
    prefixes = ds.select_columns(columns).map_batches(
        _first_rows, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs
    )
    merged = None
    for batch in prefixes.iter_batches(batch_format="pyarrow", batch_size=None):
        merged = _first_rows(batch if merged is None else pa.concat_tables([merged, batch]), **kwargs)
    return merged if merged is not None else pa.table({c: [] for c in columns})


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


def _num_shards(
    split_bytes: Counter, sample: list[str], spec: dict, shard_tokens: int, num_sources: int
) -> dict[int, list[int]]:
    """Shards per split and mixture source (one list entry per source; one source without a mixture)
    from its bytes and the sample's bytes/token: known before tokenizing, so the tokenize -> shard stages
    stream without a counting pass. Shard sizes are ~shard_tokens; every source has a shard per split."""
    enc = tok.encoding(spec)
    sample_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(sample, num_threads=1))
    bytes_per_token = sum(len(t.encode()) for t in sample) / max(1, sample_tokens)
    return {
        s: [
            max(1, math.ceil(split_bytes[f"bytes:{s}:{m}"] / bytes_per_token / shard_tokens))
            for m in range(num_sources)
        ]
        for s in (0, 1)
    }


# Ray Data (2.60) leaves ~0.2 s between one task and the next on a worker (it polls task completion
# every 0.1 s), so the stage runs a few large batches per CPU rather than many small ones; a batch's
# documents stay under TOKENIZE_BATCH_BYTES so a worker's memory is bounded whatever the corpus size.
TOKENIZE_TASKS_PER_CPU = 3
TOKENIZE_BATCH_BYTES = 64 << 20
# data.shuffle=auto: the sort-based shuffle below this much input (measured on kB-MB corpora only;
# above it, Ray's default hash shuffle, built to scale)
SORT_SHUFFLE_MAX_BYTES = 256 << 20


def tokenize_stage(docs: ray.data.Dataset, spec: dict) -> ray.data.Dataset:
    """Document rows (doc_hash, split, text) of a materialized dataset -> (doc_hash, split, tokens + eot,
    num_tokens), encoded in Ray tasks; benchmarks/bench_tokenize.py measures exactly this."""
    rows, size = docs.count(), docs.size_bytes()  # a materialized dataset's metadata: no pass over it
    num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = math.ceil(rows / (TOKENIZE_TASKS_PER_CPU * num_cpus))
    bytes_capped = TOKENIZE_BATCH_BYTES * rows // max(1, size)
    return docs.map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        batch_size=max(1, min(per_task, bytes_capped)),
        fn_kwargs={"spec_ref": ray.put(spec), "tokenizer_hash": spec["hash"]},
    )


def prepare(cfg: DataConfig, *, verbose: bool = True) -> str:
    """Build token shards for ``cfg`` and return the manifest URI.

    Writes ``<output.uri>/{train,val}/shard-NNNNN.parquet``, each split's row-group index
    ``{train,val}/row_groups.idx``, ``tokenizer.tiktoken``, ``tokenizer.json`` and ``manifest.json``;
    prints a summary. Same config + same inputs -> byte-identical shards.
    """
    t0 = time.time()
    oc = cfg.output
    out_fs, out_path = filesystem_for(oc.uri, oc.endpoint_url, oc.region)
    _check_output(out_fs, out_path, oc.uri, oc.overwrite)
    groups = resolve_mixture(cfg.mixture) if cfg.mixture else [resolve_sources(cfg.sources)]
    sources = [s for group in groups for s in group]
    corpus_bytes = sum(s.bytes for s in sources)
    strategy = choose_shuffle(cfg.shuffle, corpus_bytes)
    if verbose:
        where = [f"{m.name} ({sum(s.bytes for s in g) / 1e6:.1f} MB)" for m, g in zip(cfg.mixture, groups)]
        print(
            f"[prepare] {sum(len(s.files) for s in sources)} files, {corpus_bytes / 1e6:.1f} MB from "
            + (f"mixture sources {', '.join(where)}" if cfg.mixture else ", ".join(cfg.sources.uris))
            + f"; group-bys on Ray Data's {strategy.value} (data.shuffle={cfg.shuffle})"
        )
    with ray_data_shuffle(strategy):
        return _prepare_documents(cfg, groups, corpus_bytes, out_fs, out_path, t0, verbose)


@contextlib.contextmanager
def ray_data_shuffle(strategy):
    """Ray Data's shuffle (a ``ShuffleStrategy``) for the datasets created inside the block: each one
    copies the current DataContext when it is created."""
    context = ray.data.DataContext.get_current()
    before, context.shuffle_strategy = context.shuffle_strategy, strategy
    try:
        yield
    finally:
        context.shuffle_strategy = before


def choose_shuffle(choice: str, corpus_bytes: int):
    """Ray Data's shuffle for prepare's group-bys (dedup, shard assignment); the bytes are the same on
    every one. hash: SHUFFLE_V2, Ray's default, which scales but starts new worker processes for every
    group-by (15-30 s of a small prepare on 2 cores); sort: the sort-based pull shuffle (1-2 s there);
    auto: sort below SORT_SHUFFLE_MAX_BYTES of input."""
    from ray.data.context import ShuffleStrategy

    if choice == "auto":
        choice = "sort" if corpus_bytes < SORT_SHUFFLE_MAX_BYTES else "hash"
    return ShuffleStrategy.SORT_SHUFFLE_PULL_BASED if choice == "sort" else ShuffleStrategy.SHUFFLE_V2


def _prepare_documents(cfg: DataConfig, groups, corpus_bytes: int, out_fs, out_path: str, t0: float, verbose: bool):
    """prepare() past its checks: the stages, on the shuffle it chose; returns the manifest URI.
    ``groups``: the resolved sources of each data.mixture source (one group without a mixture)."""
    oc = cfg.output
    sources = [s for group in groups for s in group]
    source_configs = [m.source_config() for m in cfg.mixture] if cfg.mixture else [cfg.sources]
    mixture_of = {f.path: m for m, group in enumerate(groups) for s in group for f in s.files} if cfg.mixture else {}
    num_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    near = cfg.near_dedup if cfg.near_dedup.enabled else None
    group_field = oc.split_by.field_name if oc.split_by.kind == "field" else None
    cleaned = (
        union(*(read_documents(group, sc, group_field) for group, sc in zip(groups, source_configs)))
        .map_batches(
            clean_batch,
            batch_format="pyarrow",
            batch_size=64,
            fn_kwargs={"clean": cfg.clean, "near_dedup": cfg.near_dedup},
        )
        .materialize()
    )
    counts = _sum_counts(cleaned, _clean_counts)
    if counts["documents_in"] == sum(n for k, n in counts.items() if k.startswith("dropped:")):
        raise DataSourceError(
            f"no documents survived cleaning ({_dropped_text(counts)} of {counts['documents_in']}), so there is "
            "nothing to tokenize; check the inputs and clean.min_chars / clean.min_alpha_ratio / "
            "clean.max_symbol_ratio"
        )
    passed = cleaned.map_batches(_passed_cleaning, batch_format="pyarrow", fn_kwargs={"near_dedup": near is not None})
    audit = None
    if cfg.audit.enabled:
        passed, audit = _plant(cfg, passed, near)
    marked, rounds = mark_duplicates(passed, cfg.clean.exact_dedup, near, num_partitions=2 * num_cpus)
    marked = marked.materialize()
    counts.update(_sum_counts(marked, _dedup_counts))
    kept = marked.map_batches(
        _survivors,
        batch_format="pyarrow",
        fn_kwargs={
            "split_by": oc.split_by,
            "val_fraction": oc.val_fraction,
            "seed": oc.seed,
            "mixture_of": mixture_of,
        },
    ).materialize()
    split_counts = _sum_counts(kept, _split_counts)
    if audit is not None:
        audit = with_copies_kept(audit, _sum_counts(kept, _planted_counts))

    # the corpus's documents only: a tokenizer trained on planted secrets would merge their digits
    sample = _ordered_prefix(
        kept.map_batches(_corpus_only, batch_format="pyarrow") if audit is not None else kept,
        ["doc_hash", "bytes_out", "text"],
        [("doc_hash", "ascending")],
        2**62,
        cfg.tokenizer.sample_bytes,
    ).column("text")
    sample = sample.to_pylist()
    spec = _build_tokenizer(cfg, sample)
    dtype = tok.token_dtype(spec["n_vocab"])
    num_shards = _num_shards(split_counts, sample, spec, oc.shard_tokens, len(groups))
    del sample
    val_listed = _ordered_prefix(
        kept.filter(expr=col("split") == 1),
        ["work", "source", "doc_index", "bytes_out"],
        [("work", "ascending"), ("source", "ascending"), ("doc_index", "ascending")],
        VAL_DOCUMENTS_LISTED,
        2**62,
    )
    sharded = (
        tokenize_stage(kept, spec)
        .map_batches(add_shard_key, batch_format="pyarrow", fn_kwargs={"num_shards": num_shards})
        .groupby("shard_key", num_partitions=min(sum(map(sum, num_shards.values())), 8 * num_cpus))
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
    split_plan = SplitPlan(
        by=oc.split_by.kind,
        val_fraction=oc.val_fraction,
        seed=oc.seed,
        val_documents_total=split_counts["documents:1"],
        ungrouped_documents=split_counts["ungrouped"],
        val_documents=[
            ValDocument(source=r["source"], doc_index=r["doc_index"], work=r["work"]) for r in val_listed.to_pylist()
        ],
    )
    planted_kept = audit["kept_documents"] if audit is not None else 0
    manifest = _manifest(
        cfg,
        sources,
        counts,
        rounds,
        spec,
        dtype,
        descriptors,
        split_plan,
        out_fs,
        out_path,
        planted_kept,
        shard_sources(cfg.mixture, num_shards) if cfg.mixture else {},
    )
    if cfg.mixture:
        manifest.mixture = mixture_entries(cfg.mixture, groups, num_shards, descriptors)
    if audit is not None:
        data = audit_bytes(audit)
        write_bytes(out_fs, f"{out_path}/{AUDIT_FILE}", data)
        manifest.audit = AuditEntry(
            file=AUDIT_FILE,
            sha256=hashlib.sha256(data).hexdigest(),
            planted_documents=audit["planted_documents"],
            kept_documents=audit["kept_documents"],
        )
    manifest_uri = join(oc.uri, MANIFEST)
    write_manifest(manifest, out_fs, out_path)
    if verbose:
        _print_summary(manifest, corpus_bytes, time.time() - t0, manifest_uri)
    return manifest_uri


def shard_sources(mixture, num_shards: dict[int, list[int]]) -> dict[tuple[str, int], str]:
    """(split, shard index) -> the data.mixture source whose documents it holds."""
    return {
        (split, i): mixture[m].name
        for s, split in enumerate(SPLITS)
        for m, shards in enumerate(shard_ranges(num_shards[s]))
        for i in shards
    }


def mixture_entries(mixture, groups, num_shards: dict[int, list[int]], descriptors) -> list[MixtureEntry]:
    """The manifest's data.mixture entries: weights normalized, counts per split from the shards' descriptors."""
    total_weight = sum(m.weight for m in mixture)
    written = {(d["split"], d["index"]): d for d in descriptors}
    counts = [{} for _ in mixture]
    for s, split in enumerate(SPLITS):
        for m, shards in enumerate(shard_ranges(num_shards[s])):
            mine = [written[(split, i)] for i in shards if (split, i) in written]
            counts[m][split] = MixtureSplit(
                documents=sum(d["documents"] for d in mine),
                tokens=sum(d["tokens"] for d in mine),
                sequences=sum(d["sequences"] for d in mine),
                num_shards=len(mine),
            )
    return [
        MixtureEntry(
            name=m.name,
            weight=m.weight / total_weight,
            uris=list(m.uris),
            files=sum(len(s.files) for s in group),
            bytes=sum(s.bytes for s in group),
            splits=counts[k],
        )
        for k, (m, group) in enumerate(zip(mixture, groups))
    ]


def _dropped_text(counts: Counter) -> str:
    dropped = sorted((k.split(":", 1)[1], n) for k, n in counts.items() if k.startswith("dropped:") and n)
    return ", ".join(f"{r}={n}" for r, n in dropped) or "none dropped"


def _manifest(
    cfg, sources, counts, rounds, spec, dtype, descriptors, split_plan, out_fs, out_path, planted_kept, sources_of
) -> Manifest:
    """The manifest of what was written; writes each split's row-group index on the way. Its cleaning
    counts are the corpus's (``planted_kept`` audit documents in the splits are not among them);
    ``sources_of`` names each shard's mixture source ({} without a mixture)."""
    splits = {}
    for split in SPLITS:
        shards = sorted((d for d in descriptors if d["split"] == split), key=lambda d: d["index"])
        splits[split] = SplitEntry(
            documents=sum(d["documents"] for d in shards),
            tokens=sum(d["tokens"] for d in shards),
            sequences=sum(d["sequences"] for d in shards),
            dropped_tail_tokens=sum(d["dropped_tail_tokens"] for d in shards),
            num_shards=len(shards),
            shards=[
                ShardEntry(
                    file=d["file"],
                    sequences=d["sequences"],
                    sha256=d["sha256"],
                    bytes=d["bytes"],
                    row_groups=d["row_groups"],
                    source=sources_of.get((split, d["index"])),
                )
                for d in shards
            ],
            index=write_index(out_fs, out_path, split, [d["index_records"] for d in shards], CODEC),
        )
    reasons = {k.split(":", 1)[1]: n for k, n in counts.items() if k.startswith("dropped:")}
    return Manifest(
        sources=[SourceEntry(uri=s.uri, files=len(s.files), bytes=s.bytes) for s in sources],
        cleaning=CleaningStats(
            documents_in=counts["documents_in"],
            documents_out=sum(s.documents for s in splits.values()) - planted_kept,
            chars_in=counts["chars_in"],
            chars_removed={s: counts[f"removed_{s}"] for s in STEPS},
            replacement_chars=counts["replaced_chars"],
            dropped={r: reasons.get(r, 0) for r in sorted(set(REASONS) | set(reasons))},
            near_dedup_rounds=rounds,
        ),
        tokenizer=TokenizerEntry(
            name=spec["name"],
            hash=spec["hash"],
            n_vocab=spec["n_vocab"],
            eot_token=tok.eot_id(spec),
            ranks_file=tok.RANKS_FILE,
            meta_file=tok.META_FILE,
        ),
        seq_len=cfg.output.seq_len,
        row_tokens=cfg.output.seq_len + 1,
        dtype=dtype,
        splits=splits,
        split=split_plan,
        pii_counts={t: counts[f"pii_{t}"] for t in cfg.clean.pii.types} if cfg.clean.pii.enabled else {},
        config=dataclasses.asdict(cfg),
    )


def _print_summary(m: Manifest, corpus_bytes: int, wall_s: float, manifest_uri: str) -> None:
    c = m.cleaning
    dropped = ", ".join(f"{k}={v}" for k, v in c.dropped.items() if v) or "none"
    print(
        f"[prepare] corpus {corpus_bytes / 1e6:.1f} MB, documents {c.documents_in} -> {c.documents_out} "
        f"(dropped: {dropped}; U+FFFD replacements {c.replacement_chars})"
    )
    if m.config["clean"]["pii"]["enabled"]:
        found = ", ".join(f"{k}={v}" for k, v in m.pii_counts.items())
        print(f"[prepare] personal data replaced by placeholders: {found}")
    for split, s in m.splits.items():
        print(
            f"[prepare] {split}: {s.tokens:,} tokens in {s.sequences:,} rows of {m.row_tokens} "
            f"({s.num_shards} shards, {s.documents} documents, {s.dropped_tail_tokens:,} tail tokens dropped)"
        )
    for source in m.mixture:
        train, val = source.splits["train"], source.splits["val"]
        print(
            f"[prepare] mixture source {source.name} (weight {source.weight:.3f}): train {train.tokens:,} tokens "
            f"in {train.sequences:,} rows ({train.documents} documents), val {val.tokens:,} tokens in "
            f"{val.sequences:,} rows"
        )
    _print_val_documents(m)
    if m.audit is not None:
        print(
            f"[prepare] privacy audit: planted {m.audit.planted_documents} documents (canaries and member "
            f"passages), {m.audit.kept_documents} kept after dedup, all in train; secrets and texts in {m.audit.file}"
        )
    print(f"[prepare] tokenizer {m.tokenizer.name} n_vocab={m.tokenizer.n_vocab} dtype={m.dtype}; wall {wall_s:.1f} s")
    print(f"[prepare] wrote {manifest_uri}")


def _print_val_documents(m: Manifest) -> None:
    """The val documents by work (the leak check a reader can do by eye), and a warning when val is empty."""
    plan = m.split
    works: dict[str, list[str]] = {}
    for d in plan.val_documents:
        name = d.source.rsplit("/", 1)[-1] + (f"#{d.doc_index}" if d.doc_index else "")
        works.setdefault(d.work, []).append(name)
    listed = "; ".join(f"{w}: {', '.join(names)}" for w, names in works.items())
    more = plan.val_documents_total - len(plan.val_documents)
    print(
        f"[prepare] val documents by work (split_by {plan.by}): {listed or 'none'}"
        + (f"; and {more} more (manifest.json lists {len(plan.val_documents)})" if more > 0 else "")
    )
    if plan.ungrouped_documents and plan.by != "document":
        print(
            f"[prepare] WARNING: split_by.{plan.by} found no work for {plan.ungrouped_documents} documents; "
            "each was split on its own"
        )
    val = m.splits["val"]
    if plan.val_fraction > 0 and val.sequences == 0:
        print(
            f"[prepare] WARNING: val has 0 rows ({plan.val_documents_total} documents, {val.dropped_tail_tokens:,} "
            f"tokens: fewer than one row of {m.row_tokens}); validation loss cannot be measured. Raise "
            "output.val_fraction, change output.seed, lower output.seq_len or add documents"
        )
