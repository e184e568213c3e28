"""Differentially private pretraining (train.dp, orchestration/train/dp.py) pinned against plain autograd
and Opacus' own accountant: per-sample gradients of every parameter (the tied embedding/head included),
per-sample (not per-batch) clipping, the Poisson sample, the config refusals, and one 2-worker DP run
through Ray Train whose epsilon is Opacus' RDP accountant's for its steps, kept across a checkpoint."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config

from model.config import ModelConfig
from model.gpt import GPT
from orchestration.artifacts import RunDir, read_metrics
from orchestration.config import ConfigError, load_config
from orchestration.train.config import DPConfig, TrainConfig
from orchestration.train.dp import DPEngine, dp_lm_forward, resolve_privacy
from orchestration.train.plan import PrivacyPlan

VOCAB, SEQ = 100, 12  # vocab padded to 128 (pad_vocab_to=64): the head's padding rows are exercised


def _model() -> GPT:
    """A tiny GPT with learned positions (looked up per row under DP) and tied embeddings."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, pad_vocab_to=64, block_size=SEQ, n_layer=2, n_head=2, n_embd=32)
    assert cfg.pos_encoding == "learned" and cfg.tie_embeddings and cfg.padded_vocab_size > VOCAB
    return GPT(cfg)


def _engine(model: GPT, max_grad_norm: float, rows: int, noise: float = 0.0) -> DPEngine:
    """A one-process DPEngine over ``model`` with plain SGD at lr 1 (the update is minus the gradient)."""
    train = TrainConfig(num_workers=1, zero_stage=0, micro_batch_size=rows, max_steps=10, grad_clip=0.0)
    privacy = PrivacyPlan(
        noise_multiplier=noise,
        sample_rate=0.5,
        delta=1e-5,
        max_grad_norm=max_grad_norm,
        train_rows=2 * rows,
        expected_epsilon=0.0,
    )
    return DPEngine(model, torch.optim.SGD(model.parameters(), lr=1.0), train, privacy, "cpu")


