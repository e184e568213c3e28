"""Eval suites on a tiny GPT trained in-process to memorise ~1.5 kB of a play (no Ray)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import tokenizer as tok
from data_pipeline.storage import embedded_corpus_dir
from model.config import ModelConfig
from model.gpt import GPT
from orchestration.evaluate.load import evaluate, evaluate_lm, lm_metrics
from orchestration.evaluate.suites import (
    cloze_items,
    continuation_logprobs,
    continuation_scores,
    format_summary,
    held_out_lines,
    held_out_pieces,
    multiple_choice_suite,
    run_eval_suite,
    score_choices,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"text_file", "text", "spec", "trained": (model, cfg, enc, meta), "random": (...)}; ~3-5 s to train."""
    text = sorted(embedded_corpus_dir().glob("*_gut*.txt"))[0].read_text(encoding="utf-8", errors="replace")
    body = text[len(text) // 10 : len(text) // 10 + 1500]
    spec = tok.train_bpe([body], 300, "gpt4")
    enc = tok.encoding(spec)
    ids = torch.tensor(enc.encode(body))
    cfg = ModelConfig(vocab_size=enc.n_vocab, block_size=48, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    random_model, model = GPT(cfg).eval(), GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds sync waits on a busy machine
    try:
        for _ in range(300):
            starts = torch.randint(0, len(ids) - cfg.block_size - 1, (8,), generator=gen)
            batch = torch.stack([ids[s : s + cfg.block_size + 1] for s in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 2.0, "the fixture model should have (mostly) memorised its text"
    model.eval()
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(body, encoding="utf-8")
    meta = {"checkpoint_uri": "<in-process>", "step": 300}
    return {
        "text_file": str(path),
        "text": body,
        "spec": spec,
        "trained": (model, cfg, enc, meta),
        "random": (random_model, cfg, enc, meta),
    }


def _write_checkpoint(root: Path, model: GPT, spec: dict, step: int) -> str:
    """A complete checkpoint directory as save_checkpoint lays it out (inference files only)."""
    from safetensors.torch import save_file

    from orchestration.train.checkpoint import META_FILE, MODEL_CONFIG_FILE, MODEL_FILE

    ckpt = root / f"checkpoint_{step:08d}"
    ckpt.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(ckpt / MODEL_FILE))
    (ckpt / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model.cfg)))
    for name, data in tok.to_files(spec).items():
        (ckpt / name).write_bytes(data)
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / META_FILE).write_text(json.dumps({"step": step, "files": files}))
    return str(ckpt)


def test_bits_per_byte_of_a_model(tiny):
    model, cfg, enc, _ = tiny["trained"]
    ids = np.asarray(enc.encode(tiny["text"]))
    seqs = np.stack([ids[i : i + cfg.block_size + 1] for i in range(0, 6 * cfg.block_size, cfg.block_size)])
    r = lm_metrics(model, enc, seqs, batch_size=4)
    assert r["bytes"] == sum(len(enc.decode_bytes(row[1:].tolist())) for row in seqs)
    assert r["tokens"] == r["bpb_tokens"] == seqs[:, 1:].size
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / r["bytes"], rel=1e-6)
    # End-of-text targets count in the loss but decode to no bytes: bpb leaves them out entirely
    eot = enc.encode_single_token(tok.EOT)
    with_eot = seqs.copy()
    with_eot[:, 10] = eot
    r2 = lm_metrics(model, enc, with_eot, batch_size=4)
    assert r2["bpb_tokens"] == r2["tokens"] - len(seqs)
    assert r2["bytes"] == sum(len(enc.decode_bytes([t for t in row[1:].tolist() if t != eot])) for row in with_eot)


def test_continuation_logprobs_match_the_model_loss(tiny):
    model, _, enc, _ = tiny["trained"]
    ctx, cont = enc.encode("Let me not liue,"), enc.encode(" This his good melancholly")
    (lp,) = continuation_logprobs(model, [(ctx, cont)])
    ids = torch.tensor([ctx + cont])
    targets = ids[:, 1:].clone()
    targets[:, : len(ctx) - 1] = -1  # only the continuation's tokens are scored
    with torch.no_grad():
        _, loss = model(ids[:, :-1], targets)
    assert lp == pytest.approx(-float(loss) * len(cont), rel=1e-5)
    # Too long for the context: context is cut from the left and the score stays finite
    (long_lp,) = continuation_logprobs(model, [(ctx * 20, cont)])
    assert math.isfinite(long_lp) and long_lp < 0


