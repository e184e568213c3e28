"""manifest.json: what `prepare` wrote (sources, cleaning counts, tokenizer, split plan, shards, index), typed.

One writer and one reader for the file: ``prepare`` builds a ``Manifest`` and calls ``write_manifest``;
``load_manifest`` (typed) and ``read_manifest`` (the same, checked, as the plain dict workers are
handed) read it, and ``Manifest.from_dict`` checks every key and type and names the bad one (keys may
be added, never renamed). ``check_manifest`` and ``load_tokenizer_from_manifest`` hold a run to the
data it expects.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs

from data_pipeline import tokenizer as tok
from data_pipeline.storage import DataSourceError, read_bytes, write_bytes

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "raylm-token-manifest/1"
VAL_DOCUMENTS_LISTED = 1000  # the manifest lists at most this many val documents (the count is always exact)


class ManifestError(DataSourceError):
    """A manifest.json that is not one `prepare` writes: missing key, wrong type, other format."""


class ManifestMismatchError(ValueError):
    """Shards built for another tokenizer or sequence length than the run expects."""


@dataclass
class SourceEntry:
    uri: str
    files: int
    bytes: int


@dataclass
class CleaningStats:
    documents_in: int = 0
    documents_out: int = 0
    chars_in: int = 0
    chars_removed: dict[str, int] = field(default_factory=dict)  # per cleaning step
    replacement_chars: int = 0  # invalid UTF-8 sequences decoded to U+FFFD
    dropped: dict[str, int] = field(default_factory=dict)  # per drop reason
    near_dedup_rounds: int = 0  # rounds of the Ray Data near-dedup resolution


@dataclass
class TokenizerEntry:
    name: str
    hash: str
    n_vocab: int
    eot_token: int
    ranks_file: str
    meta_file: str


@dataclass
class ShardEntry:
    file: str  # relative to the manifest's directory
    sequences: int
    sha256: str
    bytes: int  # the file's size: a shorter or longer object is refused before any row is read
    row_groups: int  # its records in the split's row-group index
    source: Optional[str] = None  # the data.mixture source its documents come from; None without a mixture


@dataclass
class IndexEntry:
    """A split's row-group index file (``row_index.py``): where each row group lies, without footers."""

    file: str  # relative to the manifest's directory
    format: str
    row_groups: int
    codec: str  # of the shards' column chunks
    sha256: str


@dataclass
class SplitEntry:
    documents: int
    tokens: int
    sequences: int
    dropped_tail_tokens: int
    num_shards: int
    shards: list[ShardEntry]
    index: IndexEntry


@dataclass
class ValDocument:
    source: str
    doc_index: int
    work: str  # what split_by named it (its content hash when it has no group)


@dataclass
class SplitPlan:
    """How documents were assigned to train/val, and which went to val."""

    by: str  # output.split_by.kind
    val_fraction: float
    seed: int
    val_documents_total: int
    ungrouped_documents: int  # documents split_by found no work for: each is its own work
    val_documents: list[ValDocument]  # sorted by (work, source, doc_index); the first VAL_DOCUMENTS_LISTED


@dataclass
class AuditEntry:
    """The privacy audit's planted text (``data_pipeline.plant``): its record, and documents planted / kept."""

    file: str  # relative to the manifest's directory
    sha256: str
    planted_documents: int
    kept_documents: int  # after dedup, all in the train split


@dataclass
class MixtureSplit:
    documents: int
    tokens: int
    sequences: int
    num_shards: int


@dataclass
class MixtureEntry:
    """One data.mixture source: its share of train batches and what prepare wrote for it."""

    name: str
    weight: float  # normalized over the mixture: the run's default share of every train batch
    uris: list[str]
    files: int
    bytes: int
    splits: dict[str, MixtureSplit]