def _per_example_grads(model: GPT, tokens: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """Each row's gradient by plain autograd, one row at a time, through the model's own (fused) loss."""
    out = []
    for row in torch.from_numpy(tokens):
        model.zero_grad()
        _, loss = model(row[None, :-1], row[None, 1:])
        loss.backward()
        out.append({name: p.grad.clone() for name, p in model.named_parameters()})
    return out


def _tokens(rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(rows, SEQ + 1))


def test_per_sample_gradients_match_per_example_autograd_for_every_parameter():
    model = _model()
    reference = _per_example_grads(copy.deepcopy(model), _tokens(4))
    engine = _engine(model, max_grad_norm=1.0, rows=4)
    loss, _, _ = dp_lm_forward(engine, {"tokens": _tokens(4)}, torch.device("cpu"))
    engine.backward(loss)
    names = [name for name, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "transformer.wpe.weight" in names  # lm_head is wte (tied)
    for name, p in model.named_parameters():
        want = torch.stack([grads[name] for grads in reference])
        assert p.grad_sample is not None and p.grad_sample.shape == want.shape, name
        torch.testing.assert_close(p.grad_sample, want, rtol=1e-4, atol=1e-6, msg=name)


def test_clipping_is_per_sample_not_per_batch():
    """The update equals minus the mean of the per-row clipped gradients (noise 0 here); a clip of the
    batch's gradient would give another update, so this fails if clipping happened per batch."""
    rows = 6
    tokens = _tokens(rows, seed=2)
    tokens[0, 1:] = tokens[0, 0]  # one row unlike the others: its gradient norm stands out
    model = _model()
    reference = _per_example_grads(copy.deepcopy(model), tokens)
    names = [name for name, _ in model.named_parameters()]
    norms = torch.stack([torch.linalg.vector_norm(torch.stack([g[n].norm() for n in names])) for g in reference])
    clip = float(norms[1:].max()) * 1.2  # only the odd row's gradient is clipped
    assert norms[0] > 1.5 * clip
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    per_sample = {n: sum(f * g[n] for f, g in zip(factors, reference)) / rows for n in names}
    batch = {n: sum(g[n] for g in reference) / rows for n in names}
    batch_norm = torch.linalg.vector_norm(torch.stack([batch[n].norm() for n in names]))
    per_batch = {n: batch[n] * min(1.0, clip / float(batch_norm)) for n in names}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = _engine(model, max_grad_norm=clip, rows=rows)
    for half in (tokens[:4], tokens[4:]):  # two micro-batches of one step: their clipped sums add up
        loss, _, _ = dp_lm_forward(engine, {"tokens": half}, torch.device("cpu"))
        engine.backward(loss)
        engine.accumulate()
    engine.step()
    update = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    for n in names:
        torch.testing.assert_close(update[n], per_sample[n], rtol=1e-4, atol=1e-7, msg=n)
    gap = max(float((per_sample[n] - per_batch[n]).abs().max()) for n in names)
    assert gap > 1e-4, "per-sample and per-batch clipping agree here: the test would not tell them apart"
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 1


def test_empty_sample_steps_and_the_accountant_survives_a_checkpoint(tmp_path):
    """A step with no rows (Poisson can draw none) still steps (noise only) and counts for epsilon; the
    accountant's history comes back from the checkpoint, and a non-DP checkpoint is refused."""
    model = _model()
    engine = _engine(model, max_grad_norm=1.0, rows=4, noise=1.0)
    before = model.lm_head.weight.detach().clone()
    engine.step()  # nothing sampled on this rank
    engine.step()
    assert not torch.equal(before, model.lm_head.weight)  # the noise moved the weights
    assert engine.accountant.history == [(1.0, 0.5, 2)]
    engine.save_checkpoint(str(tmp_path), "ds")
    restored = _engine(_model(), max_grad_norm=1.0, rows=4, noise=1.0)
    restored.load_checkpoint(str(tmp_path), "ds")
    assert restored.accountant.history == [(1.0, 0.5, 2)] and restored.epsilon() == engine.epsilon() > 0
    torch.testing.assert_close(restored.module.lm_head.weight, model.lm_head.weight)

    from orchestration.train.ddp import DDPEngine

    plain_model = _model()
    plain = DDPEngine(plain_model, torch.optim.SGD(plain_model.parameters(), lr=1.0), TrainConfig(zero_stage=0), "cpu")
    plain.save_checkpoint(str(tmp_path / "plain"), "ds")
    with pytest.raises(ValueError, match="trained without train.dp"):
        _engine(_model(), max_grad_norm=1.0, rows=4).load_checkpoint(str(tmp_path / "plain"), "ds")


def test_poisson_sample_is_split_over_ranks_and_repeats_on_resume(tiny_corpus):
    from data_pipeline.loader import poisson_rank_batches
    from data_pipeline.manifest import read_manifest
    from data_pipeline.order import poisson_rows
    from data_pipeline.shard_reader import split_rows

    manifest = read_manifest(tiny_corpus)
    every = split_rows(manifest, "train")
    rows, rate = len(every), 0.05

    def read(rank: int, world: int, start: int, steps: int) -> list[np.ndarray]:
        kw = dict(seed=7, sample_rate=rate, rank=rank, world_size=world, start_step=start, num_steps=steps)
        return list(poisson_rank_batches(manifest, prefetch=0, **kw))

    two = [read(0, 2, 0, 6), read(1, 2, 0, 6)]
    for step in range(6):
        chosen = poisson_rows(rows, rate, 7, step)
        union = np.concatenate([two[0][step], two[1][step]])
        assert sorted(map(bytes, union)) == sorted(map(bytes, every[chosen]))  # the ranks share one sample
        assert abs(len(two[0][step]) - len(two[1][step])) <= 1
    resumed = read(1, 2, 3, 3)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, two[1][3:]))
    sizes = [len(poisson_rows(rows, rate, 7, s)) for s in range(400)]
    assert abs(np.mean(sizes) - rate * rows) < 4 * math.sqrt(rate * rows / 400)  # Binomial(rows, q) per step
    assert len(set(sizes)) > 1


