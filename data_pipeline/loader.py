"""Token shards -> training rows for Ray Train workers (no ray.train import).

Training reads per rank (``rank_batches``): the train stream is epoch 0, epoch 1, ... of 8-row blocks
(one Parquet row group each) in an order that is a pure function of (manifest, seed, epoch); rank r of
W takes positions [s*G + r*G/W, s*G + (r+1)*G/W) of step s and fetches only the row groups holding
them, so a global batch depends on (manifest, seed, G, step) and never on W, and resuming at step k
reads step k's rows first. Every row group read is checked against the CRC-32 its shard carries
(``ShardCorruptError``); transient storage errors are retried. ``rank_val_batches`` gives each rank
its part of a fixed validation set; ``split_rows`` reads a split's first rows in one process (eval,
baselines). Bytes read are counted at the filesystem layer (``stats``).

``sequence_dataset`` + ``worker_batches`` (fine-tuning, the demo): a Ray Data stream of the same
shards where every worker iterates the unsplit stream and keeps ``position % world_size == rank``.
Epoch e visits shards in ``rng(seed, e)`` order and each shard's rows in ``rng(seed, e, shard)`` order.
"""

from __future__ import annotations

import bisect
import json
import queue
import threading
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from data_pipeline import tokenizer as tok
from data_pipeline.prepare import MANIFEST_FORMAT
from data_pipeline.shards import BLOCK_ROWS
from data_pipeline.storage import DataSourceError, filesystem_for, read_bytes, with_retries


class ManifestMismatchError(ValueError):
    """Shards built for another tokenizer or sequence length than the run expects."""


def _base(manifest_uri: str) -> str:
    return manifest_uri.rsplit("/", 1)[0]


