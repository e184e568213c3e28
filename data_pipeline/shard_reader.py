"""The one reader of token shards: rows by row group, located through the row-group index, CRC-checked.

Training ranks, the Ray Data stream (fine-tuning, the demo), eval and the baselines all read shards
through ``ShardReader``. It opens a shard once (its size checked against the manifest), finds the row
groups it needs in the split's index (``row_index.py``, read by range), fetches each run of adjacent
row groups with one range read, decodes the chunks from their own bytes (``parquet_pages``: no footer
is ever read) and checks every row group's rows against the CRC-32 its index record carries before
returning any of them. Transient storage errors are retried (``storage.with_retries``). The bytes it
reads are counted where they come back from storage: shard bytes, index bytes, and the compressed
bytes of the row groups the caller asked for (the ideal a reader could reach).
"""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np
import pyarrow as pa

from data_pipeline.manifest import manifest_dir
from data_pipeline.parquet_pages import PageFormatError, decode_chunk
from data_pipeline.row_index import INDEX_FORMAT, RECORD, RowGroupIndex
from data_pipeline.shards import BLOCK_ROWS
from data_pipeline.storage import DataSourceError, filesystem_for, with_retries


class ShardCorruptError(DataSourceError):
    """A shard whose bytes disagree with its manifest entry or its row-group index."""


