"""Corpus files -> a Ray Data dataset of documents, read in Ray tasks (never via the driver).

Rows: source (file path), doc_index (line/row within the file), text, replaced_chars (invalid UTF-8
sequences turned into U+FFFD), read_error ('' or why the row holds no text: 'bad_json',
'missing_text_field'; counted like any other drop reason), group (the value of ``output.split_by``'s
metadata field, '' when there is none: what makes documents one work for the train/val split).
.txt is one document per file; .jsonl/.json (optionally .gz/.zst, decompressed as a stream) is one
JSON object per line; .parquet is read row group by row group, text column only. Memory per read
task is bounded by one block of documents (or one .txt file), not by file size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FileBasedDatasource

from data_pipeline.clean import decode_utf8
from data_pipeline.config import SourceConfig
from data_pipeline.storage import (
    EMBEDDED_CORPUS,
    EMBEDDED_GLOB,
    DataSourceError,
    embedded_corpus_dir,
    filesystem_for,
    list_files,
)

_TXT = (".txt",)
_JSONL = tuple(f"{e}{c}" for e in (".jsonl", ".json") for c in ("", ".gz", ".zst"))
_PARQUET = (".parquet",)
_EXTENSIONS = {"txt": _TXT, "jsonl": _JSONL, "parquet": _PARQUET, "auto": _TXT + _JSONL + _PARQUET}
_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("doc_index", pa.int64()),
        ("text", pa.string()),
        ("replaced_chars", pa.int64()),
        ("read_error", pa.string()),
        ("group", pa.string()),
    ]
)
_DOCS_PER_BLOCK = 2048
_READ_CHUNK_BYTES = 8 << 20


@dataclass
class ResolvedSource:
    uri: str
    fs: pafs.FileSystem
    files: list[pafs.FileInfo]

    @property
    def bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def resolve_sources(cfg: SourceConfig) -> list[ResolvedSource]:
    """List every configured source's files (sorted); raises DataSourceError naming the URI if none."""
    resolved = []
    for uri in cfg.uris:
        if uri == EMBEDDED_CORPUS or uri.startswith(f"{EMBEDDED_CORPUS}:"):  # "shakespeare:sonnets*" picks texts
            pattern = uri.partition(":")[2] or EMBEDDED_GLOB
            fs, path = pafs.LocalFileSystem(), f"{embedded_corpus_dir()}/{pattern}"
        else:
            fs, path = filesystem_for(uri, cfg.endpoint_url, cfg.region)
        resolved.append(ResolvedSource(uri, fs, list_files(uri, fs, path, _EXTENSIONS[cfg.format])))
    return resolved


def resolve_mixture(mixture: list) -> list[list[ResolvedSource]]:
    """Each data.mixture source's resolved files; a file in two sources is refused (it would be trained
    at two weights)."""
    groups = [resolve_sources(m.source_config()) for m in mixture]
    owner: dict[str, str] = {}
    for m, group in zip(mixture, groups):
        for f in (f for s in group for f in s.files):
            if owner.setdefault(f.path, m.name) != m.name:
                raise DataSourceError(
                    f"{f.path} is in data.mixture sources {owner[f.path]!r} and {m.name!r}; list each file in one "
                    "source (narrow the uris or globs)"
                )
    return groups


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    for name in ("parquet", "jsonl", "txt"):
        if path.endswith(_EXTENSIONS[name]):
            return name
    raise DataSourceError(f"{path}: cannot tell the format from the extension; set sources.format")


class _DocumentDatasource(FileBasedDatasource):
    """Streams .txt and .jsonl files into document rows; Ray handles listing, compression, retries."""

    def __init__(
        self, paths: list[str], *, filesystem: pafs.FileSystem, fmt: str, text_field: str, group_field: Optional[str]
    ):
        super().__init__(paths, filesystem=filesystem)
        self._fmt, self._text_field, self._group_field = fmt, text_field, group_field

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = _format_of(path, self._fmt)
        if fmt == "parquet":
            yield from self._read_parquet(path)
            return
        if fmt == "txt":
            text, replaced = decode_utf8(f.read())
            yield pa.Table.from_pylist(
                [
                    {
                        "source": path,
                        "doc_index": 0,
                        "text": text,
                        "replaced_chars": replaced,
                        "read_error": "",
                        "group": "",
                    }
                ],
                schema=_SCHEMA,
            )
            return
        rows, index, pending = [], 0, b""
        while True:
            chunk = f.read(_READ_CHUNK_BYTES)
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop() if chunk else b""
            for line in lines:
                if line.strip():
                    rows.append(self._parse_line(line, path, index))
                    index += 1
            if len(rows) >= _DOCS_PER_BLOCK or (not chunk and rows):
                yield pa.Table.from_pylist(rows, schema=_SCHEMA)
                rows = []
            if not chunk:
                return

    def _read_parquet(self, path: str) -> Iterator[pa.Table]:
        # Parquet needs random access: open the file itself (the stream Ray passed is not seekable)
        pf = pq.ParquetFile(self._filesystem.open_input_file(path))
        if self._text_field not in pf.schema_arrow.names:
            raise DataSourceError(
                f"{path}: no column {self._text_field!r} (columns: {pf.schema_arrow.names}); set sources.text_field"
            )
        columns = [self._text_field]
        if self._group_field:
            if self._group_field not in pf.schema_arrow.names:
                raise DataSourceError(
                    f"{path}: no column {self._group_field!r} (columns: {pf.schema_arrow.names}); "
                    "set output.split_by.field_name"
                )
            columns.append(self._group_field)
        index = 0
        for batch in pf.iter_batches(batch_size=_DOCS_PER_BLOCK, columns=columns):
            texts = batch.column(0).cast(pa.string()).to_pylist()
            groups = batch.column(1).cast(pa.string()).to_pylist() if self._group_field else [None] * len(texts)
            yield pa.Table.from_pylist(
                [
                    {
                        "source": path,
                        "doc_index": index + i,
                        "text": t or "",
                        "replaced_chars": 0,
                        "read_error": "missing_text_field" if t is None else "",
                        "group": g or "",
                    }
                    for i, (t, g) in enumerate(zip(texts, groups))
                ],
                schema=_SCHEMA,
            )
            index += len(texts)

    def _parse_line(self, line: bytes, path: str, index: int) -> dict:
        text, replaced = decode_utf8(line)
        row = {
            "source": path,
            "doc_index": index,
            "text": "",
            "replaced_chars": replaced,
            "read_error": "",
            "group": "",
        }
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            row["read_error"] = "bad_json"
            return row
        value = obj.get(self._text_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            row["read_error"] = "missing_text_field"
            return row
        row["text"] = value
        group = obj.get(self._group_field) if self._group_field else None
        row["group"] = "" if group is None else str(group)
        return row


def read_documents(
    sources: list[ResolvedSource], cfg: SourceConfig, group_field: Optional[str] = None
) -> ray.data.Dataset:
    """One Ray dataset over every source's files (text formats streamed, Parquet by column);
    ``group_field`` names the JSON key / Parquet column read into the ``group`` column."""
    datasets = []
    for src in sources:
        datasets.append(
            ray.data.read_datasource(
                _DocumentDatasource(
                    [f.path for f in src.files],
                    filesystem=src.fs,
                    fmt=cfg.format,
                    text_field=cfg.text_field,
                    group_field=group_field,
                )
            )
        )
    return union(*datasets)


def union(*datasets: ray.data.Dataset) -> ray.data.Dataset:
    return datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])