def read_manifest(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> dict:
    """The parsed manifest.json at ``uri`` (a manifest file URI or its directory)."""
    if not uri.endswith(".json"):
        uri = uri.rstrip("/") + "/manifest.json"
    manifest = json.loads(read_bytes(uri, endpoint_url, region))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataSourceError(
            f"{uri}: not a raylm token manifest (format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r})"
        )
    manifest["uri"] = uri
    return manifest


def load_tokenizer_from_manifest(manifest_uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None):
    """The tiktoken.Encoding stored next to a manifest (checked against the manifest's hash)."""
    manifest = read_manifest(manifest_uri, endpoint_url, region)
    spec = tok.load_spec(_base(manifest["uri"]), endpoint_url, region)
    if spec["hash"] != manifest["tokenizer"]["hash"]:
        raise ManifestMismatchError(
            f"{manifest['uri']}: tokenizer files hash {spec['hash'][:12]} differ from "
            f"the manifest's {manifest['tokenizer']['hash'][:12]}; re-run prepare"
        )
    return tok.encoding(spec)


def check_manifest(manifest: dict, expected_tokenizer_hash: Optional[str], expected_seq_len: Optional[int]) -> None:
    got_hash, got_len = manifest["tokenizer"]["hash"], manifest["seq_len"]
    if expected_tokenizer_hash is not None and got_hash != expected_tokenizer_hash:
        raise ManifestMismatchError(
            f"{manifest['uri']}: shards were tokenized with tokenizer {got_hash[:16]}, but this run expects "
            f"{expected_tokenizer_hash[:16]}; prepare the data with the run's tokenizer or resume with matching data"
        )
    if expected_seq_len is not None and got_len != expected_seq_len:
        raise ManifestMismatchError(
            f"{manifest['uri']}: shards hold seq_len={got_len}, but this run expects "
            f"seq_len={expected_seq_len}; re-run prepare with output.seq_len={expected_seq_len}"
        )


def _plan(manifest: dict, split: str, seed: int, start: int, stop: int) -> list[dict]:
    """Shard read tasks covering stream positions [start, stop); shards outside it are never read."""
    shards = manifest["splits"][split]["shards"]
    sizes = np.array([s["sequences"] for s in shards], dtype=np.int64)
    epoch_len = int(sizes.sum())
    tasks = []
    for epoch in range(start // epoch_len, (stop - 1) // epoch_len + 1):
        order = (
            np.arange(len(shards)) if split == "val" else np.random.default_rng([seed, epoch]).permutation(len(shards))
        )
        offset = epoch * epoch_len
        for shard in order:
            lo, hi = max(start - offset, 0), min(stop - offset, int(sizes[shard]))
            if lo < hi:
                tasks.append(
                    {
                        "file": shards[shard]["file"],
                        "shard": int(shard),
                        "epoch": epoch,
                        "lo": lo,
                        "hi": hi,
                        "first_position": offset + lo,
                        "rows": int(sizes[shard]),
                    }
                )
            offset += int(sizes[shard])
    return tasks


def _read_rows(
    batch: dict, *, fs, base_path: str, seed: int, shuffle: bool, tokenizer_hash: str, seq_len: int, manifest_uri: str
) -> dict:
    """One shard task -> its rows [lo, hi) in the epoch's permuted order, with their stream positions."""
    (task,) = [dict(zip(batch, values)) for values in zip(*batch.values())]
    table = pq.read_table(f"{base_path}/{task['file']}", filesystem=fs)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("raylm.tokenizer_hash") != tokenizer_hash or meta.get("raylm.seq_len") != str(seq_len):
        raise ManifestMismatchError(
            f"{manifest_uri}: shard {task['file']} has tokenizer "
            f"{meta.get('raylm.tokenizer_hash', '?')[:16]} / seq_len {meta.get('raylm.seq_len')}, "
            f"manifest says {tokenizer_hash[:16]} / {seq_len}"
        )
    rows = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(table.num_rows, seq_len + 1)
    if table.num_rows != task["rows"]:
        raise DataSourceError(
            f"{manifest_uri}: shard {task['file']} has {table.num_rows} rows, manifest says {task['rows']}"
        )
    if "raylm.block_crc32" in meta:  # shards from before block checksums decode unchecked
        block, crc_hex = int(meta["raylm.block_rows"]), meta["raylm.block_crc32"]
        for i in range(0, table.num_rows, block):
            if f"{zlib.crc32(rows[i : i + block].tobytes()):08x}" != crc_hex[i // block * 8 : i // block * 8 + 8]:
                raise ShardCorruptError(
                    f"{manifest_uri}: shard {task['file']}: rows {i}..{min(i + block, table.num_rows) - 1} fail "
                    "their CRC-32 check (the shard changed after prepare wrote it); re-run prepare"
                )
    order = (
        np.random.default_rng([seed, int(task["epoch"]), int(task["shard"])]).permutation(table.num_rows)
        if shuffle
        else np.arange(table.num_rows)
    )
    picked = order[int(task["lo"]) : int(task["hi"])]
    return {"position": np.arange(len(picked), dtype=np.int64) + int(task["first_position"]), "tokens": rows[picked]}


def sequence_dataset(
    manifest_uri: str,
    split: str,
    *,
    seed: int,
    start_sequence: int = 0,
    num_sequences: Optional[int] = None,
    expected_tokenizer_hash: Optional[str] = None,
    expected_seq_len: Optional[int] = None,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
) -> ray.data.Dataset:
    """Rows {"position": int64, "tokens": uint16/uint32[seq_len + 1]} for stream positions
    [start_sequence, start_sequence + num_sequences), in position order.

    train: shuffled per epoch as a pure function of (seed, epoch); num_sequences may span epochs;
    None means to the end of the epoch holding start_sequence. val: file order, one pass (no shuffle).
    """
    manifest = read_manifest(manifest_uri, endpoint_url, region)
    check_manifest(manifest, expected_tokenizer_hash, expected_seq_len)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {manifest['uri']} (has {sorted(manifest['splits'])})")
    epoch_len = manifest["splits"][split]["sequences"]
    if epoch_len == 0:
        raise DataSourceError(
            f"{manifest['uri']}: split {split!r} holds no sequences; lower output.seq_len or "
            "raise output.val_fraction and re-run prepare"
        )
    if split == "val":
        start_sequence = min(start_sequence, epoch_len)
        stop = epoch_len if num_sequences is None else min(epoch_len, start_sequence + num_sequences)
    else:
        stop = (
            (start_sequence // epoch_len + 1) * epoch_len if num_sequences is None else start_sequence + num_sequences
        )
    tasks = _plan(manifest, split, seed, start_sequence, stop)
    fs, base_path = filesystem_for(_base(manifest["uri"]), endpoint_url, region)
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
        _read_rows,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "fs": fs,
            "base_path": base_path,
            "seed": seed,
            "shuffle": split != "val",
            "tokenizer_hash": manifest["tokenizer"]["hash"],
            "seq_len": manifest["seq_len"],
            "manifest_uri": manifest["uri"],
        },
    )
    ds.context.execution_options.preserve_order = True  # iteration order = task order = position order
    return ds


def worker_batches(
    data_iterator, *, rank: int, world_size: int, micro_batch_size: int, skip_before: int = 0, prefetch_batches: int = 2
) -> Iterator[np.ndarray]:
    """int64 [micro_batch_size, seq_len + 1] arrays of the rows with position % world_size == rank and
    position >= skip_before, in stream order. ``data_iterator``: a DataIterator or Dataset over the
    unsplit stream. A trailing partial micro batch is not yielded (every rank stops at the same step).
    """
    for rows in worker_examples(
        data_iterator,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        skip_before=skip_before,
        prefetch_batches=prefetch_batches,
    ):
        yield rows["tokens"].astype(np.int64)


def worker_examples(
    data_iterator, *, rank: int, world_size: int, micro_batch_size: int, skip_before: int = 0, prefetch_batches: int = 2
) -> Iterator[dict[str, np.ndarray]]:
    """``worker_batches`` for streams with more columns than tokens (fine-tuning targets, labels):
    micro-batches as {column: array of micro_batch_size rows}, ``position`` left out."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    batches: Iterable[dict] = data_iterator.iter_batches(
        batch_size=micro_batch_size * world_size, batch_format="numpy", prefetch_batches=prefetch_batches
    )
    for batch in batches:
        mask = (batch["position"] % world_size == rank) & (batch["position"] >= skip_before)
        if not mask.any():
            continue
        pending.append({k: v[mask] for k, v in batch.items() if k != "position"})
        have += int(mask.sum())
        while have >= micro_batch_size:
            block = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:micro_batch_size] for k, v in block.items()}
            pending, have = [{k: v[micro_batch_size:] for k, v in block.items()}], have - micro_batch_size


# --- Per-rank reading: each rank fetches only the blocks of the rows it trains on ---------------------


class ShardCorruptError(DataSourceError):
    """A shard whose bytes disagree with its manifest entry or its own block checksums."""


class _CountingFile:
    """A pyarrow file seen through a Python file object that counts the bytes storage returned."""

    def __init__(self, f, handler: "_CountingHandler") -> None:
        self._f, self._handler = f, handler

    def read(self, nbytes: int = -1) -> bytes:
        data = self._f.read() if nbytes is None or nbytes < 0 else self._f.read(nbytes)
        self._handler.add(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def size(self) -> int:
        return self._f.size()

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._f.seekable()

    def writable(self) -> bool:
        return False


class _CountingHandler(pafs.FileSystemHandler):
    """Wraps a pyarrow filesystem (``pafs.PyFileSystem(_CountingHandler(fs))``) and counts every byte
    read through it: the reader's I/O measured where it meets storage, not estimated from row counts."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs, self.bytes_read, self._lock = fs, 0, threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def get_type_name(self) -> str:
        return f"counting+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return pa.PythonFile(_CountingFile(self.fs.open_input_stream(path), self), mode="r")

    def open_input_file(self, path):
        return pa.PythonFile(_CountingFile(self.fs.open_input_file(path), self), mode="r")

    def open_output_stream(self, path, metadata):
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


class _Fetched:
    """The byte ranges of one shard fetched so far, as a read-only file for pyarrow's decoder: row groups
    decode from memory, so a decode failure means corrupt bytes, never a network error."""

    def __init__(self, size: int, pieces: list[tuple[int, bytes]]) -> None:
        self._size, self._pos = size, 0
        self._pieces = sorted(pieces)
        self._starts = [start for start, _ in self._pieces]

    def read(self, nbytes: int = -1) -> bytes:
        i = bisect.bisect_right(self._starts, self._pos) - 1
        start, data = self._pieces[max(i, 0)]
        end = self._size if nbytes is None or nbytes < 0 else self._pos + nbytes
        if i < 0 or end > start + len(data):
            raise OSError(f"bytes [{self._pos}, {end}) lie outside the fetched ranges")
        out = data[self._pos - start : end - start]
        self._pos = end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        pass

    closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False


@dataclass(frozen=True)
class _Layout:
    """One shard's row groups: where each one's bytes lie, its first row, and its rows' CRC-32."""

    footer: pq.FileMetaData
    size: int
    first_row: np.ndarray  # int64 [num_row_groups + 1]
    chunk_start: np.ndarray
    chunk_end: np.ndarray
    crc32: np.ndarray  # uint32 [num_row_groups]


def _parse_footer(tail: bytes, footer: bytes, where: str) -> pq.FileMetaData:
    try:
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))
    except (OSError, ValueError) as err:
        raise ShardCorruptError(f"{where}: the Parquet footer does not parse ({err}); re-run prepare") from err


