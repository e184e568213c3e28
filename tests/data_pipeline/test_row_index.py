"""The row-group index and the footerless chunk decoder: what prepare records is where the bytes are,
a chunk decodes from its own bytes to what pyarrow reads, and index records are fetched sparingly."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from data_pipeline.parquet_pages import PageFormatError, decode_chunk
from data_pipeline.row_index import RECORD, RowGroupIndex, write_index
from data_pipeline.shards import BLOCK_ROWS, CODEC, shard_bytes


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_records_locate_each_row_group_and_chunks_decode_without_the_footer(dtype):
    row_tokens = 65
    high = 60_000 if dtype == "uint16" else 4_000_000_000
    tokens = np.random.default_rng(0).integers(0, high, size=row_tokens * (3 * BLOCK_ROWS + 5))
    data, records = shard_bytes(tokens, row_tokens, dtype, {"format": "test"})
    rows = tokens.astype(dtype).reshape(-1, row_tokens)
    md = pq.read_metadata(pa.BufferReader(data))
    assert len(records) == md.num_row_groups == 4 and records.dtype == RECORD
    assert list(records["rows"]) == [8, 8, 8, 5]
    for g, rec in enumerate(records):
        chunk = data[int(rec["offset"]) : int(rec["offset"] + rec["length"])]
        values = decode_chunk(chunk, codec=CODEC, num_values=int(rec["rows"]) * row_tokens)
        assert np.array_equal(values.astype(dtype).reshape(-1, row_tokens), rows[g * BLOCK_ROWS : g * BLOCK_ROWS + 8])
    assert len(shard_bytes(np.zeros(0, dtype=np.int64), row_tokens, dtype, {})[1]) == 0  # an empty shard: none
    with pytest.raises(PageFormatError, match="chunk holds 520 values, its index entry says 521"):
        decode_chunk(data[int(records[0]["offset"]) :][: int(records[0]["length"])], codec=CODEC, num_values=521)


def test_a_chunk_of_several_pages_decodes_and_other_pages_are_named():
    values = np.arange(20_000, dtype=np.uint32)
    table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(values), 100)})
    buf = io.BytesIO()
    options = dict(compression=CODEC, use_dictionary=False, write_statistics=False, data_page_version="1.0")
    pq.write_table(table, buf, data_page_size=4096, column_encoding="PLAIN", **options)
    chunk_md = pq.read_metadata(pa.BufferReader(buf.getvalue())).row_group(0).column(0)
    start = chunk_md.data_page_offset
    chunk = buf.getvalue()[start : start + chunk_md.total_compressed_size]
    assert np.array_equal(decode_chunk(chunk, codec=CODEC, num_values=20_000), values)
    dictionary = io.BytesIO()
    pq.write_table(table, dictionary, compression=CODEC, use_dictionary=True)
    chunk_md = pq.read_metadata(pa.BufferReader(dictionary.getvalue())).row_group(0).column(0)
    start = chunk_md.dictionary_page_offset
    with pytest.raises(PageFormatError, match="found a dictionary page"):
        decode_chunk(dictionary.getvalue()[start : start + chunk_md.total_compressed_size], codec=CODEC, num_values=1)
    with pytest.raises(PageFormatError):
        decode_chunk(bytes(range(40)), codec=CODEC, num_values=1)


def test_index_records_are_read_only_when_needed_and_close_ones_together(tmp_path):
    per_shard = [1000, 500, 2000]
    records = []
    for n in per_shard:
        rec = np.zeros(n, dtype=RECORD)
        rec["offset"], rec["length"], rec["rows"] = np.arange(n) * 100 + 4, 100, BLOCK_ROWS
        records.append(rec.tobytes())
    entry = write_index(pafs.LocalFileSystem(), str(tmp_path), "train", records, CODEC)
    assert entry.row_groups == sum(per_shard) and entry.file == "train/row_groups.idx"
    blob = (tmp_path / entry.file).read_bytes()
    reads = []

    def read_at(offset, nbytes):
        reads.append((offset, nbytes))
        return blob[offset : offset + nbytes]

    index = RowGroupIndex(per_shard, read_at, "test")
    first = index.first
    got = index.records(np.array([first[1] + 7, first[1] + 9, first[2] + 1999, first[0] + 3]))
    assert list(got["offset"]) == [704, 904, 199_904, 304]
    # groups 7 and 9 of shard 1 are 40 bytes apart: one read; the others far apart: a read each
    assert sorted(reads) == [(3 * 20, 20), ((1000 + 7) * 20, 3 * 20), ((1500 + 1999) * 20, 20)]
    index.records(np.array([first[1] + 8, first[0] + 3]))  # already held: no read
    assert len(reads) == 3
