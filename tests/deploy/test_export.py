"""Export: every shape family loads in HF transformers (AutoModelForCausalLM / AutoTokenizer, offline,
from the folder) with raylm's logits and greedy tokens; shapes no standard architecture computes get a
clear error for HF and round-trip through raylm's own format."""

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
    root: Path,
    *,
    vocab_merges: int = 400,
    pattern: str = "gpt4",
    seed: int = 0,
    nan_token_ids: tuple[int, ...] = (),
    **model_overrides,
) -> str:
    """A complete consolidated raylm checkpoint dir (what `save_checkpoint` leaves, minus DeepSpeed's
    shards) for a tiny random GPT and a BPE trained on a few lines; no Ray Train needed.

    ``nan_token_ids``: token embedding rows set to NaN, as a diverged run leaves them (any prompt
    holding one of those tokens gives NaN logits)."""
    from safetensors.torch import save_file

    from data_pipeline import tokenizer as tok
    from orchestration.checkpoint_format import CHECKPOINT_META_FILE as META_FILE
    from orchestration.checkpoint_format import MODEL_CONFIG_FILE, MODEL_FILE

    spec = tok.train_bpe([CORPUS], vocab_merges, pattern)
    shape = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
    cfg = ModelConfig(**{**shape, **model_overrides, "vocab_size": spec["n_vocab"]})
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():  # fresh LayerNorms/biases are 1/0: randomize them so a mapping slip shows
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.transformer.wte.weight[list(nan_token_ids)] = float("nan")
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


def _raylm_logits(uri: str, ids: torch.Tensor) -> torch.Tensor:
    from orchestration.evaluate.load import load_checkpoint_model

    model, *_ = load_checkpoint_model(uri)
    with torch.no_grad():
        return model(ids)[0]


def _preset_shape(name: str) -> dict:
    """A preset's architecture fields (positions, MLP, norm, biases, tying) without its size."""
    from model.config import PRESETS

    size = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    return {k: v for k, v in PRESETS[name].items() if k not in size}


# shape family -> (model overrides on write_checkpoint's tiny 2-layer 32-wide shape, HF class)
SHAPES = {
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2-untied-sinusoidal-gqa-nobias": (
        dict(pos_encoding="sinusoidal", n_head=4, n_kv_head=2, bias=False, tie_embeddings=False),
        "GPT2LMHeadModel",
    ),
    "shakespeare": (_preset_shape("shakespeare"), "Starcoder2ForCausalLM"),
    "ladder": (_preset_shape("ladder-23m"), "LlamaForCausalLM"),
    "llama-gqa-bias-untied": (
        dict(_preset_shape("ladder-23m"), n_head=4, n_kv_head=1, bias=True, tie_embeddings=False, rope_theta=500.0),
        "LlamaForCausalLM",
    ),
    "rope-gelu-rmsnorm-gqa": (
        dict(pos_encoding="rope", norm="rmsnorm", n_head=4, n_kv_head=2, norm_eps=1e-6),
        "ArceeForCausalLM",
    ),
    "rope-swiglu-layernorm-gqa": (
        dict(pos_encoding="rope", mlp="swiglu", bias=False, n_head=4, n_kv_head=2),
        "StableLmForCausalLM",
    ),
    # μP (4x the base width): logits' 1/4 folded into the final norm, attention's 1/head_dim into q
    "gpt2-mup": (dict(parametrization="mup", mup_base_width=8), "GPT2LMHeadModel"),
    "ladder-mup": (dict(_preset_shape("ladder-23m"), parametrization="mup", mup_base_width=8), "LlamaForCausalLM"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_export_matches_logits_and_greedy_tokens(tmp_path, shape):
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) checks the HF export")
    from data_pipeline.tokenizer import EOT
    from model.generate import generate
    from orchestration.deploy.export import export_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model

    overrides, architecture = SHAPES[shape]
    ckpt = write_checkpoint(tmp_path / "run", **overrides)
    result = export_checkpoint(ckpt, str(tmp_path / "hf"), fmt="hf")
    assert result["architecture"] == architecture
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(result["files"])

    hf = transformers.AutoModelForCausalLM.from_pretrained(result["out_dir"], local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    model, cfg, enc, _ = load_checkpoint_model(ckpt)
    assert sum(p.numel() for p in hf.parameters()) >= sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(ids).logits
        ours = model(ids)[0]
    assert hf_logits.shape == ours.shape
    torch.testing.assert_close(hf_logits, ours, atol=1e-4, rtol=0)
    if cfg.tie_embeddings:
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()

    # Greedy decoding to the end of the context: the same token ids, the tokenizer from AutoTokenizer
    tok = transformers.AutoTokenizer.from_pretrained(result["out_dir"], local_files_only=True)
    prompt = "ROMEO: To be, or not"
    prompt_ids = enc.encode(prompt)
    assert tok(prompt)["input_ids"] == prompt_ids and tok.eos_token == EOT
    steps = cfg.block_size + 1 - len(prompt_ids)
    want = generate(model, [prompt_ids], steps, temperature=0, eos_id=enc.encode_single_token(EOT))[0]
    inputs = torch.tensor([prompt_ids])
    with torch.no_grad():
        got = hf.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=steps, do_sample=False)
    assert got[0, len(prompt_ids) :].tolist() == want
    assert len(want) > 1  # more than one step was compared


