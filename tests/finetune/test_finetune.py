"""Fine-tuning: LoRA, the classification head, task data, config checks, and real Ray Train runs.

The slow tests check the session's demo (tests/conftest.py ``demo_runs``) fine-tuned with every shipped
configs/finetune_*.yaml through Ray Train + DeepSpeed: SFT with LoRA (ZeRO-2), classification in full
(ZeRO-0, early stopping), continued pretraining with frozen embeddings and blocks (ZeRO-3) and
distillation into a smaller fresh student (ZeRO-3). Each checks that the driver's scoring of the saved
checkpoint reproduces what the workers measured. Distillation's loss and checks: test_distill.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.classifier import GPTClassifier
from model.config import ModelConfig
from model.gpt import GPT
from model.lora import LoRALinear, apply_lora, merged_state_dict
from orchestration.config import ConfigError, FinetuneRunConfig
from orchestration.config import load_config as load_any

torch.set_num_threads(1)

TINY = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)


def load_config(path=None, overrides=()):
    return load_any(path, overrides, schema=FinetuneRunConfig)


# --- LoRA and the classification head ------------------------------------------------------------


def test_lora_starts_as_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    base = GPT(TINY).eval()
    adapted = GPT(TINY).eval()
    adapted.load_state_dict(base.state_dict())
    names = apply_lora(adapted, ["attn", "mlp"], rank=4, alpha=8.0)
    assert len(names) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(base(idx)[0], adapted(idx)[0])  # B = 0: the adapters add nothing yet
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == {
        n for n, _ in adapted.named_parameters() if ".lora_" in n
    }
    for module in adapted.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.1)
    merged = GPT(TINY).eval()
    merged.load_state_dict(merged_state_dict(adapted, adapted.state_dict()), strict=False)
    assert not torch.allclose(base(idx)[0], adapted(idx)[0])
    torch.testing.assert_close(merged(idx)[0], adapted(idx)[0], atol=1e-5, rtol=1e-5)


def test_lora_rejects_unknown_targets():
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(GPT(TINY), ["embeddings"], rank=2, alpha=2.0)


def test_classifier_reads_the_last_real_token_so_padding_changes_nothing():
    torch.manual_seed(0)
    model = GPTClassifier(TINY, num_classes=3).eval()
    text = torch.randint(0, 64, (1, 7))
    padded = torch.cat([text, torch.zeros(1, 9, dtype=torch.long)], dim=1)
    alone, _ = model(text)
    with_pad, loss = model(padded, labels=torch.tensor([2]), lengths=torch.tensor([7]))
    torch.testing.assert_close(alone, with_pad, atol=1e-6, rtol=1e-6)
    assert loss.item() > 0


# --- task data -------------------------------------------------------------------------------


class _Enc:
    """A byte-level stand-in for a tiktoken Encoding (eot 256)."""

    eot_token = 256

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode())


def test_encode_sft_learns_only_the_response_and_keeps_the_question():
    from data_pipeline.task_data import encode_sft

    rows = [{"prompt": "abcdef?", "response": "xy"}, {"prompt": "p", "response": "r" * 20}]
    tokens, targets, dropped = encode_sft(_Enc(), rows, seq_len=6)
    assert dropped == 1 and tokens.shape == (1, 7) and targets.shape == (1, 6)
    # prompt cut from the left to "def?" so "xy" + eot fit: d e f ? x y <eot>
    assert bytes(tokens[0, :6].tolist()).decode() == "def?xy" and tokens[0, 6] == 256
    assert targets[0].tolist() == [-1, -1, -1, ord("x"), ord("y"), 256]


def test_encode_classification_pads_and_rejects_unknown_labels():
    from data_pipeline.task_data import encode_classification

    tokens, lengths, labels = encode_classification(_Enc(), [{"text": "abc", "label": "b"}], 5, ["a", "b"])
    assert tokens[0].tolist() == [97, 98, 99, 256, 256] and lengths.tolist() == [3] and labels.tolist() == [1]
    with pytest.raises(ValueError, match="label 'z'"):
        encode_classification(_Enc(), [{"text": "abc", "label": "z"}], 5, ["a", "b"])


def test_shipped_tasks_are_deterministic_and_split_by_position_in_the_play():
    from data_pipeline.task_data import GENRES, PLAY_QUESTION, shakespeare_task

    train = shakespeare_task("shakespeare-genre", "train", max_per_document=2)
    val = shakespeare_task("shakespeare-genre", "val", max_per_document=2)
    assert train == shakespeare_task("shakespeare-genre", "train", max_per_document=2)
    assert {r["label"] for r in train} == set(GENRES)
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    qa = shakespeare_task("shakespeare-play-qa", "val", max_per_document=2)
    assert qa[0]["prompt"].endswith(PLAY_QUESTION) and qa[0]["response"].endswith(".")
    mixed = shakespeare_task("shakespeare-instruct", "train", max_per_document=2)
    assert [r["kind"] for r in mixed[:4]] == ["play", "edition"] * 2  # two rows per text, in turn
    assert {r["response"] for r in mixed if r["kind"] == "edition"} == {" First Folio.", " Modernized."}


def test_jsonl_rows_are_checked_line_by_line(tmp_path):
    from data_pipeline.storage import DataSourceError
    from data_pipeline.task_data import load_examples

    (tmp_path / "ok_train.jsonl").write_text('{"prompt": "q", "response": "a"}\n\n')
    assert load_examples(str(tmp_path / "ok_{split}.jsonl"), "sft", "train") == [{"prompt": "q", "response": "a"}]
    cases = {
        "bad": ('{"prompt": "q"}\n', "needs string field"),
        "json": ("{nope\n", "not valid JSON"),
        "empty": ("", "empty file"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / f"{name}_train.jsonl").write_text(text)
        with pytest.raises(DataSourceError, match=message):
            load_examples(str(tmp_path / f"{name}_{{split}}.jsonl"), "sft", "train")
    (tmp_path / "latin_train.jsonl").write_bytes('{"prompt": "caf\u00e9", "response": "a"}'.encode("latin-1"))
    with pytest.raises(DataSourceError, match="not UTF-8"):
        load_examples(str(tmp_path / "latin_{split}.jsonl"), "sft", "train")
    with pytest.raises(ValueError, match="placeholder"):
        load_examples(str(tmp_path / "ok_train.jsonl"), "sft", "train")


# --- config checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.mode=partial"], "needs freeze_blocks"),
        (["finetune.freeze_blocks=1"], "apply to mode 'partial'"),
        (["finetune.lora_targets=[ffn]"], "lora_targets"),
        (["finetune.labels=[a]"], "two distinct"),
    ],
)
def test_finetune_section_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "finetune.checkpoint is required"),
        (["finetune.checkpoint=x"], "finetune.data is required"),
        (["finetune.checkpoint=x", "finetune.data=y", "train.eval_interval=0"], "needs train.eval_interval"),
        (
            ["finetune.checkpoint=x", "finetune.data=y", "train.checkpoint_interval=7"],
            "checkpoints at every evaluation",
        ),
    ],
)
def test_run_finetune_checks_the_config_before_anything_runs(overrides, message):
    from orchestration.finetune.driver import run_finetune

    with pytest.raises(ConfigError, match=message):
        run_finetune(load_config(None, overrides))


def test_early_stopping_state_replays_from_metrics():
    from orchestration.train.loop import EarlyStop
    from orchestration.train.task import EarlyStopping

    records = [
        {"step": 5, "val_loss": 2.0},
        {"step": 10, "val_loss": 1.5},
        {"step": 15, "val_loss": 1.6},
        {"step": 20, "val_loss": 1.7},
        {"step": 25, "val_loss": 1.0},
    ]
    replayed = EarlyStop(EarlyStopping(patience=3, min_delta=0.0), records, step=20, rank=0)
    assert (replayed.best, replayed.bad) == (1.5, 2)
    assert replayed.after_eval(1.55, is_last=False)["stopped_early"]  # third evaluation without improvement
    replayed = EarlyStop(EarlyStopping(patience=3, min_delta=0.6), records, step=10, rank=0)
    assert (replayed.best, replayed.bad) == (2.0, 1)


# --- real runs through Ray Train + DeepSpeed ------------------------------------------------------
# The session's demo (tests/conftest.py ``demo_runs``) fine-tuned its checkpoint with every shipped
# config: SFT with LoRA (ZeRO-2), genre classification in full (ZeRO-0, stopped early), continued
# pretraining on the poems with frozen embeddings and blocks (ZeRO-3) and distillation into a smaller
# fresh student (ZeRO-3). Each test checks one of them.


def _finetuned(demo_runs, name: str) -> dict:
    ft = demo_runs["finetunes"][name]
    assert ft is not None and demo_runs["exit_codes"][name] == 0, demo_runs["exit_codes"]
    return ft


def _records(run_dir: str) -> list[dict]:
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _best_eval(records: list[dict]) -> dict:
    return min((r for r in records if "val_loss" in r), key=lambda r: r["val_loss"])


def test_sft_from_a_relative_jsonl_reads_prompts_and_responses_on_the_driver(tmp_path, monkeypatch, ray_session):
    """Your own SFT data: a `{split}` JSONL named relative to where the command runs; the driver reads
    and tokenizes it (the workers get the arrays), learning only the responses."""
    from orchestration.finetune.driver import task_data

    for split, n in (("train", 12), ("val", 4)):
        rows = [{"prompt": f"Line {i}: what is the word?\n", "response": f" word{i % 3}"} for i in range(n)]
        (tmp_path / f"sft_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["finetune.checkpoint=x", "finetune.task=sft", "finetune.data=sft_{split}.jsonl"])
    data = task_data(cfg, _Enc(), "hash", block_size=64, tokenizer_uri="x")
    assert [r["response"] for r in data.rows_val] == [" word0", " word1", " word2", " word0"]
    assert len(data.rows_train) == 12 and data.n_val == 4 and data.labels is None
    tokens, targets = data.val_arrays["tokens"][0], data.val_arrays["targets"][0]
    learned = bytes(t for t in targets.tolist() if 0 <= t < 256).decode()
    assert learned == " word0" and tokens[0] == ord("L")  # the prompt is read, only the response learned


@pytest.mark.slow
def test_sft_with_lora_trains_adapters_only_and_scores_before_and_after(demo_runs, tmp_path):
    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.report.write import write_report

    summary = _finetuned(demo_runs, "sft")
    records = _records(summary["run_dir"])
    assert summary["final_step"] == 8 and summary["task"] == "sft" and summary["mode"] == "lora"
    # rank 8 adapters on 4 linears x 3 blocks of width 32 (c_attn 32->96, c_proj 32->32, c_fc 32->128,
    # mlp c_proj 128->32): finetune_sft.yaml's rank on the demo's shape
    assert summary["trainable_params"] == 3 * 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    # The driver scores the merged weights it saved; the workers scored the adapted model: same loss.
    assert summary["after"]["response_loss"] == pytest.approx(_best_eval(records)["val_loss"], rel=1e-5)
    assert summary["after"]["response_loss"] < summary["before"]["response_loss"]
    ckpt = Path(summary["best_checkpoint"])
    adapters = load_file(str(ckpt / "adapter.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    model, _, _, _ = load_checkpoint_model(str(ckpt))  # a plain GPT: the adapters are merged in
    assert isinstance(model, GPT)
    assert json.loads((ckpt / "finetune.json").read_text())["lora"]["rank"] == 8
    report = write_report(summary["run_dir"])
    html = Path(report["report.html"]).read_text()
    assert "Fine-tuning: before / after" in html and "response loss" in html

    # Export: merged into a plain HF model (the demo's RoPE shape: Starcoder2), or the base model + a PEFT
    # adapter; both give the tuned logits.
    import peft
    import transformers

    from orchestration.deploy.export import export_checkpoint

    ids = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ours = model(ids)[0]
        merged = export_checkpoint(str(ckpt), str(tmp_path / "merged"), fmt="hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(merged["out_dir"]).eval()
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)
        separate = export_checkpoint(str(ckpt), str(tmp_path / "separate"), fmt="hf", lora="separate")
        assert "adapter/adapter_model.safetensors" in separate["files"]
        base = transformers.AutoModelForCausalLM.from_pretrained(separate["out_dir"]).eval()
        base_logits = base(ids).logits.clone()
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "separate" / "adapter")).eval()
        torch.testing.assert_close(adapted(ids).logits, ours, atol=1e-4, rtol=0)
        assert not torch.allclose(base_logits, ours, atol=1e-4)  # the adapters are what moves it


@pytest.mark.slow
def test_full_classification_fine_tune_stops_early_and_scores_its_best_checkpoint(demo_runs):
    from orchestration.finetune.driver import load_classifier

    summary = _finetuned(demo_runs, "genre")
    records = _records(summary["run_dir"])
    evals = [r for r in records if "val_loss" in r]
    assert summary["task"] == "classification" and summary["mode"] == "full"
    assert summary["stopped_early"] and summary["final_step"] == 8 < summary["total_steps"] == 12
    assert [r["evals_without_improvement"] for r in evals] == [0, 1]
    assert summary["before"]["majority_class"]["accuracy"] > 0 and "zero_shot" in summary["before"]
    best = next(r for r in evals if r["step"] == summary["best_step"])
    assert summary["after"]["accuracy"] == pytest.approx(best["val_accuracy"])
    assert 0.0 <= summary["after"]["macro_f1"] <= 1.0 and "macro_f1" in summary["before"]["zero_shot"]
    assert summary["after"]["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    # full mode: every weight of the GPT and the head trains
    ckpt = Path(summary["best_checkpoint"])
    saved = {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "classifier_head.safetensors"))}
    assert summary["trainable_params"] == sum(np.prod(t.shape) for t in saved.values())
    model = load_classifier(summary["best_checkpoint"], 3)
    assert model.head.out_features == 3


@pytest.mark.slow
def test_continued_pretraining_with_frozen_layers_under_zero3_lowers_domain_loss(demo_runs):
    summary = _finetuned(demo_runs, "poems")
    assert summary["task"] == "lm" and summary["mode"] == "partial" and summary["final_step"] == 4
    assert summary["after"]["loss"] < summary["before"]["loss"]
    # frozen under ZeRO-3 means gathered unchanged into the checkpoint; the unfrozen block moved
    pre = load_file(str(Path(demo_runs["summary"]["checkpoint"]) / "model.safetensors"))
    tuned = load_file(str(Path(summary["best_checkpoint"]) / "model.safetensors"))
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert torch.equal(pre[name], tuned[name]), name
    assert not torch.equal(pre["transformer.h.2.attn.c_attn.weight"], tuned["transformer.h.2.attn.c_attn.weight"])
    frozen = sum(
        t.numel() for n, t in pre.items() if n.startswith(("transformer.wte.", "transformer.h.0.", "transformer.h.1."))
    )
    assert summary["trainable_params"] == sum(t.numel() for t in pre.values()) - frozen


@pytest.mark.slow
def test_continued_pretraining_and_distillation_refuse_another_tokenizer(demo_runs, tiny_corpus):
    """The corpus must use the checkpoint's (the teacher's) tokenizer: refused before any worker starts."""
    from orchestration.finetune.driver import run_finetune

    demo = demo_runs["summary"]["checkpoint"]
    for task, model, owner in (
        ("lm", [f"finetune.checkpoint={demo}"], "checkpoint"),
        ("distill", [f"finetune.teacher={demo}", "finetune.student={n_layer: 1}"], "teacher"),
    ):
        cfg = load_config(
            None,
            [
                *model,
                f"finetune.task={task}",
                f"finetune.data={tiny_corpus}",  # vocab 512; the demo's is 400
                f"train.storage_path={demo_runs['root'] / 'runs'}",
                "train.run_name=refused",
            ],
        )
        with pytest.raises(ConfigError, match=f"with the {owner}'s tokenizer: .*data.tokenizer.kind=file"):
            run_finetune(cfg)


@pytest.mark.slow
def test_distillation_trains_a_smaller_student_that_loads_like_any_checkpoint(demo_runs):
    """configs/finetune_distill.yaml from the demo model: a fresh 1-layer, width-16 student under ZeRO-3
    learns from the frozen teacher; the checkpoint holds the student alone, at its shape."""
    from orchestration.evaluate.load import load_checkpoint_model

    summary = _finetuned(demo_runs, "distill")
    records = _records(summary["run_dir"])
    evals = [r for r in records if "val_loss" in r]
    d = summary["distill"]
    assert summary["task"] == "distill" and summary["final_step"] == 4 and summary["before"] is None
    assert d["teacher"] == demo_runs["summary"]["checkpoint"] and (d["alpha"], d["temperature"]) == (0.9, 1.0)
    # both parts of the loss were measured on the train tokens between evaluations
    assert len(evals) == 2 and all(r["distill_kl"] > 0 and r["distill_ce"] > 0 for r in evals)
    # the val loss is the student's plain next-token loss: the driver's eval of the saved student agrees
    assert summary["after"]["loss"] == pytest.approx(_best_eval(records)["val_loss"], rel=1e-5)
    assert summary["teacher"]["loss"] < summary["after"]["loss"]  # 4 steps of a tiny student: far from it

    ckpt = Path(summary["best_checkpoint"])
    saved = load_file(str(ckpt / "model.safetensors"))
    model, cfg, _, _ = load_checkpoint_model(str(ckpt))
    assert isinstance(model, GPT) and (cfg.n_layer, cfg.n_embd, cfg.n_head) == (1, 16, 2)
    assert saved["transformer.wte.weight"].shape == (cfg.vocab_size, 16)
    assert not any(k.startswith("transformer.h.1.") for k in saved)  # no teacher block came along
    # the teacher is in neither the parameter count nor the optimizer (Adam's two moments, one worker)
    student_params = sum(t.numel() for t in saved.values())
    assert summary["trainable_params"] == d["student_params"] == student_params < d["teacher_params"]
    assert records[-1]["optimizer_state_numel_per_rank"] == [2 * student_params]
    assert json.loads((ckpt / "finetune.json").read_text())["distill"]["teacher"] == d["teacher"]
    assert "| metric | teacher | before | after |" in (Path(summary["run_dir"]) / "finetune.md").read_text()