class ShardReader:
    """Reads rows of one split's shards by row group through a byte-counting filesystem.

    Footers come from ``footers`` (read once by the driver with :func:`shard_footers`) or are read on
    first use; each shard is checked against the manifest (row count, tokenizer, seq_len, size) and
    every row group read against its CRC-32 before any of its rows are returned. Transient storage
    errors are retried with backoff (``storage.with_retries``).
    """

    def __init__(
        self,
        manifest: dict,
        split: str,
        *,
        endpoint_url: Optional[str] = None,
        region: Optional[str] = None,
        footers: Optional[dict] = None,
    ) -> None:
        if split not in manifest["splits"]:
            raise ValueError(f"split {split!r} not in {manifest['uri']} (has {sorted(manifest['splits'])})")
        self.manifest_uri, self.split = manifest["uri"], split
        self.shards = manifest["splits"][split]["shards"]
        self.row_tokens, self.seq_len = manifest["seq_len"] + 1, manifest["seq_len"]
        self.row_bytes = self.row_tokens * np.dtype(manifest["dtype"]).itemsize
        self.tokenizer_hash = manifest["tokenizer"]["hash"]
        fs, self.base_path = filesystem_for(_base(manifest["uri"]), endpoint_url, region)
        self.counter = _CountingHandler(fs)
        self.fs = pafs.PyFileSystem(self.counter)
        self.footers = dict(footers or {})
        self.layouts: dict[int, _Layout] = {}
        self.handles: dict[int, pa.NativeFile] = {}
        self.rows_read = 0

    def where(self, shard: int) -> str:
        return f"{self.manifest_uri}: shard {self.shards[shard]['file']}"

    def _handle(self, shard: int) -> pa.NativeFile:
        if shard not in self.handles:
            path = f"{self.base_path}/{self.shards[shard]['file']}"
            self.handles[shard] = with_retries(lambda: self.fs.open_input_file(path), self.where(shard))
        return self.handles[shard]

    def _read_at(self, shard: int, offset: int, nbytes: int) -> bytes:
        def attempt() -> bytes:
            try:
                return self._handle(shard).read_at(nbytes, offset)
            except OSError:
                stale = self.handles.pop(shard, None)
                if stale is not None:
                    stale.close()  # reconnect on the next try
                raise

        data = with_retries(attempt, self.where(shard))
        if len(data) != nbytes:
            raise ShardCorruptError(
                f"{self.where(shard)}: got {len(data)} of {nbytes} bytes at offset {offset} (truncated?); "
                "re-run prepare"
            )
        return data

    def layout(self, shard: int) -> _Layout:
        """The shard's row-group layout, its footer checked against the manifest (cached)."""
        if shard in self.layouts:
            return self.layouts[shard]
        where, size = self.where(shard), self._handle(shard).size()
        md = self.footers.get(self.shards[shard]["file"])
        if md is None:
            if size < 12:
                raise ShardCorruptError(f"{where}: {size} bytes is too short for a Parquet file; re-run prepare")
            tail = self._read_at(shard, size - 8, 8)
            footer_len = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or footer_len + 12 > size:
                raise ShardCorruptError(f"{where}: no Parquet footer at the end (truncated?); re-run prepare")
            md = _parse_footer(tail, self._read_at(shard, size - 8 - footer_len, footer_len), where)
        meta = {k.decode(): v.decode() for k, v in (md.metadata or {}).items()}
        if meta.get("raylm.tokenizer_hash") != self.tokenizer_hash or meta.get("raylm.seq_len") != str(self.seq_len):
            raise ManifestMismatchError(
                f"{self.manifest_uri}: shard {self.shards[shard]['file']} has tokenizer "
                f"{meta.get('raylm.tokenizer_hash', '?')[:16]} / seq_len {meta.get('raylm.seq_len')}, "
                f"manifest says {self.tokenizer_hash[:16]} / {self.seq_len}"
            )
        if "raylm.block_crc32" not in meta:
            raise DataSourceError(
                f"{where} was written by an older raylm (one large row group, no block checksums), which "
                "training cannot read per rank; re-run `raylm prepare` with output.overwrite=true"
            )
        if md.num_rows != self.shards[shard]["sequences"]:
            raise ShardCorruptError(
                f"{where} has {md.num_rows} rows, the manifest says {self.shards[shard]['sequences']}; re-run prepare"
            )
        crc_hex = meta["raylm.block_crc32"]
        if len(crc_hex) != 8 * md.num_row_groups:
            raise ShardCorruptError(f"{where}: {md.num_row_groups} row groups but {len(crc_hex) // 8} block checksums")
        chunks = [md.row_group(i).column(0) for i in range(md.num_row_groups)]
        start = np.array([c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks])
        end = start + np.array([c.total_compressed_size for c in chunks])
        if int(end.max(initial=4)) + md.serialized_size + 8 != size:
            raise ShardCorruptError(
                f"{where} is {size} bytes, its footer describes {int(end.max(initial=4)) + md.serialized_size + 8} "
                "(truncated or appended to?); re-run prepare"
            )
        first_row = np.zeros(md.num_row_groups + 1, dtype=np.int64)
        np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)], out=first_row[1:])
        crc = np.array([int(crc_hex[i : i + 8], 16) for i in range(0, len(crc_hex), 8)], dtype=np.uint32)
        self.layouts[shard] = _Layout(md, size, first_row, start, end, crc)
        return self.layouts[shard]

    def _row_groups(self, shard: int, groups: list[int]) -> dict[int, np.ndarray]:
        """Row groups of one shard, fetched with one range read per run of adjacent groups, decoded and
        checked against their CRC-32: {group: rows as stored}."""
        lay, where = self.layout(shard), self.where(shard)
        pieces, run_start = [], 0
        for k in range(1, len(groups) + 1):
            if k == len(groups) or groups[k] != groups[k - 1] + 1:
                lo, hi = int(lay.chunk_start[groups[run_start]]), int(lay.chunk_end[groups[k - 1]])
                pieces.append((lo, self._read_at(shard, lo, hi - lo)))
                run_start = k
        try:
            table = pq.ParquetFile(_Fetched(lay.size, pieces), metadata=lay.footer, pre_buffer=False).read_row_groups(
                groups, columns=["tokens"]
            )
            flat = table.column("tokens").combine_chunks().flatten().to_numpy()
        except (OSError, ValueError, pa.ArrowException) as err:
            raise ShardCorruptError(f"{where}: row groups {groups} do not decode ({err}); re-run prepare") from err
        out, at = {}, 0
        for g in groups:
            n = int(lay.first_row[g + 1] - lay.first_row[g])
            rows = flat[at * self.row_tokens : (at + n) * self.row_tokens].reshape(n, self.row_tokens)
            if zlib.crc32(rows.tobytes()) != int(lay.crc32[g]):
                raise ShardCorruptError(
                    f"{where}: rows {lay.first_row[g]}..{lay.first_row[g + 1] - 1} fail their CRC-32 check "
                    "(the shard changed after prepare wrote it); re-run prepare"
                )
            out[g], at = rows, at + n
        self.rows_read += at
        return out

    def read(self, segments: list[tuple[int, int, int]]) -> np.ndarray:
        """int64 [rows, seq_len + 1]: the rows of (shard, first row, end row) segments, in order."""
        needed: dict[int, set[int]] = {}
        for shard, lo, hi in segments:
            first_row = self.layout(shard).first_row
            g_lo, g_hi = np.searchsorted(first_row, lo, "right") - 1, np.searchsorted(first_row, hi, "left")
            needed.setdefault(shard, set()).update(range(int(g_lo), int(g_hi)))
        groups = {shard: self._row_groups(shard, sorted(gs)) for shard, gs in needed.items()}
        parts = []
        for shard, lo, hi in segments:
            first_row = self.layouts[shard].first_row
            for g in range(int(np.searchsorted(first_row, lo, "right") - 1), int(np.searchsorted(first_row, hi))):
                g0 = int(first_row[g])
                parts.append(groups[shard][g][max(lo, g0) - g0 : min(hi, int(first_row[g + 1])) - g0])
        if not parts:
            return np.zeros((0, self.row_tokens), dtype=np.int64)
        return np.concatenate(parts).astype(np.int64)


