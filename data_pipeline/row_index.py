"""The row-group index: where every row group of a split lies, so a rank reads rows without footers.

``prepare`` writes one file per split (``<split>/row_groups.idx``) next to the shards: fixed-size
little-endian records (``RECORD``: byte offset and length of the row group's column chunk in its
shard, its rows, the CRC-32 of its rows), shard after shard in the manifest's order, row group after
row group. The manifest's split entry names the file, its record count and the chunks' codec. A rank
finds shard s's records at ``sum(row_groups of shards before s)`` and range-reads only the records of
the row groups it is about to fetch; nothing but the manifest travels in a worker's plan, and no
Parquet footer is read at training time (``parquet_pages.decode_chunk`` decodes a chunk from its bytes).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.fs as pafs

from data_pipeline.manifest import IndexEntry
from data_pipeline.storage import write_bytes

INDEX_FORMAT = "raylm-row-group-index/1"
RECORD = np.dtype([("offset", "<u8"), ("length", "<u4"), ("rows", "<u4"), ("crc32", "<u4")])
COALESCE_GAP = 512  # index bytes between two wanted records read through rather than a second request


def write_index(fs: pafs.FileSystem, out_path: str, split: str, records: list[bytes], codec: str) -> IndexEntry:
    """Writes ``<out_path>/<split>/row_groups.idx`` from each shard's records (manifest order)."""
    data = b"".join(records)
    name = f"{split}/row_groups.idx"
    write_bytes(fs, f"{out_path}/{name}", data)
    return IndexEntry(
        file=name,
        format=INDEX_FORMAT,
        row_groups=len(data) // RECORD.itemsize,
        codec=codec,
        sha256=hashlib.sha256(data).hexdigest(),
    )


class RowGroupIndex:
    """One split's index, read by range as row groups are needed and kept once read.

    ``read_at(offset, nbytes)`` fetches bytes of the index file (the caller counts them); shard s's
    records start at record ``first[s]``, from the manifest's per-shard row-group counts. Records live in
    one array of the split's size (zero pages cost no memory until a record lands on them).
    """

    def __init__(self, row_groups_per_shard: list[int], read_at, where: str) -> None:
        self.first = np.zeros(len(row_groups_per_shard) + 1, dtype=np.int64)
        np.cumsum(row_groups_per_shard, out=self.first[1:])
        self.read_at, self.where = read_at, where
        self.table = np.zeros(int(self.first[-1]), dtype=RECORD)
        self.loaded = np.zeros(int(self.first[-1]), dtype=bool)

    def records(self, numbers: np.ndarray) -> np.ndarray:
        """RECORD [len(numbers)] of record numbers ``numbers`` (``first[shard] + row group``), fetching
        the missing ones, across shards, with one range read per run closer than COALESCE_GAP bytes."""
        numbers = np.asarray(numbers, dtype=np.int64)
        missing = np.unique(numbers[~self.loaded[numbers]])
        if len(missing):
            breaks = np.flatnonzero(np.diff(missing) * RECORD.itemsize > COALESCE_GAP) + 1
            for run in np.split(missing, breaks):
                lo, hi = int(run[0]), int(run[-1]) + 1
                data = self.read_at(lo * RECORD.itemsize, (hi - lo) * RECORD.itemsize)
                if len(data) != (hi - lo) * RECORD.itemsize:
                    raise ValueError(f"{self.where}: records {lo}..{hi - 1} lie past the end of the index")
                self.table[lo:hi] = np.frombuffer(data, dtype=RECORD)
                self.loaded[lo:hi] = True
        return self.table[numbers]
