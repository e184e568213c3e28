"""`raylm quantize`: the int8/int4 math, the quantized modules against fp32 (in bf16, moved, reloaded),
and a quantized checkpoint of a trained tiny GPT loaded by eval, generate, interpret, the serve replica
and export like any other (fine-tuning refuses it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.gpt import GPT
from model.quantize import (
    QuantizedLinear,
    apply_quantized_weights,
    build_quantized_model,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_weights,
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


def test_packed_cache_follows_reloaded_weights():
    """The int4 packed CPU copy is rebuilt after load_state_dict writes new integers into the buffers."""
    torch.manual_seed(0)
    module = QuantizedLinear(*quantize_int4(torch.randn(32, 64), 32), 64, group_size=32)
    other = QuantizedLinear(*quantize_int4(torch.randn(32, 64), 32), 64, group_size=32)
    x = torch.randn(1, 2, 64)
    module(x)  # builds the packed copy
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(module(x), F.linear(x, other.weight), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pos_encoding", ["rope", "sinusoidal"])
def test_meta_device_build_equals_swapping_into_a_built_model(pos_encoding):
    """``build_quantized_model`` (meta device, assign, tables rebuilt) gives the model a swap into a fully
    built fp32 GPT gives, with nothing left on the meta device."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, pos_encoding=pos_encoding)
    tensors, spec = quantize_weights(GPT(cfg), "int8")
    built = build_quantized_model(cfg, tensors, spec)
    swapped = apply_quantized_weights(GPT(cfg), tensors, spec).eval()
    assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(built(idx)[0], swapped(idx)[0])


def _train(model: GPT, tokens: torch.Tensor, steps: int) -> None:
    """A few dozen AdamW steps on random windows of ``tokens``: enough to leave the uniform guess far behind."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    T = model.cfg.block_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matmuls this small only lose to threads (50x on a busy 2-core machine)
    try:
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(tokens) - T - 1, (16,), generator=gen)
            batch = torch.stack([tokens[s : s + T + 1] for s in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny tied GPT, trained a few dozen steps, as a checkpoint with its tokenizer, plus a held-out
    text file, quantized both ways (with the loss comparison):
    {"ckpt", "text", "root", "spec", "ln_vocab", "int8", "int4": (out dir, quantization record)}."""
    import math

    from data_pipeline import tokenizer as tok
    from orchestration.deploy.quantize import quantize_checkpoint
    from tests.helpers import write_inference_checkpoint

    root = tmp_path_factory.mktemp("quant")
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 40
    spec = tok.train_bpe([text], 300, "gpt4")
    enc = tok.encoding(spec)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=64)
    model = GPT(cfg)
    _train(model, torch.tensor(enc.encode(text)), steps=40)
    (root / "held_out.txt").write_text(text)
    ckpt = write_inference_checkpoint(root / "run", model, spec, step=7, meta={"data": str(root / "held_out.txt")})
    out = {"ckpt": ckpt, "text": str(root / "held_out.txt"), "root": root, "spec": spec}
    out["ln_vocab"] = math.log(cfg.vocab_size)
    for scheme in ("int8", "int4"):
        record = quantize_checkpoint(ckpt, str(root / scheme), scheme=scheme, data=out["text"], max_sequences=8)
        out[scheme] = (root / scheme, record)
    return out