def test_every_preset_maps_to_a_standard_architecture():
    from model.config import PRESETS, model_config_from_preset
    from orchestration.deploy.hf import FAMILIES, hf_family

    got = {name: FAMILIES[hf_family(model_config_from_preset(name))].architecture for name in PRESETS}
    assert got["shakespeare"] == "Starcoder2ForCausalLM"
    assert {got[n] for n in PRESETS if n.startswith("ladder-")} == {"LlamaForCausalLM"}
    assert {got[n] for n in PRESETS if n.startswith(("gpt2-", "gpt3-"))} | {got["tiny"]} == {"GPT2LMHeadModel"}


def test_hf_tokenizer_gives_tiktoken_ids(tmp_path):
    """The HF fast tokenizer gives tiktoken's ids (special token, emoji, newlines, unseen words)."""
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) checks the HF export")
    from orchestration.deploy.export import export_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model

    ckpt = write_checkpoint(tmp_path / "run")
    result = export_checkpoint(ckpt, str(tmp_path / "hf"), fmt="hf")
    _, _, enc, _ = load_checkpoint_model(ckpt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(result["out_dir"], local_files_only=True)
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


def test_unmappable_model_refuses_hf_and_round_trips_as_raylm(tmp_path):
    from orchestration.deploy.export import ExportError, export_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model

    ckpt = write_checkpoint(tmp_path / "run", pos_encoding="learned", mlp="swiglu", norm="rmsnorm", n_kv_head=1)
    with pytest.raises(ExportError, match=r"pos_encoding='learned', mlp='swiglu', norm='rmsnorm'.*--format raylm"):
        export_checkpoint(ckpt, str(tmp_path / "hf"), fmt="hf")

    result = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), fmt="raylm")  # a run dir resolves too
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "not possible" in readme and "mlp='swiglu'" in readme
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_raylm_logits(result["out_dir"], ids), _raylm_logits(ckpt, ids), atol=0, rtol=0)
    _, cfg, enc, meta = load_checkpoint_model(result["out_dir"])
    assert cfg.mlp == "swiglu" and meta["format"] == "raylm-export" and enc.encode("To be") != []

    with pytest.raises(ExportError, match="unknown export format"):
        export_checkpoint(ckpt, str(tmp_path / "x"), fmt="onnx")


def _write_lora_finetune(base_ckpt: str, root: Path, targets: list[str]) -> tuple[str, GPT]:
    """A LoRA fine-tune of ``base_ckpt`` as the fine-tune driver leaves it (merged weights, the
    adapters, finetune.json naming the base), with random adapters; returns (its dir, the tuned model)."""
    import shutil

    from safetensors.torch import save_file

    from model.lora import adapter_state_dict, apply_lora, merged_state_dict
    from orchestration.checkpoint_format import ADAPTER_FILE, FINETUNE_FILE, MODEL_FILE
    from orchestration.checkpoint_format import CHECKPOINT_META_FILE as META_FILE
    from orchestration.evaluate.load import load_checkpoint_model

    model, cfg, _, _ = load_checkpoint_model(base_ckpt)
    apply_lora(model, targets, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # B starts at zero; a trained adapter moves the logits
    state = {k: v.detach() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model, state)
    tuned = GPT(cfg).eval()
    tuned.load_state_dict(merged)
    ckpt = root / "checkpoint_00000020"
    shutil.copytree(base_ckpt, ckpt)
    save_file({n: p.detach().contiguous() for n, p in tuned.named_parameters()}, str(ckpt / MODEL_FILE))
    save_file({k: v.contiguous() for k, v in adapter_state_dict(state).items()}, str(ckpt / ADAPTER_FILE))
    info = {"base_checkpoint": base_ckpt, "lora": {"rank": 2, "alpha": 4.0, "targets": targets}}
    (ckpt / FINETUNE_FILE).write_text(json.dumps(info))
    (ckpt / META_FILE).unlink()
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / META_FILE).write_text(json.dumps({"step": 20, "world_size": 1, "files": files, "config": {}}))
    return str(ckpt), tuned


@pytest.mark.parametrize(
    "shape", ["gpt2-untied-sinusoidal-gqa-nobias", "shakespeare", "llama-gqa-bias-untied", "ladder-mup"]
)
def test_lora_adapters_export_to_peft_for_every_family(tmp_path, shape):
    """Fused qkv and SwiGLU adapters split into one PEFT adapter per HF layer (same A, B's rows);
    base + adapter in PEFT gives the merged fine-tune's logits."""
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) checks the HF export")
    peft = pytest.importorskip("peft", reason="peft (dev extra) checks the adapter export")
    from orchestration.deploy.export import export_checkpoint

    overrides, _ = SHAPES[shape]
    base = write_checkpoint(tmp_path / "base", **overrides)
    tuned_ckpt, tuned = _write_lora_finetune(base, tmp_path / "tuned", ["attn", "mlp"])
    result = export_checkpoint(tuned_ckpt, str(tmp_path / "hf"), fmt="hf", lora="separate")
    assert "adapter/adapter_model.safetensors" in result["files"] and result["checkpoint"] == base

    hf = transformers.AutoModelForCausalLM.from_pretrained(result["out_dir"], local_files_only=True).eval()
    ids = torch.randint(0, tuned.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_logits = hf(ids).logits.clone()
        want = tuned(ids)[0]
        adapted = peft.PeftModel.from_pretrained(hf, str(tmp_path / "hf" / "adapter")).eval()
        torch.testing.assert_close(adapted(ids).logits, want, atol=1e-4, rtol=0)
    assert not torch.allclose(base_logits, want, atol=1e-3)  # the adapters are what moves it