def shard_footers(
    manifest: dict, split: str = "train", endpoint_url: Optional[str] = None, region: Optional[str] = None
) -> dict[str, pq.FileMetaData]:
    """{shard file: Parquet footer} for a split, read once (on the driver) and handed to every rank's
    reader, so ranks read no metadata from storage. Footers are small and picklable."""
    reader = ShardReader(manifest, split, endpoint_url=endpoint_url, region=region)
    return {s["file"]: reader.layout(i).footer for i, s in enumerate(reader.shards)}


def split_rows(
    manifest: dict,
    split: str,
    *,
    num_sequences: Optional[int] = None,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
) -> np.ndarray:
    """int64 [n, seq_len + 1]: the first ``num_sequences`` rows of ``split`` (all when None) in shard-file
    order, read in this process through ``ShardReader`` (block CRCs checked), no Ray. For the val split
    these are the rows ``sequence_dataset(..., "val")`` streams and ``rank_val_batches`` scores."""
    reader = ShardReader(manifest, split, endpoint_url=endpoint_url, region=region)
    left = sum(s["sequences"] for s in reader.shards) if num_sequences is None else num_sequences
    segments = []
    for shard, entry in enumerate(reader.shards):
        take = min(left, entry["sequences"])
        if take > 0:
            segments.append((shard, 0, take))
            left -= take
    return reader.read(segments)


