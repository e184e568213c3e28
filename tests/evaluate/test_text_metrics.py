"""BLEU, ROUGE and bits per byte against hand-computed values and the reference libraries."""

from __future__ import annotations

import math

import pytest

from orchestration.evaluate.text_metrics import (
    bits_per_byte,
    bleu_tokenize,
    corpus_bleu,
    rouge_l,
    rouge_n,
    rouge_scores,
)

HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS_A = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
REFS_B = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]


def test_bits_per_byte_crafted():
    # A model uniform over 256 byte values pays ln(256) nats per byte: exactly 8 bits per byte
    assert bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    assert bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)


def test_bleu_perfect_and_no_overlap():
    assert corpus_bleu(REFS_A, REFS_A)["bleu"] == pytest.approx(100.0)
    none = corpus_bleu(["alpha beta gamma delta"], ["one two three four"])
    assert none["bleu"] == 0.0 and none["precisions"] == [0.0] * 4


def test_bleu_brevity_penalty_hand_computed():
    # Every n-gram of the hypothesis matches (precisions 100) but it is half the reference's length:
    # BLEU = 100 * exp(1 - 8/4)
    r = corpus_bleu(["a b c d"], ["a b c d e f g h"])
    assert r["precisions"] == [100.0] * 4
    assert r["brevity_penalty"] == pytest.approx(math.exp(-1))
    assert r["bleu"] == pytest.approx(100 * math.exp(-1))
    assert corpus_bleu(["a b c d e f g h i"], ["a b c d e f g h"])["brevity_penalty"] == 1.0  # longer: no penalty


def test_bleu_smoothing_hand_computed():
    # matches: 1-grams 3/5, 2-grams 2/4, 3-grams 1/3, 4-grams 0/2
    hyp, ref = ["a b c x y"], ["a b c d e"]
    logs = [math.log(60.0), math.log(50.0), math.log(100 / 3)]
    assert corpus_bleu(hyp, ref, smooth="none")["bleu"] == 0.0
    assert corpus_bleu(hyp, ref, smooth="exp")["bleu"] == pytest.approx(
        math.exp((sum(logs) + math.log(100 / (2 * 2))) / 4)
    )
    assert corpus_bleu(hyp, ref, smooth="floor")["bleu"] == pytest.approx(
        math.exp((sum(logs) + math.log(100 * 0.1 / 2)) / 4)
    )
    with pytest.raises(ValueError, match="smooth"):
        corpus_bleu(hyp, ref, smooth="add-one")


def test_bleu_sacrebleu_documented_example():
    # sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)
    r = corpus_bleu(HYPS, list(zip(REFS_A, REFS_B)))
    assert r["bleu"] == pytest.approx(48.53, abs=0.005)
    assert [round(p, 1) for p in r["precisions"]] == [82.4, 50.0, 45.5, 37.5]
    assert round(r["brevity_penalty"], 3) == 0.943 and (r["hyp_len"], r["ref_len"]) == (17, 18)


def test_bleu_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = HYPS + ["A well-known fact, (sort of) is: 3.5 apples!", "the the the the", "to be or not"]
    refs = REFS_A + ["A well-known fact (sort of): 3.5 pears!", "the cat is on the mat", "to be, or not to be"]
    # Our tokenizer agrees with sacrebleu's default 13a on plain prose ...
    assert corpus_bleu(hyps, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    # ... and every smoothing method agrees on pre-tokenized text
    tok_h, tok_r = [" ".join(bleu_tokenize(h)) for h in hyps], [" ".join(bleu_tokenize(r)) for r in refs]
    for smooth in ("exp", "floor", "none"):
        for h, r in [(tok_h, tok_r), (tok_h[3:4], tok_r[3:4]), (["a b c x y"], ["a b c d e"])]:
            ours = corpus_bleu(h, r, smooth=smooth, tokenize=False)["bleu"]
            theirs = sacrebleu.corpus_bleu(h, [r], smooth_method=smooth, tokenize="none").score
            assert ours == pytest.approx(theirs, abs=1e-9), (smooth, h)


def test_rouge_hand_computed():
    pred, ref = "the cat sat on the mat", "The cat is on the mat."
    assert rouge_n(pred, ref, 1) == pytest.approx({"precision": 5 / 6, "recall": 5 / 6, "f1": 5 / 6})
    assert rouge_n(pred, ref, 2)["f1"] == pytest.approx(3 / 5)  # the cat, on the, the mat
    # LCS differs from bag-of-words overlap: "b a" vs "a b" shares 2 unigrams but an LCS of 1
    assert rouge_l("b a", "a b")["f1"] == pytest.approx(0.5) and rouge_n("b a", "a b", 1)["f1"] == 1.0
    assert rouge_l("x y a b", "a b")["precision"] == pytest.approx(0.5)
    assert rouge_l("x y a b", "a b")["recall"] == pytest.approx(1.0)
    perfect, disjoint = rouge_scores([ref], [ref]), rouge_scores(["dog"], ["cat"])
    assert all(perfect[k]["f1"] == 1.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert all(disjoint[k]["f1"] == 0.0 for k in ("rouge1", "rouge2", "rougeL"))
    assert rouge_scores(["", "a b"], ["a b", "a b"])["rougeL"]["f1"] == pytest.approx(0.5)  # averaged per pair


def test_rouge_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for pred, ref in zip(HYPS + REFS_B, REFS_A + REFS_A):
        theirs = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for ours, name in [
            (rouge_n(pred, ref, 1), "rouge1"),
            (rouge_n(pred, ref, 2), "rouge2"),
            (rouge_l(pred, ref), "rougeL"),
        ]:
            assert ours["precision"] == pytest.approx(theirs[name].precision)
            assert ours["recall"] == pytest.approx(theirs[name].recall)
            assert ours["f1"] == pytest.approx(theirs[name].fmeasure)
