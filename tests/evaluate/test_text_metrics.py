"""BLEU (sacrebleu), ROUGE (rouge-score) and bits per byte: hand-computed values, the libraries' own
scores on play text with "--" and apostrophes, and the settings each result names."""

from __future__ import annotations

import math
from importlib.metadata import version

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from orchestration.evaluate.text_metrics import bits_per_byte, corpus_bleu, rouge_scores

HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS_A = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
REFS_B = ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]
# Play text where a home-made tokenizer and sacrebleu's 13a disagree: dashes glued to words, elisions
PLAY_HYPS = [
    "'Tis true, my lord--he comes.",
    "and I'll go--",
    "O, I am slain! Ne'er trust me more--'tis done.",
    "What, ho! Where's my lord? He comes, he comes--",
    "Thou art a villain, and I'll prove it so.",
]
PLAY_REFS = [
    "'Tis true, my lord; he comes.",
    "and I will go--",
    "O, I am slain! Never trust me more; 'tis done.",
    "What ho! Where is my lord? He comes--he comes.",
    "Thou art a villain, and I will prove it so.",
]


def test_bits_per_byte_crafted():
    # A model uniform over 256 byte values pays ln(256) nats per byte: exactly 8 bits per byte
    assert bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    assert bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="positive byte count"):
        bits_per_byte(1.0, 0)


def test_bleu_perfect_no_overlap_and_brevity_penalty():
    assert corpus_bleu(REFS_A, REFS_A)["bleu"] == pytest.approx(100.0)
    none = corpus_bleu(["alpha beta gamma delta"], ["one two three four"])
    assert none["bleu"] == 0.0 and none["precisions"] == [0.0] * 4
    # Every n-gram of the hypothesis matches (precisions 100) but it is half the reference's length:
    # BLEU = 100 * exp(1 - 8/4)
    r = corpus_bleu(["a b c d"], ["a b c d e f g h"])
    assert r["precisions"] == [100.0] * 4 and (r["hyp_len"], r["ref_len"]) == (4, 8)
    assert r["brevity_penalty"] == pytest.approx(math.exp(-1))
    assert r["bleu"] == pytest.approx(100 * math.exp(-1))
    assert corpus_bleu(["a b c d e f g h i"], ["a b c d e f g h"])["brevity_penalty"] == 1.0  # longer: no penalty
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])


def test_bleu_smoothing_hand_computed():
    # matches: 1-grams 3/5, 2-grams 2/4, 3-grams 1/3, 4-grams 0/2
    hyp, ref = ["a b c x y"], ["a b c d e"]
    logs = [math.log(60.0), math.log(50.0), math.log(100 / 3)]
    assert corpus_bleu(hyp, ref, smooth_method="none")["bleu"] == 0.0
    assert corpus_bleu(hyp, ref, smooth_method="exp")["bleu"] == pytest.approx(
        math.exp((sum(logs) + math.log(100 / (2 * 2))) / 4)
    )
    assert corpus_bleu(hyp, ref, smooth_method="floor")["bleu"] == pytest.approx(
        math.exp((sum(logs) + math.log(100 * 0.1 / 2)) / 4)  # sacrebleu's floor value is 0.1
    )


def test_bleu_sacrebleu_documented_example_with_two_references():
    # sacrebleu's README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)
    r = corpus_bleu(HYPS, list(zip(REFS_A, REFS_B)))
    assert r["bleu"] == pytest.approx(48.53, abs=0.005)
    assert [round(p, 1) for p in r["precisions"]] == [82.4, 50.0, 45.5, 37.5]
    assert round(r["brevity_penalty"], 3) == 0.943 and (r["hyp_len"], r["ref_len"]) == (17, 18)
    assert r["signature"].startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    # A hypothesis with fewer alternatives than the others: sacrebleu's variable-reference mode
    ragged = corpus_bleu(HYPS, [[REFS_A[0], REFS_B[0]], [REFS_A[1]], [REFS_A[2], REFS_B[2]]])
    theirs = sacrebleu.corpus_bleu(HYPS, [REFS_A, [REFS_B[0], None, REFS_B[2]]])
    assert ragged["bleu"] == theirs.score and ragged["signature"].startswith("nrefs:var")


