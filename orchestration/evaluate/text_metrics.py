"""Text-overlap and compression metrics: corpus BLEU, ROUGE-N / ROUGE-L, bits per byte. Pure Python.

BLEU follows sacrebleu's ``corpus_bleu`` (Papineni et al. 2002; smoothing from Chen & Cherry 2014)
and ROUGE follows Google's ``rouge-score`` (Lin 2004, no stemming); the tests pin both against those
libraries. They are written out here rather than imported because the eval suites only need these
~100 lines, and the libraries would bring lxml, nltk and absl as runtime dependencies.
Scales follow the libraries: BLEU in [0, 100], ROUGE in [0, 1].
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence, Union

_BLEU_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['-]\w+)*|[^\w\s]")  # numbers, words (inner ' -), punctuation
_ROUGE_SPLIT_RE = re.compile(r"[^a-z0-9]+")  # rouge-score's tokenizer: lowercase alphanumeric runs
BLEU_SMOOTHING = ("exp", "floor", "none")


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Bits per UTF-8 byte: summed token negative log-likelihood (nats) / (ln 2 * bytes those tokens decode to).

    Unlike per-token loss it does not depend on the tokenizer, so runs with different vocabularies compare.
    """
    if num_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {num_bytes}")
    return total_nll_nats / (math.log(2) * num_bytes)


def bleu_tokenize(text: str) -> list[str]:
    """Words and punctuation marks (close to sacrebleu's 13a tokenizer; case-sensitive)."""
    return _BLEU_TOKEN_RE.findall(text)


def rouge_tokenize(text: str) -> list[str]:
    """rouge-score's default tokenization: lowercase, non-alphanumerics are separators."""
    return [t for t in _ROUGE_SPLIT_RE.split(text.lower()) if t]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[Union[str, Sequence[str]]],
    *,
    max_order: int = 4,
    smooth: str = "exp",
    smooth_value: float = 0.1,
    tokenize: bool = True,
) -> dict:
    """Corpus BLEU of hypotheses against their references (one string, or a list of alternatives, per
    hypothesis) -> {"bleu" (0-100), "precisions" (0-100 per n-gram order), "brevity_penalty",
    "hyp_len", "ref_len"}.

    n-gram counts are clipped by the most any one reference holds and summed over the corpus before
    the geometric mean; ref_len adds each hypothesis' closest reference length (the shorter on a tie);
    the brevity penalty is exp(1 - ref_len / hyp_len) when the hypotheses are shorter. ``smooth``: "exp" (sacrebleu's
    default; each zero-match order gets 1 / (2^k * total)), "floor" (zero matches count as
    ``smooth_value``) or "none". ``tokenize=False`` splits on whitespace only (pre-tokenized text).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if smooth not in BLEU_SMOOTHING:
        raise ValueError(f"corpus_bleu: smooth={smooth!r}; allowed: {BLEU_SMOOTHING}")
    split = bleu_tokenize if tokenize else str.split
    correct, total = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h = split(hyp)
        rs = [split(r) for r in ([refs] if isinstance(refs, str) else refs)]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_order + 1):
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)  # | keeps the max count over references
            correct[n - 1] += sum((_ngrams(h, n) & max_ref).values())  # & keeps the min: clipping
            total[n - 1] += max(len(h) - n + 1, 0)
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    precisions = [0.0] * max_order
    result = {"bleu": 0.0, "precisions": precisions, "brevity_penalty": bp, "hyp_len": hyp_len, "ref_len": ref_len}
    if not any(correct):
        return result
    smooth_exp = 1.0
    for n in range(max_order):
        if total[n] == 0:
            break  # hypotheses too short for this order: it stays at precision 0, as in sacrebleu
        if correct[n]:
            precisions[n] = 100.0 * correct[n] / total[n]
        elif smooth == "exp":
            smooth_exp *= 2
            precisions[n] = 100.0 / (smooth_exp * total[n])
        elif smooth == "floor":
            precisions[n] = 100.0 * smooth_value / total[n]
    if min(precisions) <= 0:
        return result
    result["bleu"] = bp * math.exp(sum(math.log(p) for p in precisions) / max_order)
    return result


def _prf(overlap: int, pred_count: int, ref_count: int) -> dict:
    precision = overlap / pred_count if pred_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def rouge_n(prediction: str, reference: str, n: int) -> dict:
    """ROUGE-N of one prediction: {"precision", "recall", "f1"} of clipped n-gram overlap."""
    p, r = _ngrams(rouge_tokenize(prediction), n), _ngrams(rouge_tokenize(reference), n)
    return _prf(sum((p & r).values()), sum(p.values()), sum(r.values()))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> dict:
    """ROUGE-L of one prediction: {"precision", "recall", "f1"} from the longest common subsequence."""
    p, r = rouge_tokenize(prediction), rouge_tokenize(reference)
    return _prf(_lcs_length(p, r), len(p), len(r))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """ROUGE-1/2/L averaged over prediction-reference pairs -> {"rouge1": {"precision", "recall", "f1"}, ...}."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"rouge_scores: need equal, non-zero counts ({len(predictions)} predictions, {len(references)} references)"
        )
    per_pair = [
        {"rouge1": rouge_n(p, r, 1), "rouge2": rouge_n(p, r, 2), "rougeL": rouge_l(p, r)}
        for p, r in zip(predictions, references)
    ]
    return {
        name: {k: sum(s[name][k] for s in per_pair) / len(per_pair) for k in ("precision", "recall", "f1")}
        for name in ("rouge1", "rouge2", "rougeL")
    }