@dataclass
class Manifest:
    tokenizer: TokenizerEntry
    seq_len: int
    row_tokens: int
    dtype: str
    splits: dict[str, SplitEntry]
    sources: list[SourceEntry] = field(default_factory=list)
    cleaning: CleaningStats = field(default_factory=CleaningStats)
    split: Optional[SplitPlan] = None
    # personal data replaced by placeholders while cleaning (data.clean.pii), per type; {} when off
    pii_counts: dict[str, int] = field(default_factory=dict)
    audit: Optional[AuditEntry] = None  # data.audit: planted canaries and passages; None when off
    mixture: list[MixtureEntry] = field(default_factory=list)  # data.mixture's sources; [] without one
    config: dict[str, Any] = field(default_factory=dict)  # the resolved DataConfig
    format: str = MANIFEST_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: dict, where: str = MANIFEST) -> Manifest:
        """A Manifest from parsed JSON; ``ManifestError`` naming ``where`` and the key when it is not one."""
        if not isinstance(value, dict) or value.get("format") != MANIFEST_FORMAT:
            got = value.get("format") if isinstance(value, dict) else type(value).__name__
            raise ManifestError(f"{where}: not a raylm token manifest (format {got!r}, expected {MANIFEST_FORMAT!r})")
        return _build(cls, {k: v for k, v in value.items() if k != "uri"}, where, "")


def _build(tp: Any, value: Any, where: str, key: str) -> Any:
    def fail(why: str) -> ManifestError:
        return ManifestError(f"{where}: key '{key or '<top>'}' {why}; re-run `raylm prepare` to rewrite it")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"must be a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise fail(f"has unknown keys {unknown}")
        missing = [
            n
            for n, f in fields.items()
            if n not in value and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise fail(f"lacks {missing}")
        return tp(**{n: _build(hints[n], v, where, f"{key}.{n}" if key else n) for n, v in value.items()})
    if origin is typing.Union:
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(inner, value, where, key)
    if origin is list:
        if not isinstance(value, list):
            raise fail(f"must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_build(item, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(f"must be a mapping, got {type(value).__name__}")
        item = typing.get_args(tp)[1]
        return {k: _build(item, v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else isinstance(value, tp)
    if not ok or (tp is int and isinstance(value, bool)):
        raise fail(f"must be {tp.__name__}, got {value!r}")
    return value


def write_manifest(manifest: Manifest, fs: pafs.FileSystem, path: str) -> None:
    """Writes ``<path>/manifest.json`` (``path`` as ``storage.filesystem_for`` resolved it)."""
    write_bytes(fs, f"{path}/{MANIFEST}", (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())


def _manifest_uri(uri: str) -> str:
    """The manifest.json URI for a manifest file or its directory; a local path made absolute, so the
    workers that read shards through it (another working directory) find the same files."""
    uri = uri if uri.endswith(".json") else uri.rstrip("/") + "/" + MANIFEST
    return uri if "://" in uri else str(Path(uri).expanduser().absolute())


def manifest_dir(manifest_uri: str) -> str:
    """The directory the manifest's relative file names (shards, index, tokenizer) are under."""
    return manifest_uri.rsplit("/", 1)[0]


def _load_json(uri: str, endpoint_url: Optional[str], region: Optional[str]) -> dict:
    try:
        return json.loads(read_bytes(uri, endpoint_url, region))
    except json.JSONDecodeError as err:
        raise ManifestError(f"{uri}: not JSON ({err}); re-run `raylm prepare` to rewrite it") from None


def load_manifest(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> Manifest:
    """The Manifest at ``uri`` (a manifest.json URI or its directory)."""
    uri = _manifest_uri(uri)
    return Manifest.from_dict(_load_json(uri, endpoint_url, region), uri)


def read_manifest(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> dict:
    """The manifest at ``uri`` as checked by ``Manifest.from_dict``, as a plain dict plus its ``uri``: the
    picklable form readers and workers take."""
    uri = _manifest_uri(uri)
    value = _load_json(uri, endpoint_url, region)
    Manifest.from_dict(value, uri)
    return {**value, "uri": uri}


def check_manifest(manifest: dict, expected_tokenizer_hash: Optional[str], expected_seq_len: Optional[int]) -> None:
    """``ManifestMismatchError`` unless the shards hold the tokenizer and seq_len the run expects."""
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


def load_tokenizer_from_manifest(manifest_uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None):
    """The tiktoken.Encoding stored next to a manifest (checked against the manifest's hash)."""
    manifest = read_manifest(manifest_uri, endpoint_url, region)
    spec = tok.load_spec(manifest_dir(manifest["uri"]), endpoint_url, region)
    if spec["hash"] != manifest["tokenizer"]["hash"]:
        raise ManifestMismatchError(
            f"{manifest['uri']}: tokenizer files hash {spec['hash'][:12]} differ from "
            f"the manifest's {manifest['tokenizer']['hash'][:12]}; re-run prepare"
        )
    return tok.encoding(spec)
