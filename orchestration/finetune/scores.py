"""Before/after metrics of a fine-tune, computed the same way on the pretrained and the tuned model.

Plain PyTorch on the driver (no Ray Train, no DeepSpeed), on the same validation rows as training:
- lm: next-token loss on the domain corpus's val split (``evaluate.lm.evaluate_lm``, read without Ray);
- sft: loss on response tokens only, and exact match of the greedy answer against the reference;
- classification: accuracy, macro-F1 and loss of the classifier; before tuning there is no head, so
  "before" is the pretrained LM scoring each label as a continuation (zero-shot), next to the majority
  class. Macro-F1 (each class's F1, averaged with equal weight) is what exposes a classifier that wins
  its accuracy on the frequent class alone: the majority class scores high accuracy, low macro-F1.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

ZERO_SHOT_TEMPLATE = "{text}\nThis passage is from a"


@torch.no_grad()
def sft_metrics(
    model,
    enc,
    tokens: np.ndarray,
    targets: np.ndarray,
    rows: list[dict],
    *,
    batch_size: int = 16,
    max_generate: int = 64,
    sample_prompts: int = 3,
) -> dict:
    """Response-token loss over all val rows; greedy exact match on ``max_generate`` rows spread over
    them (per row ``kind`` too, when rows carry one)."""
    from data_pipeline.task_data import spread
    from model.generate import generate

    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i : i + batch_size, :-1]).long()
        y = torch.from_numpy(targets[i : i + batch_size]).long()
        logits, _ = model(x)
        total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-1, reduction="sum"
            )
        )
        count += int((y != -1).sum())
    picked = spread(rows, max_generate)
    answer_len = max(len(enc.encode_ordinary(r["response"])) for r in picked) + 2 if picked else 0
    prompts = [enc.encode_ordinary(r["prompt"])[-(model.cfg.block_size - answer_len) :] for r in picked]
    answers = []
    for i in range(0, len(prompts), batch_size):  # batched rows decode exactly as they would alone
        for out in generate(model, prompts[i : i + batch_size], answer_len, temperature=0.0, eos_id=enc.eot_token):
            answers.append(enc.decode([t for t in out if t != enc.eot_token]))
    exact = [a.strip() == r["response"].strip() for a, r in zip(answers, picked)]
    by_kind: dict[str, list[bool]] = {}
    for hit, row in zip(exact, picked):
        by_kind.setdefault(row.get("kind", "all"), []).append(hit)
    loss = total / max(count, 1)
    return {
        "response_loss": loss,
        "response_perplexity": math.exp(min(loss, 50.0)),
        "response_tokens": count,
        "exact_match": float(np.mean(exact)) if exact else None,
        "exact_match_stderr": _stderr(exact),
        "generated": len(exact),
        "exact_match_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "samples": [
            {"prompt": r["prompt"][-160:], "reference": r["response"], "answer": a}
            for r, a in zip(picked[:sample_prompts], answers)
        ],
    }


@torch.no_grad()
def classifier_metrics(
    model, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray, label_names: list[str], *, batch_size: int = 32
) -> dict:
    """Accuracy (with standard error), macro-F1, mean loss and per-class accuracy and F1 of a GPTClassifier."""
    preds, loss_sum = [], 0.0
    for i in range(0, len(tokens), batch_size):
        logits, _ = model(
            torch.from_numpy(tokens[i : i + batch_size]).long(),
            lengths=torch.from_numpy(lengths[i : i + batch_size]).long(),
        )
        y = torch.from_numpy(labels[i : i + batch_size]).long()
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        preds.append(logits.argmax(-1).numpy())
    return classification_scores(np.concatenate(preds), labels, label_names) | {"loss": loss_sum / len(labels)}


@torch.no_grad()
def zero_shot_metrics(model, enc, rows: list[dict], label_names: list[str], *, max_len: int) -> dict:
    """The pretrained LM as a classifier: the label whose tokens are most likely after the template."""
    label_ids = [enc.encode_ordinary(f" {name}") for name in label_names]
    preds = []
    for row in rows:
        context = enc.encode_ordinary(ZERO_SHOT_TEMPLATE.format(text=row["text"]))
        scores = []
        for ids in label_ids:
            seq = (context + ids)[-max_len - 1 :]
            x = torch.tensor([seq[:-1]])
            logp = torch.log_softmax(model(x)[0][0].float(), dim=-1)
            positions = range(len(seq) - 1 - len(ids), len(seq) - 1)
            scores.append(sum(float(logp[p, t]) for p, t in zip(positions, ids)))
        preds.append(int(np.argmax(scores)))
    labels = np.array([label_names.index(r["label"]) for r in rows])
    return classification_scores(np.array(preds), labels, label_names) | {"template": ZERO_SHOT_TEMPLATE}


def majority_accuracy(train_rows: list[dict], val_rows: list[dict]) -> dict:
    """Accuracy and macro-F1 of always answering the train split's most frequent label."""
    label, _ = Counter(r["label"] for r in train_rows).most_common(1)[0]
    names = sorted({r["label"] for r in val_rows} | {label})
    labels = np.array([names.index(r["label"]) for r in val_rows])
    hits = [r["label"] == label for r in val_rows]
    return {
        "label": label,
        "accuracy": float(np.mean(hits)),
        "accuracy_stderr": _stderr(hits),
        "macro_f1": macro_f1(np.full(len(labels), names.index(label)), labels, len(names))[0],
    }


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, dict[int, float]]:
    """(macro-F1, {class: F1}) of predicted against true class ids: F1 = 2 TP / (2 TP + FP + FN) per
    class, averaged with equal weight over the classes that occur in either ``labels`` or ``preds``
    (scikit-learn's ``f1_score(average="macro")``); a class never true nor predicted has no F1."""
    per_class = {}
    for c in range(num_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        wrong = int((preds == c).sum()) + int((labels == c).sum()) - 2 * tp  # FP + FN
        if tp or wrong:
            per_class[c] = 2 * tp / (2 * tp + wrong)
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


def classification_scores(preds: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Accuracy (with standard error), macro-F1 and per-class accuracy and F1 of predicted class ids."""
    hits = (preds == labels).tolist()
    per_class = {name: float(np.mean(preds[labels == i] == i)) for i, name in enumerate(names) if (labels == i).any()}
    f1, f1_per_class = macro_f1(preds, labels, len(names))
    return {
        "accuracy": float(np.mean(hits)),
        "accuracy_stderr": _stderr(hits),
        "macro_f1": f1,
        "examples": len(hits),
        "per_class_accuracy": per_class,
        "per_class_f1": {names[c]: v for c, v in f1_per_class.items()},
    }


def _stderr(hits: list) -> float | None:
    if len(hits) < 2:
        return None
    p = float(np.mean(hits))
    return math.sqrt(p * (1 - p) / len(hits))