def test_checkpoint_directory_through_run_eval_suite(tiny, tmp_path):
    model, _, _, _ = tiny["trained"]
    ckpt = _write_checkpoint(tmp_path / "run", model, tiny["spec"], step=300)
    lm = evaluate_lm(str(tmp_path / "run"), tiny["text_file"], max_sequences=8)  # run dir -> newest checkpoint
    assert lm["loss"] == pytest.approx(evaluate(ckpt, tiny["text_file"], max_sequences=8)["loss"], rel=1e-5)
    assert lm["checkpoint"] == ckpt and lm["bits_per_byte"] > 0
    result = run_eval_suite(
        "all",
        ckpt,
        tiny["text_file"],
        num_items=8,
        num_options=3,
        prompt_tokens=8,
        continuation_tokens=8,
        max_sequences=8,
    )
    assert set(result["suites"]) == {"lm", "continuation", "mc", "bias"} and result["step"] == 300
    assert result["suites"]["mc"]["items"] == 8 and result["suites"]["mc"]["chance"] == pytest.approx(1 / 3)
    assert result["suites"]["continuation"]["prompt_tokens"] == 8
    summary = format_summary(result)
    for needle in ("bits/byte", "BLEU", "chance 0.333", "not a certification", ckpt):
        assert needle in summary
    with pytest.raises(ValueError, match="num_options"):
        run_eval_suite("lm", ckpt, tiny["text_file"], num_options=3)
    with pytest.raises(ValueError, match="unknown eval suite"):
        run_eval_suite("mmlu", ckpt, tiny["text_file"])
    with pytest.raises(ValueError, match="needs held-out data"):
        run_eval_suite("mc", ckpt)


def test_cloze_items_are_deterministic_shuffled_and_true(tiny):
    lines = [[line.rstrip() for line in tiny["text"].split("\n")[1:-1] if line.strip()]]
    items = cloze_items(lines, num_items=20, num_options=4, seed=0)
    assert items == cloze_items(lines, num_items=20, num_options=4, seed=0)
    assert items != cloze_items(lines, num_items=20, num_options=4, seed=1)
    assert len(items) == 20 and len({it["answer"] for it in items}) > 1  # the answer's position varies
    flat = lines[0]
    for it in items:
        answer = it["options"][it["answer"]]
        assert flat[flat.index(it["context"][0]) + 1] == answer  # the true next line
        assert len(set(it["options"])) == 4
    with pytest.raises(ValueError, match="too few"):
        cloze_items([flat[:6]], num_options=4)


def test_score_choices_argmax_and_standard_error():
    items = [
        {"options": ["aa", "b"], "answer": 0},
        {"options": ["aa", "b"], "answer": 1},
        {"options": ["x", "yyyy"], "answer": 1},
        {"options": ["xxxx", "y"], "answer": 0},
    ]
    logps = [
        [-2.0, -3.0],  # sum right, per byte (-1 vs -3) right
        [-2.4, -1.5],  # sum right, per byte (-1.2 vs -1.5) wrong
        [-1.0, -2.0],  # sum wrong, per byte (-1 vs -0.5) right
        [-2.0, -1.0],
    ]  # sum wrong, per byte (-0.5 vs -1) right
    r = score_choices(items, logps)
    assert r["accuracy"] == 0.5 and r["stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert r["accuracy_norm"] == 0.75 and r["stderr_norm"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert r["chance"] == 0.5 and r["items"] == 4


def test_mc_suite_trained_model_beats_chance(tiny):
    trained = multiple_choice_suite(tiny["trained"], tiny["text_file"], num_items=30, num_options=4, seed=0)
    assert trained["items"] == 30 and trained["chance"] == 0.25
    assert trained["accuracy"] > trained["chance"] + 2 * trained["stderr"]
    assert trained["stderr"] == pytest.approx(math.sqrt(trained["accuracy"] * (1 - trained["accuracy"]) / 30))


def test_continuation_of_memorised_text_beats_random_model(tiny):
    kwargs = dict(num_items=12, prompt_tokens=16, continuation_tokens=16)
    trained = continuation_scores(tiny["trained"], tiny["text_file"], **kwargs)
    random = continuation_scores(tiny["random"], tiny["text_file"], **kwargs)
    assert trained["items"] == random["items"] == 12
    assert trained["rougeL"] > 0.3 and trained["rougeL"] > random["rougeL"] + 0.2
    assert trained["bleu"] > random["bleu"]
    with pytest.raises(ValueError, match="fit the context"):
        continuation_scores(tiny["trained"], tiny["text_file"], prompt_tokens=40, continuation_tokens=40)


def test_held_out_lines_from_a_manifest(tiny, tmp_path):
    from data_pipeline.loader import ManifestMismatchError, load_tokenizer_from_manifest
    from tests.helpers import tiny_corpus_manifest

    manifest = tiny_corpus_manifest(tmp_path, seq_len=64, chars=30_000)
    enc = load_tokenizer_from_manifest(manifest)
    pieces, cut = held_out_pieces(manifest, enc, split="val", max_sequences=5)
    assert cut and len(pieces) == 5 and all(len(p) == 65 for p in pieces)
    lines = held_out_lines(pieces, enc, cut)
    source = sorted(embedded_corpus_dir().glob("*_gut*.txt"))[0].read_text(encoding="utf-8", errors="replace")
    assert sum(map(len, lines)) > 0 and all(line in source for piece in lines for line in piece)
    with pytest.raises(ManifestMismatchError, match="checkpoint's tokenizer"):
        held_out_pieces(manifest, tiny["trained"][2], max_sequences=5)
