"""Export: a GPT-2-shaped checkpoint loads in HF transformers with the same logits and token ids;
any other shape gets a clear error for HF and round-trips through raylm's own format."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT

CORPUS = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n\nOr to take arms against a sea of troubles 1234.\n"
) * 20


def write_checkpoint(
    root: Path, *, vocab_merges: int = 400, pattern: str = "gpt4", seed: int = 0, **model_overrides
) -> str:
    """A complete consolidated raylm checkpoint dir (what `save_checkpoint` leaves, minus DeepSpeed's
    shards) for a tiny random GPT and a BPE trained on a few lines; no Ray Train needed."""
    from safetensors.torch import save_file

    from data_pipeline import tokenizer as tok
    from orchestration.train.checkpoint import META_FILE, MODEL_CONFIG_FILE, MODEL_FILE

    spec = tok.train_bpe([CORPUS], vocab_merges, pattern)
    shape = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg = ModelConfig(**{**shape, **model_overrides, "vocab_size": spec["n_vocab"]})
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # fresh LayerNorms/biases are 1/0: randomize them so a mapping slip shows
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ckpt = root / "checkpoint_00000010"
    ckpt.mkdir(parents=True)
    state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(state, str(ckpt / MODEL_FILE), metadata={"format": "pt", "step": "10"})
    (ckpt / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(cfg)))
    for name, data in tok.to_files(spec).items():
        (ckpt / name).write_bytes(data)
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / META_FILE).write_text(
        json.dumps({"step": 10, "consumed_sequences": 0, "world_size": 1, "files": files, "config": {}})
    )
    return str(ckpt)


def _raylm_logits(uri: str, ids: torch.Tensor) -> torch.Tensor:
    from orchestration.evaluate.load import load_checkpoint_model

    model, *_ = load_checkpoint_model(uri)
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("tie", [True, False])
def test_hf_export_matches_logits_and_token_ids(tmp_path, tie):
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) checks the HF export")
    from orchestration.deploy.export import export_checkpoint

    ckpt = write_checkpoint(tmp_path / "run", tie_embeddings=tie)
    result = export_checkpoint(ckpt, str(tmp_path / "hf"), fmt="hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(result["files"])

    hf = transformers.GPT2LMHeadModel.from_pretrained(result["out_dir"]).eval()
    ids = torch.randint(0, hf.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(ids).logits
    ours = _raylm_logits(ckpt, ids)
    assert hf_logits.shape == ours.shape
    torch.testing.assert_close(hf_logits, ours, atol=1e-4, rtol=0)
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
        return

    # The HF fast tokenizer gives tiktoken's ids (special token, emoji, newlines, unseen words)
    from orchestration.evaluate.load import load_checkpoint_model

    _, _, enc, _ = load_checkpoint_model(ckpt)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(result["out_dir"]) / "tokenizer.json"))
    texts = [
        "To be, or not to be",
        "  leading spaces\n\n\ttabs\r\nand CRLF",
        "emoji 🙂🚀 and ünïcödé",
        "<|endoftext|>Whether 'TIS nobler 12345678",
        "",
        "sea of troubles!!! ...\n \n",
    ]
    for text in texts:
        want = enc.encode(text, allowed_special="all")
        assert hf_tok.encode(text) == want, text
        assert hf_tok.decode(want) == text


def test_non_gpt2_model_refuses_hf_and_round_trips_as_raylm(tmp_path):
    from orchestration.deploy.export import ExportError, export_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model

    ckpt = write_checkpoint(
        tmp_path / "run", pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False, n_kv_head=1
    )
    with pytest.raises(
        ExportError, match=r"pos_encoding='rope'.*mlp='swiglu'.*norm='rmsnorm'.*bias=False.*n_kv_head=1"
    ):
        export_checkpoint(ckpt, str(tmp_path / "hf"), fmt="hf")

    result = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), fmt="raylm")  # a run dir resolves too
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "not possible" in readme and "pos_encoding='rope'" in readme
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_raylm_logits(result["out_dir"], ids), _raylm_logits(ckpt, ids), atol=0, rtol=0)
    _, cfg, enc, meta = load_checkpoint_model(result["out_dir"])
    assert cfg.pos_encoding == "rope" and meta["format"] == "raylm-export" and enc.encode("To be") != []

    with pytest.raises(ExportError, match="unknown export format"):
        export_checkpoint(ckpt, str(tmp_path / "x"), fmt="onnx")
