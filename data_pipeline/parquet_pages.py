"""Decode one token row group's column chunk from its bytes alone, without the shard's Parquet footer.

A training rank knows where a row group lies from the row-group index (``row_index.py``) and what its
column is from the manifest (shards are written by one pinned writer, ``shards.shard_bytes``: one
``tokens`` column of INT32 values, PLAIN encoding, v1 data pages, no dictionary, no nulls). The chunk
itself carries everything else: each page starts with a Thrift compact-protocol ``PageHeader`` saying
how long it is and how many values it holds, followed by the compressed page (repetition levels,
definition levels, then the values). So a rank decodes a row group from one range read, and no footer
is read or shipped anywhere. Anything that is not such a page is an error naming what was found.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3
PLAIN = 0


class PageFormatError(ValueError):
    """Bytes that are not the pages raylm's shard writer produces."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if pos >= len(buf):
            raise PageFormatError("page header runs past the end of the chunk")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise PageFormatError("page header holds an over-long varint")


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _value(buf: bytes, pos: int, kind: int):
    """One Thrift compact value of type ``kind`` at ``pos``: (value, next pos); containers are skipped
    into lists/dicts of their values so that unknown fields of any type are stepped over."""
    if kind in (1, 2):  # booleans inside a struct carry their value in the type nibble
        return kind == 1, pos
    if kind == 3:
        return buf[pos], pos + 1
    if kind in (4, 5, 6):
        raw, pos = _varint(buf, pos)
        return _zigzag(raw), pos
    if kind == 7:
        return buf[pos : pos + 8], pos + 8
    if kind == 8:
        size, pos = _varint(buf, pos)
        return buf[pos : pos + size], pos + size
    if kind in (9, 10):
        head = buf[pos]
        pos += 1
        size, elem = head >> 4, head & 0x0F
        if size == 15:
            size, pos = _varint(buf, pos)
        items = []
        for _ in range(size):
            if elem in (1, 2):  # booleans inside a list take a byte each
                item, pos = buf[pos] == 1, pos + 1
            else:
                item, pos = _value(buf, pos, elem)
            items.append(item)
        return items, pos
    if kind == 11:
        size, pos = _varint(buf, pos)
        if size == 0:
            return {}, pos
        types = buf[pos]
        pos += 1
        out = {}
        for _ in range(size):
            key, pos = _value(buf, pos, types >> 4)
            out[key], pos = _value(buf, pos, types & 0x0F)
        return out, pos
    if kind == 12:
        return _struct(buf, pos)
    raise PageFormatError(f"page header holds Thrift type {kind}, which no Parquet page header has")


def _struct(buf: bytes, pos: int) -> tuple[dict, int]:
    fields, last = {}, 0
    while True:
        if pos >= len(buf):
            raise PageFormatError("page header runs past the end of the chunk")
        head = buf[pos]
        pos += 1
        if head == 0:
            return fields, pos
        delta, kind = head >> 4, head & 0x0F
        if delta:
            field = last + delta
        else:
            raw, pos = _varint(buf, pos)
            field = _zigzag(raw)
        fields[field], pos = _value(buf, pos, kind)
        last = field


def _levels_end(page: bytes, pos: int) -> int:
    """End of one v1 level section (4-byte little-endian length, then RLE data) starting at ``pos``."""
    if pos + 4 > len(page):
        raise PageFormatError("data page too short for its level sections")
    return pos + 4 + int.from_bytes(page[pos : pos + 4], "little")


def decode_chunk(chunk: bytes, *, codec: str, num_values: int) -> np.ndarray:
    """uint32 [num_values]: the INT32 values of a column chunk holding ``num_values`` non-null values in
    v1 data pages; ``PageFormatError`` if the bytes are anything else or hold another count."""
    try:
        return _decode(chunk, codec, num_values)
    except (IndexError, TypeError, AttributeError) as err:  # a header whose fields are not what they claim
        raise PageFormatError(f"page header does not parse ({type(err).__name__}: {err})") from None


@functools.lru_cache(maxsize=None)
def _decompressor(codec: str) -> pa.Codec | None:
    """One pyarrow codec per name for the process (a rank decodes thousands of chunks)."""
    return pa.Codec(codec.lower()) if codec.upper() != "UNCOMPRESSED" else None


def _decode(chunk: bytes, codec: str, num_values: int) -> np.ndarray:
    decompressor = _decompressor(codec)
    parts, pos, seen = [], 0, 0
    while pos < len(chunk):
        header, pos = _struct(chunk, pos)
        kind, size, raw_size = header.get(1), header.get(3), header.get(2)
        if kind != DATA_PAGE:
            what = {DICTIONARY_PAGE: "a dictionary page", DATA_PAGE_V2: "a v2 data page"}.get(kind, f"page type {kind}")
            raise PageFormatError(f"found {what}; raylm shards hold v1 data pages only")
        if size is None or raw_size is None or size < 0 or raw_size < 0 or pos + size > len(chunk):
            raise PageFormatError(f"a page of {size} bytes at {pos} runs past the chunk's {len(chunk)}")
        data_header = header.get(5, {})
        count, encoding = data_header.get(1), data_header.get(2)
        if encoding != PLAIN:
            raise PageFormatError(f"values encoded with Parquet encoding {encoding}, expected PLAIN")
        body = chunk[pos : pos + size]
        pos += size
        page = decompressor.decompress(body, decompressed_size=raw_size).to_pybytes() if decompressor else body
        values_at = _levels_end(page, _levels_end(page, 0))  # repetition levels, then definition levels
        if len(page) - values_at != 4 * count:
            raise PageFormatError(f"page holds {len(page) - values_at} value bytes for {count} INT32 values")
        parts.append(np.frombuffer(page, dtype="<u4", offset=values_at))
        seen += count
    if seen != num_values:
        raise PageFormatError(f"chunk holds {seen} values, its index entry says {num_values}")
    return np.concatenate(parts) if len(parts) != 1 else parts[0]
