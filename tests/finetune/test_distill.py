"""Distillation without Ray: the loss against its textbook form, the teacher kept out of training, the
student's shape and the config checks. The run through Ray Train + DeepSpeed (ZeRO-3) is
tests/finetune/test_finetune.py's, on the session's demo."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_pipeline import tokenizer as tok
from data_pipeline.storage import embedded_corpus_dir
from model.config import ModelConfig
from model.gpt import GPT
from orchestration.config import ConfigError, FinetuneRunConfig, load_config
from orchestration.finetune.distill import Distiller, distill_loss, distill_models, student_config

torch.set_num_threads(1)

TEACHER = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, pos_encoding="rope", bias=False)


def finetune_config(*overrides: str) -> FinetuneRunConfig:
    return load_config(None, overrides, schema=FinetuneRunConfig)


def reference_loss(student, teacher, targets, alpha, temperature):
    """Hinton et al.'s loss written the textbook way, with torch's own KL and cross-entropy."""
    vocab, keep = student.size(-1), targets.reshape(-1) != -1
    ce = F.cross_entropy(student.reshape(-1, vocab), targets.reshape(-1), ignore_index=-1)
    kl_rows = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        reduction="none",
        log_target=True,
    ).sum(-1)
    kl = kl_rows.reshape(-1)[keep].mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def test_distill_loss_is_the_data_loss_at_alpha_0_the_scaled_kl_at_alpha_1_and_hintons_form_between():
    torch.manual_seed(0)
    student = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 50, dtype=torch.float64)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3] = -1  # ignored positions carry neither part
    for alpha, temperature in [(0.0, 2.0), (1.0, 2.0), (0.7, 3.0), (0.5, 1.0)]:
        loss, kl, ce = distill_loss(student, teacher, targets, alpha=alpha, temperature=temperature)
        ref, ref_kl, ref_ce = reference_loss(student, teacher, targets, alpha, temperature)
        torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close((kl, ce), (ref_kl.float(), ref_ce.float()), rtol=1e-6, atol=0)
        (grad,) = torch.autograd.grad(loss, student)
        (ref_grad,) = torch.autograd.grad(ref, student)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
        assert not kl.requires_grad and not ce.requires_grad
    loss, kl, ce = distill_loss(student, teacher, targets, alpha=0.0, temperature=2.0)
    assert loss == ce and kl > 0  # alpha 0: exactly the data loss; the KL is still measured
    loss, kl, _ = distill_loss(student, teacher, targets, alpha=1.0, temperature=2.0)
    assert loss == 4.0 * kl
    with pytest.raises(ValueError, match="one vocabulary"):
        distill_loss(student, teacher[..., :40], targets, alpha=0.5, temperature=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (0.5, 2.0), (1.0, 0.5)])
def test_distill_loss_across_chunks_in_low_precision(monkeypatch, dtype, alpha, temperature):
    """Chunks of 4 rows over 21 (the last one short), fp32 and bf16 logits: the same value and gradient
    as the reference on the upcast logits; ignored rows get no gradient, the gradient keeps the logits'
    dtype and scales with the upstream gradient."""
    import model.loss

    monkeypatch.setattr(model.loss, "loss_chunk_rows", lambda vocab: 4)
    torch.manual_seed(1)
    student = (3 * torch.randn(3, 7, 50)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(3, 7, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :3], targets[2, -2:] = -1, -1
    loss, kl, ce = distill_loss(student, teacher, targets, alpha=alpha, temperature=temperature)
    (grad,) = torch.autograd.grad(2.0 * loss, student)
    upcast = student.detach().float().requires_grad_()
    ref, ref_kl, ref_ce = reference_loss(upcast, teacher.detach().float(), targets, alpha, temperature)
    (ref_grad,) = torch.autograd.grad(2.0 * ref, upcast)
    torch.testing.assert_close((loss, kl, ce), (ref, ref_kl, ref_ce), rtol=1e-5, atol=1e-6)
    assert grad.dtype == dtype and teacher.grad is None
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-4}
    torch.testing.assert_close(grad.float(), ref_grad, **tol)
    assert not grad[0, :3].any() and not grad[2, -2:].any()


def test_the_teacher_stays_frozen_outside_the_optimizer_and_validation_scores_the_plain_loss():
    """One engine step of the distillation forward (ZeRO-0 engine, no Ray): only the student moves, the
    optimizer never sees the teacher, and eval mode scores the student's own next-token loss."""
    from orchestration.train.config import TrainConfig
    from orchestration.train.engine import wrap_model

    torch.manual_seed(0)
    teacher = GPT(TEACHER)
    student = GPT(student_config(TEACHER, {"n_layer": 1, "n_embd": 16}, 0.0, "teacher"))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    engine = wrap_model(student, TrainConfig(zero_stage=0, lr=1e-2), torch.device("cpu"))
    distiller = Distiller(teacher, alpha=0.5, temperature=2.0, precision="fp32", device="cpu")
    batch = {"tokens": torch.randint(0, 64, (4, 17)).numpy()}

    loss, items, _ = distiller.forward(engine, batch, torch.device("cpu"))
    engine.backward(loss)
    engine.step()
    optimized = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters()}
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert items == 4 * 16

    engine.eval()
    val_loss, _, _ = distiller.forward(engine, batch, torch.device("cpu"))
    tokens = torch.from_numpy(batch["tokens"]).long()
    with torch.no_grad():
        torch.testing.assert_close(val_loss, student(tokens[:, :-1], tokens[:, 1:])[1])
    window = distiller.window_metrics(engine)  # the train micro-batch's parts, then a fresh window
    assert window["distill_kl"] > 0 and window["distill_ce"] > 0
    assert distiller.window_metrics(engine) == {}