def test_bleu_on_play_text_is_sacrebleus():
    ours = corpus_bleu(PLAY_HYPS, PLAY_REFS)
    theirs = sacrebleu.corpus_bleu(PLAY_HYPS, [PLAY_REFS])
    assert ours["bleu"] == theirs.score and ours["precisions"] == theirs.precisions
    assert (ours["hyp_len"], ours["ref_len"]) == (theirs.sys_len, theirs.ref_len)
    assert ours["signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    # 13a keeps "lord--he" and "go--" whole: "and I'll go--" is 3 tokens, too short for a 4-gram, so
    # sentence BLEU is 0 (a tokenizer that split off "--" gave 39.8 here)
    assert corpus_bleu(["and I'll go--"], ["and I will go--"])["bleu"] == 0.0
    assert corpus_bleu(["and I'll go--"], ["and I will go--"])["hyp_len"] == 3
    # "'Tis true , my lord--he comes ." (7 tokens) vs "'Tis true , my lord ; he comes ." (9): 6/7 1-grams,
    # 4/6 2-grams, 2/5 3-grams, 1/4 4-grams match; brevity penalty exp(1 - 9/7)
    one = corpus_bleu(PLAY_HYPS[:1], PLAY_REFS[:1])
    expected = 100 * math.exp(1 - 9 / 7) * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert one["bleu"] == pytest.approx(expected)
    assert one["bleu"] == sacrebleu.corpus_bleu(PLAY_HYPS[:1], [PLAY_REFS[:1]]).score
    # Other sacrebleu tokenizers are named in the signature and score as sacrebleu does
    intl = corpus_bleu(PLAY_HYPS, PLAY_REFS, tokenize="intl")
    assert intl["bleu"] == sacrebleu.corpus_bleu(PLAY_HYPS, [PLAY_REFS], tokenize="intl").score
    assert "tok:intl" in intl["signature"]


def test_rouge_hand_computed():
    pred, ref = "the cat sat on the mat", "The cat is on the mat."
    r = rouge_scores([pred], [ref])
    assert r["rouge1"] == pytest.approx({"precision": 5 / 6, "recall": 5 / 6, "f1": 5 / 6})
    assert r["rouge2"]["f1"] == pytest.approx(3 / 5)  # the cat, on the, the mat
    # LCS differs from bag-of-words overlap: "b a" vs "a b" shares 2 unigrams but an LCS of 1
    ba = rouge_scores(["b a"], ["a b"])
    assert ba["rougeL"]["f1"] == pytest.approx(0.5) and ba["rouge1"]["f1"] == 1.0
    xy = rouge_scores(["x y a b"], ["a b"])["rougeL"]
    assert xy["precision"] == pytest.approx(0.5) and xy["recall"] == pytest.approx(1.0)
    assert rouge_scores(["", "a b"], ["a b", "a b"])["rougeL"]["f1"] == pytest.approx(0.5)  # averaged per pair
    # rouge-score's tokenizer on play text: lowercase, "I'll" -> "i", "ll" and "go--" -> "go"
    play = rouge_scores(["and I'll go--"], ["and I will go"])  # [and i ll go] vs [and i will go]
    assert play["rouge1"]["f1"] == pytest.approx(3 / 4) and play["rouge2"]["f1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="equal, non-zero counts"):
        rouge_scores([], [])


def test_rouge_on_play_text_is_rouge_scores_and_names_its_settings():
    ours = rouge_scores(PLAY_HYPS, PLAY_REFS)
    assert ours["settings"]["types"] == ["rouge1", "rouge2", "rougeL"] and ours["settings"]["use_stemmer"] is False
    assert "lowercase" in ours["settings"]["tokenizer"] and ours["settings"]["version"] == version("rouge-score")
    for stem in (False, True):
        ours = rouge_scores(PLAY_HYPS, PLAY_REFS, use_stemmer=stem)
        scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
        per_pair = [scorer.score(r, h) for h, r in zip(PLAY_HYPS, PLAY_REFS)]  # rouge-score takes (target, pred)
        for name in ("rouge1", "rouge2", "rougeL"):
            assert ours[name]["precision"] == pytest.approx(sum(s[name].precision for s in per_pair) / 5, abs=1e-12)
            assert ours[name]["recall"] == pytest.approx(sum(s[name].recall for s in per_pair) / 5, abs=1e-12)
            assert ours[name]["f1"] == pytest.approx(sum(s[name].fmeasure for s in per_pair) / 5, abs=1e-12)
