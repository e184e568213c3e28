"""`raylm quantize`: the int8/int4 math, the quantized modules against fp32, and a quantized checkpoint
loaded by eval, generate, the serve replica and export like any other (fine-tuning refuses it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.quantize import (
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def test_int8_round_trip_is_within_half_a_step_per_row():
    w = torch.randn(48, 96) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different ranges
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()  # each row's largest weight uses the full range


def test_int4_round_trip_is_within_half_a_step_per_group():
    w = torch.randn(40, 128)
    w[:, :32] *= 100  # one group far larger than the rest: groups keep their own scale
    packed, scale, lo = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (40, 64) and scale.shape == lo.shape == (40, 4)
    err = (dequantize_int4(packed, scale, lo, 32) - w).abs().reshape(40, 4, 32)
    assert (err <= scale.float()[..., None] / 2 + 1e-3 * scale.float()[..., None]).all()
    values = torch.randint(0, 16, (5, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    assert pack_int4(torch.tensor([[1, 2]])).item() == 0x12  # even column in the high nibble (torchao's order)


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.15)])
def test_quantized_linear_is_close_to_fp32(bits, bound):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=True)
    if bits == 8:
        q, s = quantize_int8(linear.weight)
        module = QuantizedLinear(q, s, None, 128, linear.bias)
    else:
        module = QuantizedLinear(*quantize_int4(linear.weight, 32), 128, linear.bias, group_size=32)
    x = torch.randn(4, 50, 128)
    ref = linear(x).detach()
    rel = ((module(x) - ref).norm() / ref.norm()).item()
    assert rel < bound, rel
    assert torch.allclose(module(x), F.linear(x, module.weight, linear.bias), atol=1e-4)  # forward == weight


def test_int4_packed_cpu_kernel_equals_dequantize_then_matmul():
    """Few rows run torch's packed CPU kernel (rows padded to a multiple of 16 inside), many rows the
    dequantized matmul: both give the reference F.linear over the dequantized weight."""
    torch.manual_seed(0)
    module = QuantizedLinear(*quantize_int4(torch.randn(40, 64), 32), 64, group_size=32)  # 40: not a multiple of 16
    reference_weight = dequantize_int4(module.qweight, module.scales, module.zeros, 32)
    few, many = torch.randn(1, 3, 64), torch.randn(2, 30, 64)
    assert module._cpu_packed is None
    out_few = module(few)
    assert module._cpu_packed is not None  # the packed kernel ran
    assert out_few.shape == (1, 3, 40)
    torch.testing.assert_close(out_few, F.linear(few, reference_weight), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module(many), F.linear(many, reference_weight), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny tied GPT checkpoint with its tokenizer, plus a held-out text file: {"ckpt", "text", "model"}."""
    from data_pipeline import tokenizer as tok
    from model.config import ModelConfig
    from model.gpt import GPT
    from tests.helpers import write_inference_checkpoint

    root = tmp_path_factory.mktemp("quant")
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40
    spec = tok.train_bpe([text], 300, "gpt4")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.encoding(spec).n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=64)
    model = GPT(cfg).eval()
    (root / "held_out.txt").write_text(text)
    ckpt = write_inference_checkpoint(root / "run", model, spec, step=7, meta={"data": str(root / "held_out.txt")})
    return {"ckpt": ckpt, "text": str(root / "held_out.txt"), "root": root}


@pytest.mark.parametrize("scheme,min_ratio,max_delta", [("int8", 3.5, 0.02), ("int4", 5.0, 0.15)])
def test_quantized_checkpoint_loads_evals_generates_and_serves(tiny_checkpoint, scheme, min_ratio, max_delta, capsys):
    from safetensors.torch import load_file

    from model.generate import generate
    from model.quantize import QuantizedEmbedding, QuantizedLMHead
    from orchestration.cli import main
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.evaluate.load import load_checkpoint_model

    out = tiny_checkpoint["root"] / scheme
    argv = ["quantize", "--checkpoint", tiny_checkpoint["ckpt"], "--scheme", scheme, "--out", str(out)]
    assert main([*argv, "--data", tiny_checkpoint["text"], "--max-sequences", "8"]) == 0
    printed = capsys.readouterr().out
    assert "x smaller" in printed and f"wrote {out}" in printed

    record = json.loads((out / "quantization.json").read_text())
    fp32_bytes = (Path(tiny_checkpoint["ckpt"]) / "model.safetensors").stat().st_size
    assert record["bytes_before"] == fp32_bytes
    assert record["bytes_after"] == (out / "model.quantized.safetensors").stat().st_size
    assert record["ratio"] >= min_ratio, record["ratio"]
    assert abs(record["eval"]["loss_delta"]) < max_delta
    # tied: one quantized matrix in the file, no fp32 copy of it, the head an alias
    assert record["tied"] == {"lm_head": "transformer.wte"}
    stored = load_file(str(out / "model.quantized.safetensors"))
    assert not any(k.startswith("lm_head") for k in stored) and "transformer.wte.weight" not in stored
    assert all(t.dtype in (torch.int8, torch.uint8) for k, t in stored.items() if k.endswith(".qweight"))

    loaded = load_checkpoint_model(str(out))
    model, cfg, enc, meta = loaded
    assert isinstance(model.transformer.wte, QuantizedEmbedding) and isinstance(model.lm_head, QuantizedLMHead)
    assert model.lm_head.qweight.data_ptr() == model.transformer.wte.qweight.data_ptr()
    assert meta["quantization"]["scheme"] == scheme and meta["checkpoint"] == tiny_checkpoint["ckpt"]
    # eval reloads from disk and gets the loss quantize recorded; eval without --data finds the same text
    reloaded = evaluate_lm(loaded, meta["data"], max_sequences=8)
    assert reloaded["loss"] == pytest.approx(record["eval"]["quantized"]["loss"], abs=1e-5)
    new = generate(model, [enc.encode("To be")], 5, temperature=0.8, seed=1)
    assert len(new[0]) == 5

    from orchestration.deploy.serve import _deployment_class

    replica = _deployment_class().func_or_class(str(out), 4, 0.01, 8, None, "cpu", 1)  # Serve's replica, in-process
    assert isinstance(replica.model.lm_head, QuantizedLMHead) and replica.info["step"] == 7


def test_export_refuses_hf_and_copies_raylm_and_finetune_refuses(tiny_checkpoint, tmp_path):
    from orchestration.checkpoint_format import CheckpointError
    from orchestration.deploy.export import ExportError, export_checkpoint
    from orchestration.deploy.quantize import quantize_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model, local_checkpoint_copy

    q = tmp_path / "q"
    quantize_checkpoint(tiny_checkpoint["ckpt"], str(q), scheme="int8", evaluate=False)
    assert "eval" not in json.loads((q / "quantization.json").read_text())
    with pytest.raises(ExportError, match=f"Export {tiny_checkpoint['ckpt']} with --format hf.*--format raylm"):
        export_checkpoint(str(q), str(tmp_path / "hf"), fmt="hf")
    copied = export_checkpoint(str(q), str(tmp_path / "raylm"), fmt="raylm")
    assert "model.quantized.safetensors" in copied["files"]
    idx = torch.arange(20)[None]
    before, after = load_checkpoint_model(str(q))[0], load_checkpoint_model(copied["out_dir"])[0]
    assert torch.equal(before(idx)[0], after(idx)[0])
    with pytest.raises(CheckpointError, match="fine-tuning on quantized weights is not supported"):
        local_checkpoint_copy(str(q), None)  # what fine-tuning loads its start checkpoint with
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(str(q), str(tmp_path / "qq"), scheme="int4", evaluate=False)