def test_the_student_is_the_teachers_shape_with_the_keys_given():
    student = student_config(TEACHER, {"n_layer": 1, "n_embd": 16}, 0.1, "teacher")
    assert (student.n_layer, student.n_embd, student.n_head, student.dropout) == (1, 16, 2, 0.1)
    assert (student.vocab_size, student.pos_encoding, student.bias, student.preset) == (64, "rope", False, None)
    with pytest.raises(ConfigError, match="finetune.student.n_layer"):
        student_config(TEACHER, {"n_layer": "two"}, 0.0, "teacher")
    with pytest.raises(ConfigError, match="divisible by n_head"):
        student_config(TEACHER, {"n_head": 3}, 0.0, "teacher")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.task=sft", "finetune.teacher=t"], "teacher applies to task 'distill'"),
        (["finetune.task=lm", "finetune.student={n_layer: 1}"], "student applies to task 'distill'"),
        (["finetune.task=distill", "finetune.mode=lora"], "mode must be 'full'"),
        (["finetune.task=distill", "finetune.student={n_layer: 1}", "finetune.checkpoint=c"], "not both"),
        (["finetune.task=distill", "finetune.student={n_layers: 1}"], "did you mean 'n_layer'"),
        (["finetune.task=distill", "finetune.student={vocab_size: 9}"], "teacher's tokenizer"),
        (["finetune.task=distill", "finetune.student={dropout: 0.1}"], "set model.dropout"),
        (["finetune.task=distill", "finetune.alpha=1.5"], "finetune.alpha"),
        (["finetune.task=distill", "finetune.temperature=0"], "finetune.temperature"),
    ],
)
def test_distill_section_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        finetune_config(*overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["finetune.student={n_layer: 1}", "finetune.data=d"], "finetune.teacher is required"),
        (["finetune.teacher=t", "finetune.data=d"], "needs a student"),
    ],
)
def test_run_finetune_checks_distillation_before_anything_runs(overrides, message):
    from orchestration.finetune.driver import run_finetune

    with pytest.raises(ConfigError, match=message):
        run_finetune(finetune_config("finetune.task=distill", *overrides))


