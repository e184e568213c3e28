"""Text-overlap and compression metrics: corpus BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), bits per byte.

BLEU and ROUGE are the reference libraries' own scores, so a number here is comparable with any paper
or tool that names the same settings; each result carries them (sacrebleu's signature string, such as
``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``; rouge-score's types, stemmer and
tokenizer). Tokenization matters on play text: sacrebleu's 13a keeps "lord--he", "go--" and "I'll" as
single tokens (it splits off neither '-' nor "'"); rouge-score lowercases and splits on every
non-alphanumeric ("lord", "he"; "i", "ll").
Only bits per byte is our own (no library has it). Scales follow the libraries: BLEU in [0, 100],
ROUGE in [0, 1]. The libraries are imported on first use: rouge-score pulls in nltk (~2 s).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_TOKENIZER = "rouge-score default: lowercase, split on non-alphanumerics ([^a-z0-9]+)"


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """Bits per UTF-8 byte: summed token negative log-likelihood (nats) / (ln 2 * bytes those tokens decode to).

    Unlike per-token loss it does not depend on the tokenizer, so runs with different vocabularies compare.
    """
    if num_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {num_bytes}")
    return total_nll_nats / (math.log(2) * num_bytes)


def corpus_bleu(
    hypotheses: Sequence[str],
    references: Sequence[Union[str, Sequence[str]]],
    *,
    tokenize: str = "13a",
    smooth_method: str = "exp",
    lowercase: bool = False,
) -> dict:
    """sacrebleu's corpus BLEU of hypotheses against their references (one string, or a list of
    alternatives, per hypothesis) -> {"bleu" (0-100), "precisions" (0-100 per n-gram order),
    "brevity_penalty", "hyp_len", "ref_len", "signature"}.

    ``tokenize`` and ``smooth_method`` are sacrebleu's (defaults 13a and exp, its own defaults);
    ``signature`` names them and the sacrebleu version, so the score can be reproduced.
    """
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("corpus_bleu: every hypothesis needs at least one reference")
    # sacrebleu takes one stream per reference position; None marks a hypothesis with fewer alternatives
    width = max((len(r) for r in refs), default=1)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    metric = BLEU(tokenize=tokenize, smooth_method=smooth_method, lowercase=lowercase)
    score = metric.corpus_score(list(hypotheses), streams)
    return {
        "bleu": score.score,
        "precisions": list(score.precisions),
        "brevity_penalty": score.bp,
        "hyp_len": score.sys_len,
        "ref_len": score.ref_len,
        "signature": str(metric.get_signature()),
    }


def rouge_scores(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False) -> dict:
    """rouge-score's ROUGE-1/2/L of each prediction against its reference, averaged over the pairs ->
    {"rouge1": {"precision", "recall", "f1"}, "rouge2": ..., "rougeL": ..., "settings": {...}}.

    ``settings`` names the rouge types, the stemmer, the tokenizer and the rouge-score version: what moves ROUGE.
    """
    from importlib.metadata import version

    from rouge_score.rouge_scorer import RougeScorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"rouge_scores: need equal, non-zero counts ({len(predictions)} predictions, {len(references)} references)"
        )
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    per_pair = [scorer.score(r, p) for p, r in zip(predictions, references)]  # rouge-score takes (target, prediction)
    result: dict = {
        name: {
            "precision": sum(s[name].precision for s in per_pair) / len(per_pair),
            "recall": sum(s[name].recall for s in per_pair) / len(per_pair),
            "f1": sum(s[name].fmeasure for s in per_pair) / len(per_pair),
        }
        for name in ROUGE_TYPES
    }
    result["settings"] = {
        "types": list(ROUGE_TYPES),
        "use_stemmer": use_stemmer,
        "tokenizer": ROUGE_TOKENIZER,
        "version": version("rouge-score"),
    }
    return result
