"""`raylm prune`: a tiny checkpoint pruned through the CLI is a complete checkpoint of the smaller shape
that the loader, generation, fine-tuning's model build and `export --format raylm` take; HF's GPT-2
export, a quantized source and bad fractions are refused, naming why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_export import CORPUS, write_checkpoint

from orchestration.cli import main


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> dict:
    """A 4-head GPT-2-shaped checkpoint and its pruned copy (25% of heads and of MLP units), made by
    `raylm prune` on a text file; {"ckpt", "out", "text", "stdout"}."""
    root = tmp_path_factory.mktemp("prune")
    ckpt = write_checkpoint(root / "run", n_head=4)
    text = root / "calibration.txt"
    text.write_text(CORPUS)
    out = root / "pruned"
    argv = ["prune", "--checkpoint", ckpt, "--heads", "0.25", "--neurons", "0.25", "--out", str(out)]
    capture = root / "stdout.txt"
    import contextlib

    with capture.open("w") as f, contextlib.redirect_stdout(f):
        assert main([*argv, "--data", str(text), "--calibration-batches", "2"]) == 0
    return {"ckpt": ckpt, "out": out, "text": str(text), "stdout": capture.read_text()}


def test_pruned_checkpoint_loads_generates_and_builds_for_finetuning(pruned, tmp_path):
    from safetensors.torch import load_file

    from orchestration.checkpoint_format import MODEL_FILE
    from orchestration.deploy.export import export_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model, local_checkpoint_copy
    from orchestration.evaluate.sample import generate_text
    from orchestration.finetune.config import FinetuneConfig
    from orchestration.finetune.task import build_finetune_model

    out = pruned["out"]
    original, cfg0, _, _ = load_checkpoint_model(pruned["ckpt"])
    model, cfg, enc, meta = load_checkpoint_model(str(out))
    assert (cfg.n_head, cfg.head_size, cfg.hidden_dim, cfg.n_embd) == (3, 8, 96, 32)
    assert (cfg0.n_head, cfg0.head_dim, cfg0.hidden_dim) == (4, 8, 128)
    assert meta["format"] == "raylm-pruned" and meta["checkpoint"] == pruned["ckpt"]
    assert set(meta["files"]) == {p.name for p in out.iterdir()} - {"raylm_meta.json"}

    record = json.loads((out / "pruning.json").read_text())
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (original, model))
    assert (record["params_before"], record["params_after"]) == (n0, n1) and n1 < n0
    assert record["bytes_after"] == (out / MODEL_FILE).stat().st_size < record["bytes_before"]
    assert record["calibration"]["split"] == "train" and record["calibration"]["sequences"] > 0
    assert all(len(h) == 3 for h in record["kept"]["heads"]) and all(len(n) == 96 for n in record["kept"]["neurons"])
    stdout = pruned["stdout"]
    assert f"params {n0:,} -> {n1:,}" in stdout and f"B -> {record['bytes_after']:,} B" in stdout
    assert f"wrote {out}" in stdout and f"raylm finetune finetune.checkpoint={out} finetune.task=lm" in stdout

    text = generate_text(str(out), "To be, or not", 12, temperature=0)
    assert isinstance(text, str) and text
    assert enc.decode(enc.encode(text)) == text

    # fine-tuning (recovery) builds the smaller shape from the checkpoint and loads its weights
    state = load_file(str(Path(local_checkpoint_copy(str(out), None)) / MODEL_FILE))
    ft = FinetuneConfig(checkpoint=str(out), task="lm", data="unused.json")
    tuned = build_finetune_model(ft, cfg, state, num_classes=0, seed=0)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(tuned.eval()(idx)[0], model(idx)[0])

    from orchestration.deploy.export import ExportError

    with pytest.raises(ExportError, match=r"3 \* 8 = 24 is not n_embd 32 \(heads were pruned\).*GPT2LMHeadModel"):
        export_checkpoint(str(out), str(tmp_path / "hf"), fmt="hf")
    copied = export_checkpoint(str(out), str(tmp_path / "raylm"), fmt="raylm")
    again, cfg2, _, _ = load_checkpoint_model(copied["out_dir"])
    assert cfg2 == cfg
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])


def test_bad_fractions_and_a_quantized_source_are_refused(pruned, tmp_path, capsys):
    from orchestration.checkpoint_format import CheckpointError
    from orchestration.deploy.prune import prune_checkpoint
    from orchestration.deploy.quantize import quantize_checkpoint

    base = ["prune", "--checkpoint", pruned["ckpt"], "--out", str(tmp_path / "p"), "--data", pruned["text"]]
    for flag, value in (("--heads", "1.0"), ("--neurons", "-0.1"), ("--heads", "x")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, flag, value])
        assert exit_info.value.code == 2
        assert f"argument {flag}: must be" in capsys.readouterr().err
    assert main([*base, "--heads", "0", "--neurons", "0"]) == 2
    assert "--heads and --neurons are both 0: nothing to prune" in capsys.readouterr().err
    assert main([*base, "--heads", "0.1"]) == 2  # 0.1 of 4 heads rounds to none: refused, not ignored
    assert "heads fraction 0.1 removes none of the 4 heads per layer" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()

    q = tmp_path / "q"
    quantize_checkpoint(pruned["ckpt"], str(q), scheme="int8", evaluate=False)
    with pytest.raises(CheckpointError, match=f"is a quantized checkpoint.*Prune {pruned['ckpt']} instead"):
        prune_checkpoint(str(q), str(tmp_path / "pq"), heads=0.25, neurons=0.25, data=pruned["text"])


def test_pruned_rope_model_exports_to_hf_with_its_head_dim(tmp_path):
    """Starcoder2 (the shakespeare shape) reads config.head_dim: the pruned heads export exactly."""
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra) checks the HF export")
    from test_export import _preset_shape

    from orchestration.deploy.export import export_checkpoint
    from orchestration.deploy.prune import prune_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model

    ckpt = write_checkpoint(tmp_path / "run", **_preset_shape("shakespeare"))
    (tmp_path / "text.txt").write_text(CORPUS)
    out = str(tmp_path / "pruned")
    prune_checkpoint(ckpt, out, heads=0.5, neurons=0.25, data=str(tmp_path / "text.txt"), calibration_batches=1)
    result = export_checkpoint(out, str(tmp_path / "hf"), fmt="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["out_dir"], local_files_only=True).eval()
    model, cfg, _, _ = load_checkpoint_model(out)
    assert type(hf).__name__ == "Starcoder2ForCausalLM" and cfg.attn_dim == 16 != cfg.n_embd
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=1e-4, rtol=0)