def test_teacher_and_student_must_share_the_tokenizer_and_the_student_must_fit_the_context(tmp_path):
    from tests.helpers import write_inference_checkpoint

    text = (embedded_corpus_dir() / "sonnets_gut.txt").read_text(encoding="utf-8")[5000:20000]
    spec, other_spec = tok.train_bpe([text], 300, "gpt4"), tok.train_bpe([text], 280, "gpt4")
    vocab = tok.encoding(spec).n_vocab
    torch.manual_seed(0)
    teacher_cfg = ModelConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=32)
    teacher = write_inference_checkpoint(tmp_path / "teacher", GPT(teacher_cfg), spec, step=10)
    other_cfg = ModelConfig(vocab_size=tok.encoding(other_spec).n_vocab, block_size=16, n_layer=1, n_head=2, n_embd=16)
    other = write_inference_checkpoint(tmp_path / "other", GPT(other_cfg), other_spec, step=5)
    base = ["finetune.task=distill", f"finetune.teacher={tmp_path / 'teacher'}", "finetune.data=d"]

    models = distill_models(finetune_config(*base, "finetune.student={n_layer: 1, n_embd: 16}", "model.dropout=0.1"))
    assert models.teacher_uri == teacher and models.student_uri is None and models.spec["hash"] == spec["hash"]
    assert (models.student.n_layer, models.student.n_embd, models.student.dropout) == (1, 16, 0.1)
    assert models.teacher == teacher_cfg
    with pytest.raises(ConfigError, match="block_size 32 > the teacher's 16"):
        distill_models(finetune_config(*base, "finetune.student={block_size: 32}"))
    with pytest.raises(ConfigError, match="must use the teacher's tokenizer"):
        distill_models(finetune_config(*base, f"finetune.checkpoint={other}"))
    with pytest.raises(ConfigError, match="finetune.teacher: .*neither a complete checkpoint"):
        distill_models(finetune_config(*base[:1], f"finetune.teacher={tmp_path}", "finetune.student={}"))
    from orchestration.deploy.quantize import quantize_checkpoint

    quantize_checkpoint(teacher, str(tmp_path / "int8"), scheme="int8", evaluate=False)
    with pytest.raises(ConfigError, match="finetune.teacher: .*quantized checkpoint"):
        distill_models(finetune_config(*base[:1], f"finetune.teacher={tmp_path / 'int8'}", "finetune.student={}"))


def test_a_resumed_distillation_keeps_its_teacher_and_loss():
    import dataclasses

    from orchestration.config import config_to_dict
    from orchestration.finetune.distill import check_same_distillation

    cfg = finetune_config("finetune.task=distill", "finetune.teacher=/t", "finetune.student={n_layer: 1}")
    meta = {"config": config_to_dict(cfg), "teacher": "/t/checkpoint_00000010"}
    check_same_distillation(meta, cfg, "ckpt", "/t/checkpoint_00000010")
    other = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, alpha=0.0))
    with pytest.raises(ConfigError, match=r"finetune.alpha=0.9, this run has 0.0"):
        check_same_distillation(meta, other, "ckpt", "/t/checkpoint_00000010")
    other = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, temperature=2.0))
    with pytest.raises(ConfigError, match=r"finetune.temperature=1.0, this run has 2.0"):
        check_same_distillation(meta, other, "ckpt", "/t/checkpoint_00000010")
    # the same run dir as teacher, but its newest checkpoint moved on since
    with pytest.raises(ConfigError, match="distilled from the teacher /t/checkpoint_00000010.*now resolves to"):
        check_same_distillation(meta, cfg, "ckpt", "/t/checkpoint_00000020")


def test_the_summary_shows_the_teacher_beside_the_student():
    from orchestration.finetune.summary import summary_blocks

    summary = {
        "task": "distill",
        "mode": "full",
        "trainable_params": 1000,
        "base_checkpoint": None,
        "best_checkpoint": "runs/d/checkpoint_00000004",
        "best_step": 4,
        "total_steps": 4,
        "stopped_early": False,
        "distill": {
            "teacher": "runs/t",
            "temperature": 2.0,
            "alpha": 0.5,
            "teacher_params": 4000,
            "student_params": 1000,
        },
        "teacher": {"loss": 4.0, "perplexity": 54.6},
        "before": None,
        "after": {"loss": 5.0, "perplexity": 148.4},
    }
    (_, text), (_, header, rows) = summary_blocks(summary)
    assert "teacher runs/t (4,000 parameters, frozen)" in text
    assert "student of 1,000 parameters from a fresh init" in text
    assert header == ("metric", "teacher", "before", "after")
    assert rows[0] == ("val loss", "4.0000", "-", "5.0000")
