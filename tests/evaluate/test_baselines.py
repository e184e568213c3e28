"""Baselines: the Kneser-Ney n-gram model, the RNN / GRU / LSTM LMs behind the GPT's seams, and the comparison table.

Tiny data only: hand-made token streams, the tiny manifest of helpers (no Ray for reading), and
models of a few thousand parameters. One slow test launches the real Ray Train + DeepSpeed path.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_corpus_manifest

from model.build import build_model
from model.config import ModelConfig
from model.flops import RECURRENT_GATES, count_params, flops_per_token
from model.lstm import RecurrentLM
from model.ngram import NGramLM

torch.set_num_threads(1)  # tiny models: threads only add contention on a loaded machine


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return tiny_corpus_manifest(tmp_path_factory.mktemp("baselines"))


# --- n-gram ------------------------------------------------------------------------------------


@pytest.mark.parametrize("discount", [None, 0.75])
def test_kneser_ney_distributions_sum_to_one(discount):
    rng = np.random.default_rng(0)
    V = 9
    corpus = np.concatenate([np.tile([1, 2, 3, 4, 1, 2, 5], 30), rng.integers(0, V - 1, 400)])  # token 8 unseen
    for n in (1, 2, 3, 4):
        model = NGramLM.fit(corpus, n, V, discount=discount)
        for context in ([], [2], [1, 2], [8, 8, 8], [4, 1, 2], [0, 8, 3]):  # seen, partly and never seen
            p = model.next_token_probs(context)
            assert p.shape == (V,) and np.all(p > 0), (n, context)
            assert p.sum() == pytest.approx(1.0, abs=1e-12), (n, context)
    if discount is None:  # modified KN: three discounts per order, each within (0, c]
        assert all(0 < d1 <= 1 and 0 < d2 <= 2 and 0 < d3 <= 3 for d1, d2, d3 in model.discounts)
        assert len({tuple(d) for d in model.discounts}) > 1  # estimated per order, not a constant


def test_ngram_learns_a_repetitive_corpus_and_beats_unigram(tmp_path):
    pattern = [5, 3, 7, 1, 0, 6, 2, 3, 4]  # after '3' comes 7 or 4: a bigram is unsure, a trigram is not
    train, held_out = np.tile(pattern, 300), np.tile(pattern, 12)[3 : 3 + 65].reshape(1, -1)
    trigram, bigram, unigram = (NGramLM.fit(train, n, 8) for n in (3, 2, 1))
    nll3, nll2, nll1 = (m.window_nll(held_out) for m in (trigram, bigram, unigram))
    # After two tokens of context the pattern is deterministic; the first two targets back off
    assert nll3[:, 2:].mean() < 0.05 and nll1.mean() > 1.5
    assert nll3.mean() < nll2.mean() < nll1.mean() / 2
    # Save/load gives the same scores bit for bit
    loaded = NGramLM.load(trigram.save(tmp_path / "tri"))
    assert loaded.discounts == trigram.discounts and loaded.n == 3
    np.testing.assert_array_equal(loaded.window_nll(held_out), nll3)


def test_ngram_rejects_bad_orders_and_missing_inputs(tmp_path):
    from orchestration.evaluate.baselines import evaluate_ngram, train_ngram

    for n in (0, 6, 2.5):
        with pytest.raises(ValueError, match=r"order n must be an integer in \[1, 5\]"):
            NGramLM.fit(np.arange(10), n, 10)
    with pytest.raises(ValueError, match="overflows"):
        NGramLM.fit(np.arange(10), 5, 50257)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4\)"):
        NGramLM.fit(np.arange(10), 2, 4)
    with pytest.raises(Exception, match="nowhere/manifest.json"):
        train_ngram(str(tmp_path / "nowhere" / "manifest.json"), str(tmp_path / "out"), n=3)
    with pytest.raises(FileNotFoundError, match="no n-gram model"):
        evaluate_ngram(str(tmp_path), "unused.json")


def test_train_and_evaluate_ngram_on_shards(manifest, tmp_path):
    from orchestration.evaluate.baselines import evaluate_ngram, train_ngram
    from orchestration.evaluate.data_source import manifest_rows
    from orchestration.evaluate.lm import token_byte_lengths

    with pytest.raises(ValueError, match="order n must be"):
        train_ngram(manifest, str(tmp_path / "bad"), n=7)
    fit = {n: train_ngram(manifest, str(tmp_path / f"ng{n}"), n=n) for n in (1, 3)}
    rows, m = manifest_rows(manifest, "train")
    assert fit[3]["train_tokens"] == rows.size == m["splits"]["train"]["tokens"]
    r1, r3 = (evaluate_ngram(str(tmp_path / f"ng{n}"), manifest, max_sequences=20) for n in (1, 3))
    val, _ = manifest_rows(manifest, "val", 20)
    assert r3["tokens"] == val[:, 1:].size and r3["sequences"] == len(val) and r3["n"] == 3
    assert r3["loss"] < r1["loss"] and r3["perplexity"] == pytest.approx(math.exp(r3["loss"]))
    # bits per byte = the same summed NLL over the bytes the targets decode to (no special tokens here)
    from data_pipeline.manifest import load_tokenizer_from_manifest

    byte_len = token_byte_lengths(load_tokenizer_from_manifest(manifest))
    assert r3["bytes"] == int(byte_len[val[:, 1:]].sum())
    assert r3["bits_per_byte"] == pytest.approx(r3["loss"] * r3["tokens"] / (math.log(2) * r3["bytes"]))
    # reloading from disk scores identically
    assert evaluate_ngram(str(tmp_path / "ng3"), manifest, max_sequences=20) == r3


# --- RNN, GRU, LSTM ----------------------------------------------------------------------------


def _lstm_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(arch="lstm", vocab_size=40, block_size=16, n_layer=2, n_embd=24), **kw})


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_recurrent_lm_is_causal_and_counts_its_params(arch):
    torch.manual_seed(0)
    model = build_model(_lstm_cfg(arch=arch)).eval()
    assert isinstance(model, RecurrentLM) and isinstance(
        model.recurrent, {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[arch]
    )
    assert all(name.startswith(("wte.", f"{arch}.")) for name, _ in model.named_parameters())  # keys name the cell
    idx = torch.randint(0, 40, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 40
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:], b[:, 7:])
    for kw in ({}, {"tie_embeddings": False}, {"bias": False}, {"n_layer": 3}):
        cfg = _lstm_cfg(arch=arch, **kw)
        numel = sum(p.numel() for p in RecurrentLM(cfg).parameters())
        assert count_params(cfg) == numel, kw
        assert count_params(cfg, non_embedding=True) == numel - cfg.vocab_size * cfg.n_embd * (
            1 if cfg.tie_embeddings else 2
        )
    cfg = _lstm_cfg(arch=arch, bias=False)
    h, V, gates = cfg.n_embd, cfg.vocab_size, {"rnn": 1, "gru": 3, "lstm": 4}[arch]
    assert RECURRENT_GATES[arch] == gates
    assert flops_per_token(cfg, 16) == flops_per_token(cfg, 1024) == 6 * (2 * gates * (h * h + h * h) + h * V)
    # attention fields do not constrain a recurrent model; a transformer preset cannot be used with it
    ModelConfig(arch=arch, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=f"arch '{arch}' takes no preset"):
        ModelConfig(arch=arch, preset="tiny")


@pytest.mark.parametrize("arch", ["rnn", "gru", "lstm"])
def test_recurrent_lm_overfits_a_batch(arch):
    torch.manual_seed(0)
    model = RecurrentLM(_lstm_cfg(arch=arch))
    batch = torch.randint(0, 40, (4, 17))
    targets = batch[:, 1:].clone()
    targets[0, :3] = -1  # ignored positions
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    first = None
    for _ in range(150):
        _, loss = model(batch[:, :-1], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 3.0 and loss.item() < 0.3
    with pytest.raises(NotImplementedError, match="no KV cache"):
        model(batch, kv_cache=object())


# --- checkpoints and the comparison table --------------------------------------------------------


def _write_checkpoint(root: Path, model: torch.nn.Module, manifest: str, consumed_sequences: int) -> str:
    """A complete checkpoint as save_checkpoint lays it out (inference files only)."""
    from safetensors.torch import save_file

    from data_pipeline import tokenizer as tok
    from orchestration.checkpoint_format import CHECKPOINT_META_FILE as META_FILE
    from orchestration.checkpoint_format import MODEL_CONFIG_FILE, MODEL_FILE

    ckpt = root / "checkpoint_00000010"
    ckpt.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(ckpt / MODEL_FILE))
    (ckpt / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model.cfg)))
    for name, data in tok.to_files(tok.load_spec(str(Path(manifest).parent))).items():
        (ckpt / name).write_bytes(data)
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / META_FILE).write_text(json.dumps({"step": 10, "consumed_sequences": consumed_sequences, "files": files}))
    return str(ckpt)


def test_lstm_checkpoint_loads_and_compares_with_baselines(manifest, tmp_path):
    from model.generate import generate
    from model.gpt import GPT
    from orchestration.evaluate.baselines import compare_baselines, train_ngram
    from orchestration.evaluate.data_source import EvalError
    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.evaluate.sample import generate_text
    from orchestration.evaluate.suites import continuation_scores

    vocab = json.loads(Path(manifest).read_text())["tokenizer"]["n_vocab"]
    torch.manual_seed(0)
    lstm = RecurrentLM(_lstm_cfg(vocab_size=vocab, block_size=32, n_embd=16, n_layer=1))
    gpt = GPT(ModelConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=16))
    gru = RecurrentLM(_lstm_cfg(arch="gru", vocab_size=vocab, block_size=32, n_embd=16, n_layer=1))
    lstm_ckpt = _write_checkpoint(tmp_path / "lstm", lstm, manifest, consumed_sequences=40)
    gru_ckpt = _write_checkpoint(tmp_path / "gru", gru, manifest, consumed_sequences=40)
    gpt_ckpt = _write_checkpoint(tmp_path / "gpt", gpt, manifest, consumed_sequences=40)
    loaded, cfg, enc, meta = load_checkpoint_model(lstm_ckpt)
    assert isinstance(loaded, RecurrentLM) and cfg.arch == "lstm" and enc.n_vocab == vocab
    for (n, p), q in zip(lstm.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
    # `raylm generate` and the continuation suite sample from it through the same `generate`
    ids = enc.encode("ROMEO:")
    greedy = generate(loaded, [ids], 6, temperature=0)[0]
    assert generate_text(lstm_ckpt, "ROMEO:", 6, temperature=0) == enc.decode([t for t in greedy if t != enc.eot_token])
    scores = continuation_scores(
        (loaded, cfg, enc, meta), manifest, num_items=3, prompt_tokens=8, continuation_tokens=8, max_sequences=8
    )
    assert scores["items"] == 3 and 0.0 <= scores["rougeL"] <= 1.0
    train_ngram(manifest, str(tmp_path / "ng2"), n=2)
    result = compare_baselines(
        manifest,
        transformer_checkpoint=gpt_ckpt,
        lstm_checkpoint=lstm_ckpt,
        gru_checkpoint=gru_ckpt,
        ngram_dir=str(tmp_path / "ng2"),
        out_dir=str(tmp_path / "cmp"),
        max_sequences=8,
    )
    by = {r["model"]: r for r in result["rows"]}
    assert set(by) == {"transformer", "lstm", "gru", "2-gram KN"} and result["sequences"] == 8
    assert by["gru"]["arch"] == "gru" and by["gru"]["params"] < by["lstm"]["params"]  # 3 gate matrices, not 4
    with pytest.raises(EvalError, match="given as the rnn baseline, but its model.arch is 'gru'"):
        compare_baselines(manifest, transformer_checkpoint=gpt_ckpt, rnn_checkpoint=gru_ckpt, max_sequences=8)
    assert by["lstm"]["params"] == count_params(cfg) and by["lstm"]["train_tokens"] == 40 * 32
    assert by["lstm"]["train_flops"] == pytest.approx(flops_per_token(cfg, 32) * 40 * 32)
    assert by["2-gram KN"]["train_flops"] is None
    # untrained networks sit near log(V); the fitted bigram is far below
    assert by["2-gram KN"]["loss"] < by["lstm"]["loss"] and abs(by["lstm"]["loss"] - math.log(vocab)) < 0.5
    assert len({r["tokens"] for r in result["rows"]}) == 1  # every model scored on the same targets
    assert json.loads((tmp_path / "cmp" / "baselines.json").read_text()) == result
    table = (tmp_path / "cmp" / "baselines.md").read_text()
    assert table.index("2-gram KN") < table.index("| lstm")  # sorted by bits per byte

    # the command writes the same table and ends with the report of it
    from orchestration.cli import main

    assert (
        main(
            [
                "baseline",
                "compare",
                "--data",
                manifest,
                "--transformer",
                gpt_ckpt,
                "--lstm",
                lstm_ckpt,
                "--gru",
                gru_ckpt,
                "--ngram",
                str(tmp_path / "ng2"),
                "--out",
                str(tmp_path / "cli"),
                "--max-sequences",
                "8",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert report["kind"] == "baselines" and report["rows"] == sorted(result["rows"], key=lambda r: r["bits_per_byte"])
    page = (tmp_path / "cli" / "report.html").read_text()
    assert "<td>lstm</td>" in page and "<td>gru</td>" in page


@pytest.mark.slow
def test_lstm_trains_through_ray_train_and_deepspeed(manifest, ray_session, tmp_path):
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.train.driver import run_training

    cfg = tiny_config(
        manifest,
        tmp_path / "runs",
        "lstm",
        zero_stage=1,
        overrides=[
            "model.arch=lstm",
            "model.parametrization=sp",  # tiny_config's μP scales a transformer's layers
            "model.n_layer=1",
            "model.n_embd=48",
            "model.init_std=0.1",
            "train.lr=1e-2",
            "train.min_lr=1e-3",
        ],
    )
    summary = run_training(cfg, resume=False)
    with open(f"{summary['run_dir']}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.2, losses
    result = evaluate_lm(summary["run_dir"], manifest, max_sequences=8)
    assert result["checkpoint"].endswith("checkpoint_00000020")
    assert math.isfinite(result["bits_per_byte"]) and result["loss"] < losses[0]
    model, cfg, _, _ = load_checkpoint_model(summary["run_dir"])
    assert isinstance(model, RecurrentLM) and cfg.n_embd == 48