class ShardReader:
    """Reads rows of one split's shards. ``read([(shard, first row, end row), ...])`` -> int64 rows."""

    def __init__(
        self, manifest: dict, split: str, *, endpoint_url: Optional[str] = None, region: Optional[str] = None
    ) -> None:
        if split not in manifest["splits"]:
            raise ValueError(f"split {split!r} not in {manifest['uri']} (has {sorted(manifest['splits'])})")
        entry = manifest["splits"][split]
        self.manifest_uri, self.split = manifest["uri"], split
        self.shards, self.index_entry = entry["shards"], entry["index"]
        if self.index_entry["format"] != INDEX_FORMAT:
            raise DataSourceError(
                f"{self.manifest_uri}: {split} index is {self.index_entry['format']!r}, this raylm reads "
                f"{INDEX_FORMAT!r}; re-run `raylm prepare` with output.overwrite=true"
            )
        for s in self.shards:
            if s["row_groups"] != -(-s["sequences"] // BLOCK_ROWS):
                raise ShardCorruptError(
                    f"{self.where_file(s['file'])}: {s['row_groups']} row groups for {s['sequences']} rows of "
                    f"{BLOCK_ROWS}-row blocks; re-run prepare"
                )
        self.seq_len, self.row_tokens = manifest["seq_len"], manifest["seq_len"] + 1
        self.dtype = np.dtype(manifest["dtype"])
        self.row_bytes = self.row_tokens * self.dtype.itemsize
        self.fs, self.base_path = filesystem_for(manifest_dir(manifest["uri"]), endpoint_url, region)
        self.handles: dict[int, pa.NativeFile] = {}
        self.index = RowGroupIndex([s["row_groups"] for s in self.shards], self._read_index, self._index_where())
        self.bytes_read = self.index_bytes_read = self.needed_bytes = self.rows_read = 0

    def where_file(self, name: str) -> str:
        return f"{self.manifest_uri}: shard {name}"

    def where(self, shard: int) -> str:
        return self.where_file(self.shards[shard]["file"])

    def _index_where(self) -> str:
        return f"{self.manifest_uri}: {self.split} index {self.index_entry['file']}"

    def _read(self, key: int, name: str, size: int, where: str, offset: int, nbytes: int) -> bytes:
        """Bytes [offset, offset + nbytes) of a file (key: a shard, or -1 for the index), opened once and its
        size checked; a failed read drops the handle so the retry reconnects (``storage.with_retries``)."""

        def attempt() -> bytes:
            if key not in self.handles:
                handle = self.fs.open_input_file(f"{self.base_path}/{name}")
                if handle.size() != size:
                    raise ShardCorruptError(
                        f"{where} is {handle.size()} bytes, the manifest says {size} (truncated or replaced after "
                        "prepare wrote it?); re-run prepare"
                    )
                self.handles[key] = handle
            try:
                return self.handles[key].read_at(nbytes, offset)
            except OSError:
                self.handles.pop(key).close()
                raise

        return with_retries(attempt, where)

    def _read_index(self, offset: int, nbytes: int) -> bytes:
        size = self.index_entry["row_groups"] * RECORD.itemsize
        data = self._read(-1, self.index_entry["file"], size, self._index_where(), offset, nbytes)
        self.index_bytes_read += len(data)
        return data

    def _read_at(self, shard: int, offset: int, nbytes: int) -> bytes:
        entry, where = self.shards[shard], self.where(shard)
        data = self._read(shard, entry["file"], entry["bytes"], where, offset, nbytes)
        self.bytes_read += len(data)
        if len(data) != nbytes:
            raise ShardCorruptError(f"{where}: bytes [{offset}, {offset + nbytes}) lie past its end; re-run prepare")
        return data

    def _row_groups(self, shard: int, groups: np.ndarray) -> dict[int, np.ndarray]:
        """{row group: its rows as stored} for ``groups`` (sorted, distinct) of one shard: one range read
        per run of adjacent row groups, each decoded and checked against its CRC-32."""
        where, n = self.where(shard), self.shards[shard]["sequences"]
        records = self.index.records(self.index.first[shard] + groups)
        self.needed_bytes += int(records["length"].sum())
        out, run_start = {}, 0
        for k in range(1, len(groups) + 1):
            if k < len(groups) and records["offset"][k] == records["offset"][k - 1] + records["length"][k - 1]:
                continue
            lo = int(records["offset"][run_start])
            data = self._read_at(shard, lo, int(records["offset"][k - 1] + records["length"][k - 1]) - lo)
            for i in range(run_start, k):
                g, rec = int(groups[i]), records[i]
                rows = min(BLOCK_ROWS, n - g * BLOCK_ROWS)
                if int(rec["rows"]) != rows:
                    raise ShardCorruptError(f"{where}: index says row group {g} holds {rec['rows']} rows, not {rows}")
                at = int(rec["offset"]) - lo
                try:
                    flat = decode_chunk(
                        data[at : at + int(rec["length"])],
                        codec=self.index_entry["codec"],
                        num_values=rows * self.row_tokens,
                    )
                except (PageFormatError, OSError, ValueError, pa.ArrowException) as err:
                    raise ShardCorruptError(f"{where}: row group {g} does not decode ({err}); re-run prepare") from err
                block = flat.astype(self.dtype).reshape(rows, self.row_tokens)
                if zlib.crc32(block.tobytes()) != int(rec["crc32"]):
                    raise ShardCorruptError(
                        f"{where}: rows {g * BLOCK_ROWS}..{g * BLOCK_ROWS + rows - 1} fail their CRC-32 check "
                        "(the shard changed after prepare wrote it); re-run prepare"
                    )
                out[g] = block
                self.rows_read += rows
            run_start = k
        return out

    def read(self, segments: list[tuple[int, int, int]], dtype=np.int64) -> np.ndarray:
        """[rows, seq_len + 1] of ``dtype`` (int64 for a model; ``self.dtype`` keeps them as stored): the rows
        of (shard, first row, end row) segments, in order."""
        needed: dict[int, set[int]] = {}
        for shard, lo, hi in segments:
            if not 0 <= lo <= hi <= self.shards[shard]["sequences"]:
                raise ValueError(
                    f"{self.where(shard)}: rows [{lo}, {hi}) lie outside its {self.shards[shard]['sequences']}"
                )
            needed.setdefault(shard, set()).update(range(lo // BLOCK_ROWS, -(-hi // BLOCK_ROWS)))
        groups = {shard: self._row_groups(shard, np.array(sorted(gs), dtype=np.int64)) for shard, gs in needed.items()}
        parts = []
        for shard, lo, hi in segments:
            for g in range(lo // BLOCK_ROWS, -(-hi // BLOCK_ROWS)):
                g0 = g * BLOCK_ROWS
                parts.append(groups[shard][g][max(lo, g0) - g0 : min(hi, g0 + BLOCK_ROWS) - g0])
        if not parts:
            return np.zeros((0, self.row_tokens), dtype=dtype)
        return np.concatenate(parts).astype(dtype, copy=False)


def split_rows(
    manifest: dict,
    split: str,
    *,
    num_sequences: Optional[int] = None,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
) -> np.ndarray:
    """int64 [n, seq_len + 1]: the first ``num_sequences`` rows of ``split`` (all when None) in shard-file
    order, read in this process through ``ShardReader``, no Ray. For the val split these are the rows
    ``stream.sequence_dataset(..., "val")`` streams and ``loader.rank_val_batches`` scores."""
    reader = ShardReader(manifest, split, endpoint_url=endpoint_url, region=region)
    left = sum(s["sequences"] for s in reader.shards) if num_sequences is None else num_sequences
    segments = []
    for shard, entry in enumerate(reader.shards):
        take = min(left, entry["sequences"])
        if take > 0:
            segments.append((shard, 0, take))
            left -= take
    return reader.read(segments)