class _TrainOrder:
    """The train split's stream order: epoch e is the blocks (BLOCK_ROWS consecutive rows of a shard)
    in ``rng(seed, e)`` order, full blocks first, then each shard's shorter last block. An epoch is
    cut to a multiple of BLOCK_ROWS so every epoch starts block-aligned: the last ``N % BLOCK_ROWS``
    rows of each epoch's order (a different few each epoch) are left out of that epoch."""

    def __init__(self, rows_per_shard: list[int], seed: int) -> None:
        sizes = np.asarray(rows_per_shard, dtype=np.int64)
        blocks = (sizes + BLOCK_ROWS - 1) // BLOCK_ROWS
        self.shard = np.repeat(np.arange(len(sizes)), blocks)
        self.start = np.concatenate([np.arange(0, n, BLOCK_ROWS) for n in sizes]) if len(sizes) else np.zeros(0, int)
        self.rows = np.minimum(BLOCK_ROWS, sizes[self.shard] - self.start)
        total = int(sizes.sum())
        self.epoch_rows = total - total % BLOCK_ROWS if total >= BLOCK_ROWS else total
        self.seed, self._cached = seed, (-1, None, None)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block indices in stream order, each block's end position within the epoch)."""
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            full = self.rows == BLOCK_ROWS
            idx = np.concatenate([rng.permutation(np.flatnonzero(full)), rng.permutation(np.flatnonzero(~full))])
            self._cached = (epoch, idx, np.cumsum(self.rows[idx]))
        return self._cached[1], self._cached[2]

    def segments(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(shard, first row, end row) runs holding stream positions [lo, hi), in stream order."""
        out, pos = [], lo
        while pos < hi:
            epoch, at = divmod(pos, self.epoch_rows)
            stop = min(hi - epoch * self.epoch_rows, self.epoch_rows)
            idx, ends = self.order(epoch)
            b = int(np.searchsorted(ends, at, "right"))
            while at < stop:
                block = idx[b]
                begin = int(ends[b] - self.rows[block])
                take = min(int(ends[b]), stop) - at
                first = int(self.start[block]) + at - begin
                out.append((int(self.shard[block]), first, first + take))
                at += take
                b += 1
            pos = epoch * self.epoch_rows + stop
        return out


class RankBatches:
    """An iterable of one rank's micro-batches, read ahead by a background thread (``prefetch`` read
    units queued; 0 reads in the caller's thread), with ``stats``: bytes_read (at the filesystem layer,
    footers included), rows_read (rows decoded), rows_yielded and row_bytes_yielded (those rows as
    stored, the denominator of the read amplification)."""

    def __init__(self, reader: ShardReader, units: Callable[[], Iterator[list]], prefetch: int) -> None:
        self.reader, self._units, self.prefetch = reader, units, prefetch
        self.rows_yielded = 0

    @property
    def stats(self) -> dict:
        return {
            "bytes_read": self.reader.counter.bytes_read,
            "rows_read": self.reader.rows_read,
            "rows_yielded": self.rows_yielded,
            "row_bytes_yielded": self.rows_yielded * self.reader.row_bytes,
        }

    def __iter__(self):
        units = self._units() if self.prefetch <= 0 else _prefetched(self._units(), self.prefetch)
        for unit in units:
            for item in unit:
                self.rows_yielded += len(item) if isinstance(item, np.ndarray) else int((item[1] > 0).sum())
                yield item


def _prefetched(units: Iterator[list], depth: int) -> Iterator[list]:
    """``units`` produced by a daemon thread up to ``depth`` ahead; its errors re-raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for unit in units:
                if not put(unit):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    thread = threading.Thread(target=work, name="raylm-data-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def rank_batches(
    manifest: dict,
    *,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    start_step: int,
    num_steps: int,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
    prefetch: int = 2,
    footers: Optional[dict] = None,
) -> RankBatches:
    """Rank ``rank``'s int64 [micro_batch_size, seq_len + 1] micro-batches of the train split for
    optimizer steps [start_step, start_step + num_steps): per step, G/(W*micro) micro-batches of its
    slice [s*G + r*G/W, s*G + (r+1)*G/W) of the stream (G = global_batch_size, W = world_size).

    The rows at a stream position are a pure function of (manifest, seed, position), so each global
    batch is a function of (manifest, seed, G, step) whatever W, and a reader started at step k yields
    what an uninterrupted one yields from k, reading only step k's rows first. Only the row groups
    holding the rank's rows are fetched (pass ``footers`` from :func:`shard_footers` to skip footer reads).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if global_batch_size % world_size or (global_batch_size // world_size) % micro_batch_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} must split into world_size {world_size} x micro_batch_size "
            f"{micro_batch_size} x an integer number of micro-batches"
        )
    if start_step < 0 or num_steps < 0:
        raise ValueError(f"start_step ({start_step}) and num_steps ({num_steps}) must be >= 0")
    reader = ShardReader(manifest, "train", endpoint_url=endpoint_url, region=region, footers=footers)
    order = _TrainOrder([s["sequences"] for s in reader.shards], seed)
    if order.epoch_rows == 0:
        raise DataSourceError(f"{manifest['uri']}: the train split holds no sequences; re-run prepare")
    per_rank = global_batch_size // world_size

    def units() -> Iterator[list]:
        for step in range(start_step, start_step + num_steps):
            lo = step * global_batch_size + rank * per_rank
            rows = reader.read(order.segments(lo, lo + per_rank))
            yield [rows[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]

    return RankBatches(reader, units, prefetch)


def rank_val_batches(
    manifest: dict,
    *,
    num_sequences: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
    prefetch: int = 2,
    footers: Optional[dict] = None,
) -> RankBatches:
    """Rank ``rank``'s share of a fixed validation set: the first ``num_sequences`` rows of the val split
    in file order (fewer if val is smaller), cut into ``world_size`` contiguous parts. Yields
    (int64 tokens [micro_batch_size, seq_len + 1], float32 weights [micro_batch_size]); every rank yields
    the same number of micro-batches (ZeRO-3 forwards are collective), padding rows are zeros with weight
    0, so a weight-averaged per-sequence loss is the same set's mean at any world size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if num_sequences < 1 or micro_batch_size < 1:
        raise ValueError(f"num_sequences ({num_sequences}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    reader = ShardReader(manifest, "val", endpoint_url=endpoint_url, region=region, footers=footers)
    sizes = np.array([s["sequences"] for s in reader.shards], dtype=np.int64)
    n = min(num_sequences, int(sizes.sum()))
    if n == 0:
        raise DataSourceError(
            f"{manifest['uri']}: the val split holds no sequences; raise output.val_fraction and re-run prepare"
        )
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    num_micro = ((n + world_size - 1) // world_size + micro_batch_size - 1) // micro_batch_size
    first = np.concatenate([[0], np.cumsum(sizes)])

    def units() -> Iterator[list]:
        for m in range(num_micro):
            a, b = min(lo + m * micro_batch_size, hi), min(lo + (m + 1) * micro_batch_size, hi)
            segments = [
                (int(i), max(a, int(first[i])) - int(first[i]), min(b, int(first[i + 1])) - int(first[i]))
                for i in range(len(sizes))
                if max(a, first[i]) < min(b, first[i + 1])
            ]
            tokens = np.zeros((micro_batch_size, reader.row_tokens), dtype=np.int64)
            weights = np.zeros(micro_batch_size, dtype=np.float32)
            tokens[: b - a], weights[: b - a] = reader.read(segments), 1.0
            yield [(tokens, weights)]

    return RankBatches(reader, units, prefetch)
