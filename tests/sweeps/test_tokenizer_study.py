"""The tokenizer study: codecs that round-trip text, bits per byte over exactly the scored bytes,
equal-FLOPs step counts, and `raylm tokenizers` end to end on a tiny corpus (in process, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from data_pipeline.codecs import train_codec
from data_pipeline.storage import embedded_corpus_dir
from model.config import ModelConfig
from model.flops import flops_per_token
from model.gpt import GPT
from orchestration.config import ConfigError, TokenizerStudyRunConfig, load_config
from orchestration.sweeps.tokenizer_study import (
    encode_exactly,
    eval_windows,
    score_text,
    spread_sample,
    steps_for_budget,
)

torch.set_num_threads(1)  # tiny models: threads only add contention on a loaded machine

SONNETS = (embedded_corpus_dir() / "sonnets_gut.txt").read_text(encoding="utf-8")
TRAIN = SONNETS[20_000:60_000]
UNSEEN = "Naïve café —  日本語\ttabs\n\n  spaces  and 'quotes' 123456 ok?"


@pytest.mark.parametrize("kind, vocab", [("byte", 256), ("bpe", 512), ("unigram", 512)])
def test_each_tokenizer_round_trips_text_it_never_saw(kind, vocab):
    codec = train_codec(kind, vocab, [TRAIN])
    assert codec.kind == kind and codec.n_vocab <= vocab and codec.token_bytes.shape == (codec.n_vocab,)
    for text in (TRAIN[:300], UNSEEN):
        ids = encode_exactly(codec, text)  # the ids stand for exactly the text's bytes
        assert codec.decode(ids) == text
        assert all(0 <= i < codec.n_vocab for i in ids)
    if kind != "byte":  # a learned vocabulary compresses the text it was trained on
        assert len(codec.encode(TRAIN)) < 0.6 * len(TRAIN.encode())
    with pytest.raises(ValueError, match="vocab_size"):
        train_codec(kind, 256 if kind != "byte" else 512, [TRAIN])


def test_bits_per_byte_counts_every_target_and_its_bytes():
    codec = train_codec("bpe", 300, [TRAIN])
    ids = np.asarray(encode_exactly(codec, TRAIN[:500]), dtype=np.int64)
    windows = eval_windows(ids, 16)
    assert [len(w) for w in windows[:-1]] == [17] * (len(windows) - 1) and 2 <= len(windows[-1]) <= 17
    assert np.array_equal(np.concatenate([windows[0][:1], *[w[1:] for w in windows]]), ids)  # each target once
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=codec.n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied head: all logits 0, every token costs ln V nats
    scores = score_text(model, windows, codec.token_bytes, batch_size=4)
    scored_bytes = len(TRAIN[:500].encode()) - int(codec.token_bytes[ids[0]])  # all but the first token's
    assert scores["tokens"] == len(ids) - 1 and scores["bytes"] == scored_bytes
    assert scores["loss"] == pytest.approx(math.log(codec.n_vocab), rel=1e-6)
    assert scores["bits_per_byte"] == pytest.approx((len(ids) - 1) * math.log2(codec.n_vocab) / scored_bytes, rel=1e-6)


def test_equal_compute_gives_a_larger_vocabulary_fewer_steps():
    small, large = (ModelConfig(vocab_size=v, block_size=64, n_layer=2, n_head=2, n_embd=32) for v in (256, 16384))
    budget, tokens_per_step = 1e11, 8 * 64
    steps = [steps_for_budget(budget, flops_per_token(c, 64), tokens_per_step) for c in (small, large)]
    for cfg, n in zip((small, large), steps):
        per_step = flops_per_token(cfg, 64) * tokens_per_step
        assert n * per_step <= budget < (n + 1) * per_step  # the most steps the budget pays for
    assert steps[0] > 5 * steps[1]
    assert steps_for_budget(1.0, 1e6, 512) == 1  # a budget below one step still trains one
    # the tokenizer sample spreads over the whole text
    text = "".join(f"<{i:03d}>" for i in range(1000))
    pieces = spread_sample(text, 640, pieces=64)
    assert len(pieces) == 64 and pieces[0] == "<000><001>" and "<983>" in pieces[-1]  # 10 bytes from every 1/64th
    assert spread_sample("short", 640) == ["short"]


def test_study_config_is_checked_at_load():
    cfg = load_config("configs/tokenizer_study.yaml", [], schema=TokenizerStudyRunConfig)
    assert cfg.study.tokenizers == ["byte", "bpe:1024", "bpe:4096", "bpe:16384", "unigram:4096"]
    for bad, named in (
        ("study.tokenizers=[bpe]", "'bpe'"),
        ("study.tokenizers=['byte:256']", "'byte:256'"),
        ("study.tokenizers=['unigram:200']", "vocab must be > 256"),
        ("study.tokenizers=[byte, byte]", "twice"),
        ("study.train_flop=1e12", "did you mean 'study.train_flops'"),
    ):
        with pytest.raises(ConfigError, match=named):
            load_config("configs/tokenizer_study.yaml", [bad], schema=TokenizerStudyRunConfig)
    with pytest.raises(ConfigError, match="section 'train' is not used by `raylm tokenizers`"):
        load_config(None, ["train.lr=1"], schema=TokenizerStudyRunConfig)


def test_tokenizers_command_end_to_end(tmp_path):
    from orchestration.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    step = len(SONNETS) // 8
    for i in range(8):  # eight documents; the split by content hash puts some on each side
        (corpus / f"part{i}.txt").write_text(SONNETS[i * step : (i + 1) * step], encoding="utf-8")
    out = tmp_path / "study"
    argv = [
        "tokenizers",
        "--out",
        str(out),
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=16",
        "model.block_size=16",
        f"study.corpus=[{corpus}]",
        "study.tokenizers=[byte, 'bpe:320', 'unigram:320']",
        "study.val_fraction=0.5",
        "study.val_bytes=3000",
        "study.tokenizer_train_bytes=20000",
        "study.train_flops=3e8",
        "study.batch_size=4",
        "study.warmup_steps=2",
        "study.threads=1",
    ]
    assert main(argv) == 0
    result = json.loads((out / "tokenizer_study.json").read_text())
    rows = {r["tokenizer"]: r for r in result["rows"]}
    assert list(rows) == ["byte", "bpe-320", "unigram-320"]
    assert 2990 <= result["val_text_bytes"] <= 3010  # 3000 // n from each val document, joined by blank lines
    assert result["val_works"] == sorted(result["val_works"]) and result["val_works"][0].startswith("part")
    for r in rows.values():
        per_step = r["flops_per_token"] * 4 * 16
        assert r["train_flops"] == r["steps"] * per_step <= 3e8 < (r["steps"] + 1) * per_step  # equal compute
        assert math.isfinite(r["val_bits_per_byte"]) and 0 < r["val_bits_per_byte"] < 8.5
        assert r["val_bytes"] < result["val_text_bytes"] and r["curve"][-1]["step"] == r["steps"]
    assert rows["byte"]["chars_per_token"] < 1.01 < rows["bpe-320"]["chars_per_token"]
    assert rows["byte"]["steps"] > rows["bpe-320"]["steps"]  # a bigger head costs more per token
    assert rows["byte"]["val_tokens"] > rows["bpe-320"]["val_tokens"]  # the same text, more, shorter tokens
    table = (out / "tokenizer_study.md").read_text()
    assert "| unigram-320 | " in table and "val bits/byte" in table
    assert "tokenizers:" in (out / "config.yaml").read_text()
    page = (out / "report.html").read_text()
    assert "Bits per byte at equal training compute" in page and "data:image/png;base64," in page
    assert json.loads((out / "results.json").read_text())["kind"] == "tokenizers"