@pytest.mark.parametrize("scheme,min_ratio,max_delta,max_rel", [("int8", 3.5, 0.01, 0.01), ("int4", 5.0, 0.05, 0.08)])
def test_quantized_checkpoint_loads_evals_generates_and_serves(tiny_checkpoint, scheme, min_ratio, max_delta, max_rel):
    from safetensors.torch import load_file

    from model.generate import generate
    from model.quantize import QuantizedEmbedding, QuantizedLMHead
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.evaluate.load import load_checkpoint_model

    out, record = tiny_checkpoint[scheme]
    fp32_bytes = (Path(tiny_checkpoint["ckpt"]) / "model.safetensors").stat().st_size
    assert record["bytes_before"] == fp32_bytes
    assert record["bytes_after"] == (out / "model.quantized.safetensors").stat().st_size
    assert record["ratio"] >= min_ratio, record["ratio"]
    # the model learned (a uniform guess scores ln V): a broken quantized layer shows in the delta
    assert record["eval"]["fp32"]["loss"] < 0.6 * tiny_checkpoint["ln_vocab"], record["eval"]["fp32"]
    assert abs(record["eval"]["loss_delta"]) < max_delta
    assert record["eval"]["fp32"]["tokens"] == record["eval"]["quantized"]["tokens"] > 0
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
    # logits close to the fp32 model's, relative to their size
    fp32 = load_checkpoint_model(tiny_checkpoint["ckpt"])[0]
    idx = torch.tensor([enc.encode("To be, or not to be, that is the question")])
    ref = fp32(idx)[0]
    rel = ((model(idx)[0] - ref).norm() / ref.norm()).item()
    assert rel < max_rel, rel
    # eval reloads from disk and gets the loss quantize recorded; eval without --data finds the same text
    reloaded = evaluate_lm(loaded, meta["data"], max_sequences=8)
    assert reloaded["loss"] == pytest.approx(record["eval"]["quantized"]["loss"], abs=1e-5)
    # KV-cached greedy decoding (one row per step: int4's packed kernel) == full forwards, step by step
    prompt = enc.encode("To be")
    cached = generate(model, [prompt], 6, temperature=0.0)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert cached == ids[len(prompt) :]

    from orchestration.deploy.serve import _deployment_class

    replica = _deployment_class().func_or_class(str(out), 4, 0.01, 8, None, "cpu", 1)  # Serve's replica, in-process
    assert isinstance(replica.model.lm_head, QuantizedLMHead) and replica.info["step"] == 7
    assert replica.info["quantization"]["scheme"] in ("int8", "int4")  # /info says what is served


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_runs_in_bf16_and_keeps_one_tied_matrix(tiny_checkpoint, scheme):
    """``.to(bfloat16)``: the embedding and every matmul compute in bf16 (logits and loss), the scales and
    minima keep their stored dtype and values, and the tied head reads the embedding's buffers through
    casts and device moves."""
    from orchestration.evaluate.load import load_checkpoint_model

    model = load_checkpoint_model(str(tiny_checkpoint[scheme][0]))[0]
    wte, head = model.transformer.wte, model.lm_head
    scales, zeros = wte.scales.clone(), None if wte.zeros is None else wte.zeros.clone()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 20))
    ref = model(idx)[0]
    model.to(torch.bfloat16)
    assert wte.scales.dtype == scales.dtype and torch.equal(wte.scales, scales)
    assert zeros is None or torch.equal(wte.zeros, zeros)
    assert head.qweight is wte.qweight and head.scales is wte.scales  # one matrix, not two copies
    assert "lm_head.qweight" not in model.state_dict()
    logits = model(idx)[0]
    assert logits.dtype == torch.bfloat16 and wte(idx).dtype == torch.bfloat16
    assert ((logits.float() - ref).norm() / ref.norm()).item() < 0.05
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(loss)
    model.to("meta")  # a device move (the CPU's stand-in for .to("cuda")): the head still holds no copy
    assert head.qweight is wte.qweight and wte.qweight.is_meta and wte.scales.is_meta


def test_speed_comparison_warms_up_each_model_and_times_only_forwards(tiny_checkpoint, monkeypatch):
    """Each model runs one untimed warm-up batch, then its timed pass over windows tokenised beforehand:
    the first model measured no longer absorbs the process's warm-up."""
    import itertools

    from orchestration.deploy import quantize as quantize_module
    from orchestration.evaluate.load import load_checkpoint_model

    fp32, _, enc, _ = load_checkpoint_model(tiny_checkpoint["ckpt"])
    quantized = load_checkpoint_model(str(tiny_checkpoint["int4"][0]))[0]
    events = []
    for name, model in (("fp32", fp32), ("quantized", quantized)):
        model.register_forward_hook(lambda *_, name=name: events.append(name))
    clock = quantize_module.time.perf_counter
    monkeypatch.setattr(quantize_module.time, "perf_counter", lambda: events.append("t") or clock())
    seqs = torch.randint(0, fp32.cfg.vocab_size, (12, fp32.cfg.block_size + 1)).numpy()
    result = quantize_module.compare_eval(fp32, quantized, enc, seqs)
    runs = [key for key, _ in itertools.groupby(events)]
    assert runs == ["fp32", "t", "fp32", "t", "quantized", "t", "quantized", "t"], events
    assert result["fp32"]["tokens"] == result["quantized"]["tokens"] == 12 * fp32.cfg.block_size


