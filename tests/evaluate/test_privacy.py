"""The privacy audit's measures (orchestration.evaluate.privacy): exposure ranks every candidate exactly,
the AUC and its bootstrap are the textbook ones, and a model trained on planted text shows it (and the
controls do not). `raylm eval --suite privacy` on the demo run is in tests/test_demo.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from data_pipeline import tokenizer as tok
from data_pipeline.config import AuditConfig
from data_pipeline.plant import corpus_lines, plan_audit
from data_pipeline.storage import embedded_corpus_dir
from model.config import ModelConfig
from model.gpt import GPT
from orchestration.evaluate.privacy import (
    bootstrap_auc,
    candidate_logprobs,
    exposure_falls,
    exposures,
    extraction_scores,
    membership_scores,
    min_k_prob,
    roc_auc,
)
from orchestration.evaluate.scoring import continuation_token_logprobs

TEMPLATE = "the secret number is {secret}"


@pytest.fixture(scope="module")
def corpus():
    text = sorted(embedded_corpus_dir().glob("*_gut.txt"))[1].read_text(encoding="utf-8", errors="replace")[:80_000]
    spec = tok.train_bpe([text], 512, "gpt4")
    enc = tok.encoding(spec)
    return text, enc, enc.encode_single_token(tok.EOT)


def _gpt(vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=64))
    model.init_weights()
    return model.eval()


def test_exposure_ranks_every_candidate_as_the_whole_sequence_scores_it(corpus):
    _, enc, eot = corpus
    model = _gpt(enc.n_vocab)
    logprobs = candidate_logprobs(model, enc, TEMPLATE, 2, eot, batch_size=7)
    assert logprobs.shape == (100,)
    # the full sequence's log-likelihood differs from the candidate's by the shared context's, for all 100
    whole = [[eot, *enc.encode_ordinary(f"the secret number is {s:02d}")] for s in range(100)]
    full = np.array([t.sum() for t in continuation_token_logprobs(model, [(w[:1], w[1:]) for w in whole])])
    np.testing.assert_allclose(full - logprobs, (full - logprobs)[0], atol=1e-4)
    ranks, bits = exposures(logprobs, list(range(100)))
    assert sorted(ranks.tolist()) == list(range(1, 101))  # no ties in float log-probs: a permutation
    best = int(np.argmax(logprobs))
    assert ranks[best] == 1 and bits[best] == pytest.approx(math.log2(100))


def test_exposure_rank_counts_only_likelier_candidates():
    ranks, bits = exposures(np.array([-1.0, -3.0, -2.0, -2.0]), [0, 1, 2, 3])
    assert ranks.tolist() == [1, 4, 2.5, 2.5]  # tied candidates share the mid-rank
    np.testing.assert_allclose(bits, [2.0, 0.0, 2 - np.log2(2.5), 2 - np.log2(2.5)])
    _, flat = exposures(np.zeros(1000), [3, 500])  # a model that tells no secret apart exposes none of them
    np.testing.assert_allclose(flat, np.log2(1000) - np.log2(500.5))


def test_auc_is_mann_whitney_and_the_ci_covers_it():
    rng = np.random.default_rng(0)
    members, others = rng.normal(0.5, 1, 40), rng.normal(0, 1, 50)
    members[:3] = others[:3]  # ties count half
    u = mannwhitneyu(members, others).statistic
    assert roc_auc(members, others) == pytest.approx(u / (40 * 50))
    result = bootstrap_auc(members, others, seed=0)
    assert result["ci"][0] < result["auc"] < result["ci"][1]
    assert bootstrap_auc(members, others, seed=0) == result
    assert min_k_prob(np.array([-5.0, -1.0, -0.5, -0.1, -0.2]), 0.4) == pytest.approx(-3.0)


@pytest.mark.slow  # trains a model: ~10 s on 2 idle cores
def test_a_model_trained_on_planted_text_shows_it_and_the_controls_do_not(corpus):
    """Train a small GPT on the planted documents alone until it has seen each copy many times: the
    planted secrets reach the top ranks, never-planted ones stay at chance (~1.44 bits); members lose
    less than non-members and their continuations come out exactly."""
    text, enc, eot = corpus
    cfg = AuditConfig(
        enabled=True,
        canary_digits=3,
        canary_repetitions=[8],
        canaries_per_count=2,
        never_planted_canaries=96,
        passages=12,
        passage_repetitions=[4],
        passage_lines=2,
        filler_lines=1,
    )
    record, documents = plan_audit(cfg, corpus_lines([text]))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _gpt(enc.n_vocab).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    docs = [[*ids, eot] for ids in enc.encode_ordinary_batch([t for _, _, t in documents])]
    for _ in range(200):
        stream = [t for i in rng.permutation(len(docs)) for t in docs[i]]
        starts = rng.integers(0, len(stream) - 33, 16)
        batch = torch.tensor([stream[s : s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    canaries = record["canaries"]
    _, bits = exposures(candidate_logprobs(model, enc, TEMPLATE, 3, eot), [int(c["secret"]) for c in canaries])
    planted = bits[[c["repetitions"] > 0 for c in canaries]]
    control = bits[[c["repetitions"] == 0 for c in canaries]]
    assert planted.min() > 7.0, planted  # of log2(1000) = 9.97
    assert control.mean() < 2.5, control.mean()

    passages = record["passages"]
    tokens = [t[:32] for t in enc.encode_ordinary_batch([p["text"] for p in passages])]
    membership = membership_scores(passages, continuation_token_logprobs(model, [([eot], t) for t in tokens]), 0)
    (group,) = membership["by_repetitions"]
    assert group["member_loss"] < group["non_member_loss"] and group["loss"]["auc"] > 0.9, group
    extraction = extraction_scores(model, passages, tokens, eot, 4, 4, 16)
    rates = {g["member"]: g["exact_match"] for g in extraction["by_repetitions"]}
    assert rates[True] > rates[False], extraction


def test_a_fall_counts_only_beyond_two_standard_errors():
    def group(r, mean, stderr):
        return {"repetitions": r, "mean": mean, "stderr": stderr}

    at_chance = [group(0, 1.4, 0.1), group(1, 1.0, 0.5), group(4, 0.7, 0.5), group(16, 5.0, 1.0)]
    assert exposure_falls(at_chance) == []  # 1.4 -> 1.0 -> 0.7: noise around chance
    assert exposure_falls([group(1, 6.0, 0.5), group(4, 2.0, 0.5)]) == [[1, 4]]