def test_target_epsilon_gives_the_noise_opacus_derives():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    train = TrainConfig(
        num_workers=2,
        zero_stage=0,
        micro_batch_size=4,
        max_steps=50,
        grad_clip=0.0,
        dp=DPConfig(enabled=True, target_epsilon=3.0),
    )
    privacy = resolve_privacy(train, train_rows=1000, total_steps=50)
    assert privacy.sample_rate == 8 / 1000
    want = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.008, steps=50)
    assert privacy.noise_multiplier == want
    accountant = RDPAccountant()
    accountant.history = [(want, 0.008, 50)]
    assert privacy.expected_epsilon == accountant.get_epsilon(delta=1e-5) <= 3.0
    with pytest.raises(ValueError, match="train.dp.delta"):
        resolve_privacy(train, train_rows=10**6, total_steps=50)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.zero_stage=1"], "train.dp.enabled needs train.zero_stage=0"),
        (["train.dp.target_epsilon=2"], "exactly one of train.dp.noise_multiplier and train.dp.target_epsilon"),
        (["train.dp.noise_multiplier=null"], "exactly one of"),
        (["train.grad_clip=1.0"], "train.grad_clip=0, got 1.0"),
        (["train.activation_checkpointing=full"], "train.activation_checkpointing"),
    ],
)
def test_dp_configs_that_cannot_work_are_refused(overrides, message):
    base = ["train.zero_stage=0", "train.grad_clip=0", "train.dp.enabled=true", "train.dp.noise_multiplier=1.0"]
    load_config(None, base)  # the base is valid
    with pytest.raises(ConfigError, match=message):
        load_config(None, base + overrides)


def test_dp_with_the_defaults_names_every_key_to_change_at_once():
    with pytest.raises(ConfigError, match="train.zero_stage=0.*; and train.grad_clip=0"):
        load_config(None, ["train.dp.enabled=true", "train.dp.target_epsilon=8"])


@pytest.mark.slow
def test_a_dp_run_trains_through_ray_train_and_reports_epsilon(ray_session, tiny_corpus, tmp_path):
    """2 workers, 6 steps: dp_epsilon in every record, rising, equal to Opacus' RDP accountant for (noise,
    q, steps taken); the loss and tokens are those of the rows drawn; the report shows epsilon. (The
    accountant's way through a checkpoint is pinned above, without a second launch.) A launch of its
    own: DP-SGD changes the engine, the optimizer and the rows each step reads, so no shared run can
    stand in for it."""
    from opacus.accountants import RDPAccountant

    from data_pipeline.manifest import read_manifest
    from orchestration.report.run import run_report
    from orchestration.train.driver import run_training

    dp = ["train.grad_clip=0", "train.dp.enabled=true", "train.dp.noise_multiplier=0.8", "train.dp.max_grad_norm=0.5"]
    short = ["train.max_steps=6", "train.log_interval=1", "train.eval_interval=6", "train.checkpoint_interval=6"]
    summary = run_training(tiny_config(tiny_corpus, tmp_path, "dp", zero_stage=0, overrides=dp + short))
    run = RunDir.at(summary["run_dir"])
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and math.isfinite(summary["final_val_loss"])
    rows = sum(shard["sequences"] for shard in read_manifest(tiny_corpus)["splits"]["train"]["shards"])
    rate = 24 / rows  # tiny_config's global batch over the train rows

    def opacus_epsilon(steps: int) -> float:
        accountant = RDPAccountant()
        accountant.history = [(0.8, rate, steps)]
        return accountant.get_epsilon(delta=1e-5)

    epsilons = [r["dp_epsilon"] for r in records]
    assert all(b > a > 0 for a, b in zip(epsilons, epsilons[1:]))
    for r in records:
        assert r["dp_sample_rate"] == pytest.approx(rate) and r["dp_steps"] == r["step"]
        assert r["dp_epsilon"] == pytest.approx(opacus_epsilon(r["step"]), rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(r["dp_rows_sampled"] * 32 / r["step_time_s"], rel=1e-6)
    assert len({r["dp_rows_sampled"] for r in records}) > 1  # Poisson: the batch size varies
    _, sections, results = run_report(run)
    assert results["privacy"]["dp_epsilon"] == records[-1]["dp_epsilon"]
    assert "Differential privacy" in [title for title, _ in sections]