def test_interpret_runs_on_a_quantized_checkpoint(tiny_checkpoint, tmp_path):
    """Integrated gradients need the embedding's ``weight`` and a backward through the int4 head (few
    rows on the CPU: not the packed kernel, which has none)."""
    from orchestration.evaluate.interpret import run_interpret

    out = tmp_path / "interp"
    run_interpret(str(tiny_checkpoint["int4"][0]), "To be", str(out), ig_steps=8, probe="none")
    result = json.loads((out / "interpret.json").read_text())
    ig = result["integrated_gradients"]
    assert len(ig["attributions"]) == len(result["token_ids"]) and any(a != 0 for a in ig["attributions"])
    assert result["logit_lens_last_layer_max_abs_diff"] <= 1e-4


def test_tied_int4_layers_a_group_size_cannot_split_stay_fp32_and_tied(tiny_checkpoint, tmp_path, capsys):
    """n_embd 96 with int4 groups of 64: the tied embedding and head stay fp32 (stored once, tied again on
    load), the 384-column MLP projections are quantized, and the written checkpoint loads."""
    from data_pipeline import tokenizer as tok
    from orchestration.cli import main
    from orchestration.evaluate.load import load_checkpoint_model
    from tests.helpers import write_inference_checkpoint

    spec = tiny_checkpoint["spec"]
    torch.manual_seed(0)
    fp32 = GPT(ModelConfig(vocab_size=tok.encoding(spec).n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=96))
    ckpt = write_inference_checkpoint(tmp_path / "run", fp32.eval(), spec, step=1)
    out = tmp_path / "q"
    argv = ["quantize", "--checkpoint", ckpt, "--scheme", "int4", "--group-size", "64", "--out", str(out)]
    assert main([*argv, "--no-eval"]) == 0
    record = json.loads((out / "quantization.json").read_text())
    assert {"transformer.wte", "lm_head"} <= set(record["kept_fp32"]) and record["tied"] == {}
    assert "transformer.h.0.mlp.c_proj" in record["modules"]
    model = load_checkpoint_model(str(out))[0]
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, fp32.cfg.vocab_size, (1, 16))
    ref = fp32(idx)[0]
    assert ((model(idx)[0] - ref).norm() / ref.norm()).item() < 0.1
    assert f"wrote {out}" in capsys.readouterr().out


def test_interval_checkpoint_and_refused_outputs(tiny_checkpoint, tmp_path):
    """A checkpoint whose model.safetensors was consolidated after its meta was written (not listed in
    it) quantizes; the output meta lists exactly the files written; a non-empty --out, the source
    checkpoint included, is refused before anything is written."""
    import shutil

    from orchestration.checkpoint_format import CheckpointError
    from orchestration.deploy.quantize import quantize_checkpoint

    ckpt = tmp_path / "run" / "checkpoint_00000007"
    shutil.copytree(tiny_checkpoint["ckpt"], ckpt)
    meta = json.loads((ckpt / "raylm_meta.json").read_text())
    del meta["files"]["model.safetensors"]  # as an interval checkpoint's meta: written before consolidation
    (ckpt / "raylm_meta.json").write_text(json.dumps(meta))
    source_meta = (ckpt / "raylm_meta.json").read_text()

    q = tmp_path / "q"
    record = quantize_checkpoint(str(ckpt), str(q), scheme="int8", evaluate=False)
    assert record["bytes_before"] == (ckpt / "model.safetensors").stat().st_size
    written = json.loads((q / "raylm_meta.json").read_text())["files"]
    assert set(written) == {p.name for p in q.iterdir()} - {"raylm_meta.json"}
    assert {"model.quantized.safetensors", "quantization.json", "model_config.json"} <= set(written)

    (tmp_path / "busy" / "sub").mkdir(parents=True)
    for target in (q, ckpt, tmp_path / "busy"):
        with pytest.raises(CheckpointError, match=f"--out {target} already exists and is not an empty directory"):
            quantize_checkpoint(str(ckpt), str(target), scheme="int4", evaluate=False)
    assert (ckpt / "raylm_meta.json").read_text() == source_meta and not (ckpt / "quantization.json").exists()


def test_export_refuses_hf_and_copies_raylm_and_finetune_refuses(tiny_checkpoint, tmp_path):
    from orchestration.checkpoint_format import CheckpointError
    from orchestration.deploy.export import ExportError, export_checkpoint
    from orchestration.deploy.quantize import quantize_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model, local_checkpoint_copy

    q = tiny_checkpoint["int8"][0]
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
