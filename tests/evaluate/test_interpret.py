"""`raylm interpret`: the explicit attention path equals SDPA, the logit lens' last layer equals the
logits, integrated gradients are complete, probes beat their control where the label is in the
tokens, and the command writes a self-contained page and its JSON from a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline import tokenizer as tok
from data_pipeline.storage import embedded_corpus_dir
from model.config import ModelConfig
from model.gpt import GPT
from orchestration.evaluate.interpret import attention_maps, integrated_gradients, linear_probes, logit_lens


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_explicit_attention_logit_lens_and_attributions_check_out(pos_encoding):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, block_size=24, n_layer=3, n_head=4, n_embd=48, pos_encoding=pos_encoding))
    model.eval()
    idx = torch.randint(0, 97, (1, 17))
    maps, layer_diff, logits_diff = attention_maps(model, idx)
    assert len(maps) == 3 and maps[0].shape == (4, 17, 17)
    assert np.allclose(maps[1].sum(-1), 1.0, atol=1e-5) and np.all(np.triu(maps[2], k=1) == 0)
    assert layer_diff <= 1e-5 and logits_diff <= 1e-5
    assert not any(block.attn.explicit for block in model.transformer.h)  # back on SDPA afterwards
    lens, lens_diff = logit_lens(model, idx, k=3)
    assert len(lens) == 4 and len(lens[0]) == 17 and len(lens[0][0]) == 3 and lens_diff <= 1e-5
    ig = integrated_gradients(model, idx, steps=128)
    assert len(ig["attributions"]) == 17
    assert ig["completeness_error"] <= 1e-3 * max(1.0, abs(ig["log_prob_input"] - ig["log_prob_baseline"]))


def test_probes_find_a_linearly_decodable_label_and_report_their_control():
    """Windows of two disjoint token ranges: every layer's probe separates them on held-out windows;
    the control task (a random label per token type) is scored on the same positions and selectivity
    is the difference."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)).eval()
    rng = np.random.default_rng(0)
    windows = {"a": [rng.integers(0, 16, 16) for _ in range(24)], "b": [rng.integers(16, 32, 16) for _ in range(24)]}
    probes = linear_probes(model, windows, seed=0)
    assert probes["labels"] == ["a", "b"] and probes["held_out_windows"] == 12 and len(probes["layers"]) == 3
    for row in probes["layers"]:
        assert row["accuracy"] >= 0.95 and 0.0 <= row["control_accuracy"] <= 1.0
        assert row["selectivity"] == pytest.approx(row["accuracy"] - row["control_accuracy"])


def test_interpret_command_writes_the_page_and_the_json(tmp_path, capsys):
    from orchestration.cli import main
    from tests.helpers import write_inference_checkpoint

    text = (embedded_corpus_dir() / "sonnets_gut.txt").read_text(encoding="utf-8")[5000:40000]
    spec = tok.train_bpe([text], 300, "gpt4")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.encoding(spec).n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
    write_inference_checkpoint(tmp_path / "run", model, spec, step=1)
    out = tmp_path / "interp"
    args = ["interpret", "--checkpoint", str(tmp_path / "run"), "--prompt", "ROMEO: shall I", "--out", str(out)]
    assert main([*args, "--probe-windows", "24", "--ig-steps", "32"]) == 0
    result = json.loads((out / "interpret.json").read_text())
    assert result["logit_lens_last_layer_max_abs_diff"] <= 1e-5
    assert result["attention_explicit_vs_sdpa_max_abs_diff"] <= 1e-5
    assert len(result["attention"]) == 2 and len(result["logit_lens"]) == 3
    assert [r["layer"] for r in result["probes"]["layers"]] == [0, 1, 2]
    assert result["probes"]["labels"] == ["folio", "modern"]
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<script" not in page and "Linear probes" in page
    assert "[interpret] wrote" in capsys.readouterr().out
    # an LSTM checkpoint is refused by name
    from model.lstm import RecurrentLM
    from orchestration.evaluate.data_source import EvalError
    from orchestration.evaluate.interpret import interpret

    with pytest.raises(EvalError, match="GPT checkpoints; this one is a RecurrentLM"):
        interpret(RecurrentLM(ModelConfig(arch="lstm", vocab_size=64)), tok.encoding(spec), "x")
