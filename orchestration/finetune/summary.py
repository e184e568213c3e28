"""The fine-tune summary: before/after metrics of the same val rows, laid out once.

``summary_blocks`` is the only place the comparison is laid out (report blocks: text and tables);
``finetune.md`` and the run's report both render those blocks. A distillation adds its teacher's
column (and a fresh student has no "before").
"""

from __future__ import annotations

from typing import Optional


def headline(task: str, metrics: Optional[dict], tuned: bool) -> dict[str, Optional[float]]:
    """The comparable numbers of one side of a before/after table (none for a side never scored)."""
    if metrics is None:
        return {}
    if task in ("lm", "distill"):
        return {"val loss": metrics["loss"], "perplexity": metrics["perplexity"]}
    if task == "sft":
        kinds = metrics.get("exact_match_by_kind", {})
        return {
            "response loss": metrics["response_loss"],
            "exact match": metrics["exact_match"],
            **({f"exact match: {k}": v for k, v in kinds.items()} if len(kinds) > 1 else {}),
        }
    # .get: summaries written before macro-F1 was scored show "-" there
    if tuned:
        return {"accuracy": metrics["accuracy"], "macro-F1": metrics.get("macro_f1"), "loss": metrics["loss"]}
    zero_shot, majority = metrics["zero_shot"], metrics["majority_class"]
    return {
        "accuracy": zero_shot["accuracy"],
        "macro-F1": zero_shot.get("macro_f1"),
        "majority-class accuracy": majority["accuracy"],
        "majority-class macro-F1": majority.get("macro_f1"),
    }


def summary_blocks(summary: dict) -> list[tuple]:
    """Report blocks of a fine-tune: what ran, the before/after table, and for SFT the answers."""
    task = summary["task"]
    sides = {"before": headline(task, summary["before"], False), "after": headline(task, summary["after"], True)}
    started = f"base {summary['base_checkpoint']}"
    if "distill" in summary:
        d = summary["distill"]
        sides = {"teacher": headline(task, summary["teacher"], False), **sides}
        started = (
            f"teacher {d['teacher']} ({d['teacher_params']:,} parameters, frozen), temperature {d['temperature']}, "
            f"alpha {d['alpha']}; student of {d['student_params']:,} parameters from "
            + (summary["base_checkpoint"] or "a fresh init (train.seed)")
        )
    metrics = dict.fromkeys(k for side in sides.values() for k in side)
    blocks: list[tuple] = [
        (
            "text",
            f"Task {task}, mode {summary['mode']}, {summary['trainable_params']:,} trainable parameters; "
            f"{started}; best checkpoint {summary['best_checkpoint']} (step "
            f"{summary['best_step']} of {summary['total_steps']}"
            + (", stopped early on val loss" if summary["stopped_early"] else "")
            + ").",
        ),
        ("table", ("metric", *sides), [(k, *(_fmt(side.get(k)) for side in sides.values())) for k in metrics]),
    ]
    if task == "classification":
        blocks.append(
            (
                "text",
                "Before there is no classification head: the pretrained LM scores each label as a continuation "
                f"of {summary['before']['zero_shot']['template']!r} (zero-shot); the majority class "
                f"({summary['before']['majority_class']['label']!r}) is the floor a classifier must beat. Macro-F1 "
                "averages each class's F1 with equal weight, so a model that only answers the frequent class scores "
                "its accuracy but not its macro-F1.",
            )
        )
    if task == "sft" and summary["after"].get("samples"):
        blocks.append(
            (
                "table",
                ("prompt (end)", "reference", "before", "after"),
                [
                    (a["prompt"][-80:], a["reference"], b["answer"], a["answer"])
                    for b, a in zip(summary["before"]["samples"], summary["after"]["samples"])
                ],
            )
        )
    return blocks


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"
