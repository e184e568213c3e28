"""Eval suites on a checkpoint, beyond loss: `raylm eval --suite {lm,continuation,mc,bias,privacy,all}`.

  lm            loss, perplexity and bits per byte (``evaluate.evaluate_lm``)
  continuation  prompt with k held-out tokens, greedy-decode m, BLEU / ROUGE against the true m
  mc            zero-shot multiple choice built from held-out lines: pick a line's true next line
                among length-matched lines from elsewhere, by log-likelihood (sum and per byte)
  bias          stereotype vs anti-stereotype minimal pairs (configs/eval/bias_templates.yaml), scored on the
                tokens after the group term, with a bootstrap CI; a probe, not a certification
  privacy       canary exposure, membership inference and extraction of the text ``data.audit`` planted
                in the training split (``evaluate.privacy``); not part of "all": it needs planted text

Held-out text is a manifest's split (read straight from its shards, no Ray) or a text file. Every
suite accepts a checkpoint URI or the tuple ``load_checkpoint_model`` returned, so ``run_eval_suite``
loads the weights once.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Optional

import numpy as np
import tiktoken

from orchestration.evaluate.data_source import EvalError, manifest_rows, training_manifest
from orchestration.evaluate.lm import evaluate_lm
from orchestration.evaluate.load import loaded_checkpoint
from orchestration.evaluate.privacy import format_privacy, privacy_audit
from orchestration.evaluate.scoring import continuation_logprobs
from orchestration.evaluate.text_metrics import corpus_bleu, rouge_scores

DEFAULT_BIAS_TEMPLATES = Path(__file__).resolve().parents[2] / "configs" / "eval" / "bias_templates.yaml"
BIAS_METHOD = (
    "minimal pairs differing only in the group term; per item the log odds ratio "
    "[s(a,X) - s(b,X)] - [s(a,Y) - s(b,Y)] in nats, s = log-likelihood of the tokens after the group term "
    "(X stereotype, Y anti-stereotype completion; a stereotyped, b contrast group); mean with a bootstrap CI "
    "over items and group pairs"
)
BIAS_DISCLAIMER = (
    "A probe, not a certification: a few dozen hand-written English items (configs/eval/bias_templates.yaml) "
    "naming a few groups and the stereotypes their authors chose. It measures which pairing of group and "
    "completion the model's text likelihood prefers, not behaviour in use or harm. Scores share templates and "
    "group terms; the bootstrap resamples both, but with a handful of each its CI is rough. A CI that covers 0 "
    "does not show the model is unbiased, and scores compare only between models probed with the same file."
)


# ---------------------------------------------------------------- held-out text


def held_out_pieces(
    data: str,
    enc: tiktoken.Encoding,
    *,
    split: str = "val",
    max_sequences: int = 256,
    endpoint_url: Optional[str] = None,
) -> tuple[list[list[int]], bool]:
    """(token pieces, edges_cut) of held-out text: a manifest's ``split`` (its first ``max_sequences``
    rows, read from the shards) or a whole text file, split at end-of-text tokens.

    ``edges_cut`` is True for manifest rows, whose first and last lines were cut by the row boundary.
    """
    from data_pipeline.storage import read_bytes
    from data_pipeline.tokenizer import EOT

    eot = enc.encode_single_token(EOT)
    if data.endswith(".json"):
        rows, cut = manifest_rows(data, split, max_sequences, endpoint_url, enc=enc)[0].tolist(), True
    else:
        rows, cut = [enc.encode(read_bytes(data, endpoint_url).decode("utf-8"), allowed_special="all")], False
    pieces = []
    for row in rows:
        piece: list[int] = []
        for t in row:
            if t == eot:
                pieces.append(piece)
                piece = []
            else:
                piece.append(t)
        pieces.append(piece)
    return [p for p in pieces if p], cut


def held_out_lines(pieces: list[list[int]], enc: tiktoken.Encoding, edges_cut: bool) -> list[list[str]]:
    """Each piece's non-blank lines (right-stripped), in order; lines cut by a row boundary are dropped."""
    out = []
    for piece in pieces:
        lines = enc.decode(piece, errors="replace").split("\n")
        if edges_cut:
            lines = lines[1:-1]
        out.append([line.rstrip() for line in lines if line.strip()])
    return out


def _accuracy(correct: list[bool]) -> tuple[float, float]:
    """(accuracy, its standard error sqrt(p(1-p)/n))."""
    p = sum(correct) / len(correct)
    return p, math.sqrt(p * (1 - p) / len(correct))


# ---------------------------------------------------------------- continuation


def continuation_scores(
    checkpoint_uri,
    data: str,
    *,
    split: str = "val",
    num_items: int = 50,
    prompt_tokens: int = 32,
    continuation_tokens: int = 32,
    max_sequences: int = 256,
    batch_size: int = 8,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    """Greedy continuations of held-out text scored against the truth -> {"bleu" (sacrebleu, 0-100),
    "bleu_signature", "rouge1", "rouge2", "rougeL" (rouge-score F1, 0-1), "rouge_settings", "rouge"
    (precision/recall/F1), "items", "generations" (every prompt, reference and generated text), ...}.

    Items are non-overlapping windows of prompt_tokens + continuation_tokens tokens, spread evenly
    over the held-out pieces; a continuation that emits end-of-text stops there. BLEU and ROUGE are
    the libraries' with their default settings (``text_metrics``), named in the result so the
    scores can be reproduced from ``generations``.
    """
    from data_pipeline.tokenizer import EOT
    from model.generate import generate

    model, model_cfg, enc, meta = loaded_checkpoint(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    k, m = prompt_tokens, continuation_tokens
    if k < 1 or m < 1 or k + m > model_cfg.block_size + 1:
        raise EvalError(
            f"prompt_tokens={k} + continuation_tokens={m} must be >= 1 each and fit the "
            f"context (block_size + 1 = {model_cfg.block_size + 1})"
        )
    pieces, _ = held_out_pieces(data, enc, split=split, max_sequences=max_sequences, endpoint_url=endpoint_url)
    windows = [p[s : s + k + m] for p in pieces for s in range(0, len(p) - (k + m) + 1, k + m)]
    if not windows:
        raise EvalError(
            f"{data}: no held-out stretch of {k + m} tokens without an end-of-text; "
            "lower prompt_tokens / continuation_tokens"
        )
    picks = np.unique(np.linspace(0, len(windows) - 1, min(num_items, len(windows))).round().astype(int))
    windows = [windows[i] for i in picks]
    eot = enc.encode_single_token(EOT)
    hyps, refs = [], []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        new = generate(model, [w[:k] for w in batch], m, temperature=0.0, eos_id=eot)
        hyps += [enc.decode([t for t in n if t != eot], errors="replace") for n in new]
        refs += [enc.decode(w[k:], errors="replace") for w in batch]
    rouge = rouge_scores(hyps, refs)
    bleu = corpus_bleu(hyps, refs)
    return {
        "bleu": bleu["bleu"],
        "bleu_signature": bleu["signature"],
        "bleu_detail": bleu,
        "rouge1": rouge["rouge1"]["f1"],
        "rouge2": rouge["rouge2"]["f1"],
        "rougeL": rouge["rougeL"]["f1"],
        "rouge_settings": rouge["settings"],
        "rouge": rouge,
        "items": len(windows),
        "requested_items": num_items,
        "prompt_tokens": k,
        "continuation_tokens": m,
        "generations": [
            {"prompt": enc.decode(w[:k], errors="replace"), "reference": r, "generated": h}
            for w, r, h in zip(windows, refs, hyps)
        ],
        "checkpoint": meta["checkpoint_uri"],
    }


# ---------------------------------------------------------------- multiple choice


def cloze_items(
    lines: list[list[str]],
    *,
    num_items: int = 200,
    num_options: int = 4,
    seed: int = 0,
    context_lines: int = 1,
    min_chars: int = 10,
) -> list[dict]:
    """Items {"context", "options", "answer"} from consecutive held-out lines; deterministic in ``seed``.

    The answer is the line after the context; the distractors are drawn (seeded) from the lines
    closest to it in byte length, outside the item's neighbourhood (+-2 lines) and different in text.
    Options are shuffled, so the answer's position varies. Lines shorter than ``min_chars`` are not used.
    """
    if num_options < 2:
        raise EvalError(f"num_options={num_options}: a multiple-choice item needs at least 2 options")
    flat = [(p, i, line) for p, piece in enumerate(lines) for i, line in enumerate(piece)]
    usable = [len(line) >= min_chars for _, _, line in flat]
    starts = [
        j
        for j in range(len(flat) - context_lines)
        if flat[j][0] == flat[j + context_lines][0] and all(usable[j : j + context_lines + 1])
    ]
    pool = np.array([j for j in range(len(flat)) if usable[j]])
    if len(starts) == 0 or len(pool) < 4 * num_options:
        raise EvalError(
            f"held-out text has {len(starts)} usable line pairs and {len(pool)} usable lines "
            f"(>= {min_chars} chars); too few for {num_options}-option items: use more held-out text"
        )
    pool_len = np.array([len(flat[j][2].encode()) for j in pool])
    pool_piece = np.array([flat[j][0] for j in pool])
    rng = np.random.default_rng(seed)
    items = []
    for j in rng.choice(starts, size=min(num_items, len(starts)), replace=False):
        a = j + context_lines
        context = [flat[x][2] for x in range(j, a)]
        answer = flat[a][2]
        far = (pool_piece != flat[a][0]) | (np.abs(pool - a) > 2)
        nearest = np.argsort(np.abs(pool_len - len(answer.encode())) + np.where(far, 0, 10**9), kind="stable")
        candidates: list[str] = []
        for x in nearest:  # distinct texts, nearest in length first
            text = flat[pool[x]][2]
            if far[x] and text != answer and text not in context and text not in candidates:
                candidates.append(text)
            if len(candidates) == 4 * (num_options - 1):
                break
        distractors = [candidates[x] for x in rng.choice(len(candidates), num_options - 1, replace=False)]
        order = rng.permutation(num_options)
        options = [([answer] + distractors)[x] for x in order]
        items.append({"context": context, "options": options, "answer": int(np.flatnonzero(order == 0)[0])})
    return items


def score_choices(items: list[dict], option_logprobs: list[list[float]]) -> dict:
    """Accuracy of per-option log-likelihoods (nats; [item][option]) -> {"accuracy", "stderr",
    "accuracy_norm", "stderr_norm", "chance", "items"}; ``_norm`` divides by each option's UTF-8 bytes."""
    correct, correct_norm = [], []
    for item, logps in zip(items, option_logprobs, strict=True):
        per_byte = [lp / max(len(o.encode()), 1) for lp, o in zip(logps, item["options"])]
        correct.append(int(np.argmax(logps)) == item["answer"])
        correct_norm.append(int(np.argmax(per_byte)) == item["answer"])
    acc, se = _accuracy(correct)
    acc_norm, se_norm = _accuracy(correct_norm)
    return {
        "accuracy": acc,
        "stderr": se,
        "accuracy_norm": acc_norm,
        "stderr_norm": se_norm,
        "chance": float(np.mean([1 / len(i["options"]) for i in items])),
        "items": len(items),
    }


def multiple_choice_suite(
    checkpoint_uri,
    data: str,
    *,
    split: str = "val",
    num_items: int = 200,
    num_options: int = 4,
    seed: int = 0,
    context_lines: int = 1,
    max_sequences: int = 256,
    batch_size: int = 16,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    """Zero-shot cloze of held-out lines (see ``cloze_items``), each option scored by summed
    log-likelihood given the context -> ``score_choices``'s result plus "examples" and settings."""
    model, _, enc, meta = loaded_checkpoint(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    pieces, cut = held_out_pieces(data, enc, split=split, max_sequences=max_sequences, endpoint_url=endpoint_url)
    items = cloze_items(
        held_out_lines(pieces, enc, cut),
        num_items=num_items,
        num_options=num_options,
        seed=seed,
        context_lines=context_lines,
    )
    pairs = [(enc.encode("\n".join(it["context"]) + "\n"), enc.encode(opt)) for it in items for opt in it["options"]]
    flat = continuation_logprobs(model, pairs, batch_size=batch_size)
    logps = [flat[i * num_options : (i + 1) * num_options] for i in range(len(items))]
    examples = [{**it, "logprobs": lp} for it, lp in zip(items[:3], logps)]
    return {
        **score_choices(items, logps),
        "requested_items": num_items,
        "num_options": num_options,
        "seed": seed,
        "examples": examples,
        "checkpoint": meta["checkpoint_uri"],
    }


# ---------------------------------------------------------------- bias probe


def load_bias_templates(path=None) -> dict:
    """{category: {"sides": [stereotyped, contrast], "groups": [[stereotyped term, contrast term], ...],
    "items": [{"template", "stereotype", "anti_stereotype"}, ...]}} from YAML, checked: each template
    has one ``{group}`` slot followed by one ``{attribute}`` slot (a causal model can only let the
    group term change what comes after it), every group pair two different terms, every item two
    different completions."""
    import yaml

    path = Path(path or DEFAULT_BIAS_TEMPLATES)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise EvalError(f"bias templates {path}: cannot read them ({err}); pass --templates FILE.yaml") from err
    cats = tree.get("categories") if isinstance(tree, dict) else None
    if not isinstance(cats, dict) or not cats:
        raise EvalError(f"{path}: expected a top-level 'categories' mapping of category -> sides/groups/items")
    for name, cat in cats.items():
        where = f"{path}: categories.{name}"
        if not isinstance(cat, dict) or {"sides", "groups", "items"} - set(cat):
            raise EvalError(f"{where}: needs keys sides, groups, items (see {DEFAULT_BIAS_TEMPLATES.name})")
        if len(cat["sides"]) != 2 or not cat["groups"] or not cat["items"]:
            raise EvalError(f"{where}: needs two sides and at least one group pair and one item")
        bad_groups = [g for g in cat["groups"] if len(g) != 2 or not all(g) or g[0] == g[1]]
        if bad_groups:
            raise EvalError(f"{where}.groups: each needs two different, non-empty terms; bad: {bad_groups}")
        for i, item in enumerate(cat["items"]):
            t = item.get("template", "") if isinstance(item, dict) else ""
            if t.count("{group}") != 1 or t.count("{attribute}") != 1 or t.index("{group}") > t.index("{attribute}"):
                raise EvalError(
                    f"{where}.items[{i}].template: needs exactly one {{group}} slot followed by one "
                    f"{{attribute}} slot; got {t!r}"
                )
            x, y = item.get("stereotype"), item.get("anti_stereotype")
            if not x or not y or x == y:
                raise EvalError(f"{where}.items[{i}]: needs two different completions, stereotype and anti_stereotype")
    return cats


def bias_pair_tokens(enc: tiktoken.Encoding, template: str, group: str, attribute: str) -> tuple[list[int], list[int]]:
    """(context, scored) token ids of ``template`` filled with ``group`` and ``attribute``: the context
    ends with the group term, the scored part is everything after it.

    The space before ``{group}`` goes with the term (" English", as GPT-style pre-tokenizers split
    words) and each part is encoded on its own, so the scored tokens are identical for every group
    term and only what they are conditioned on differs.
    """
    from data_pipeline.tokenizer import EOT

    before, after = template.replace("{attribute}", attribute).split("{group}")
    head = before.rstrip()
    context = [enc.encode_single_token(EOT)] + enc.encode(head) + enc.encode(before[len(head) :] + group)
    return context, enc.encode(after)


def bootstrap_grid_mean(grids: list, *, seed: int, resamples: int = 2000, confidence: float = 0.95) -> dict:
    """Mean over every cell of item x group-pair score grids (one per category) with a percentile
    bootstrap CI -> {"n", "mean", "std", "ci": [low, high], "excludes_zero", "positive" (fraction > 0)}.

    Each resample draws a grid's items and, independently, its group pairs with replacement (a
    two-way bootstrap for a crossed design): cells that share a template or a group term are not
    independent, and resampling single cells would give a CI far too narrow for a statement about
    templates and groups in general. Drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    grids = [np.asarray(g, dtype=np.float64) for g in grids]
    cells = np.concatenate([g.ravel() for g in grids])
    sums = np.zeros(resamples)
    for g in grids:
        rows = rng.integers(0, g.shape[0], size=(resamples, g.shape[0]))
        cols = rng.integers(0, g.shape[1], size=(resamples, g.shape[1]))
        sums += g[rows[:, :, None], cols[:, None, :]].sum(axis=(1, 2))
    low, high = np.quantile(sums / len(cells), [(1 - confidence) / 2, (1 + confidence) / 2])
    return {
        "n": len(cells),
        "mean": float(cells.mean()),
        "std": float(cells.std()),
        "ci": [float(low), float(high)],
        "excludes_zero": bool(low > 0 or high < 0),
        "positive": float((cells > 0).mean()),
    }


def bias_probe(
    checkpoint_uri,
    *,
    templates_path=None,
    seed: int = 0,
    batch_size: int = 16,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    """Stereotype association of minimal pairs (CrowS-Pairs style) -> {"probe", "disclaimer", "overall"
    and per "categories" (``bootstrap_grid_mean`` of the scores, nats), "largest" (the 5 biggest
    |scores|), "bootstrap" (its settings), ...}.

    A score is one item (a template and two completions: the stereotype X and the anti-stereotype Y)
    with one group pair (stereotyped term a, contrast term b). s(g, c) = log P(every token after the
    group term | the text up to and including g) with completion c: the pseudo-log-likelihood of the
    unmodified tokens, as CrowS-Pairs scores masked LMs, here for a causal LM. The tokens before the
    term are shared and scored alike, and the term's own tokens are never scored, so a term of 4
    tokens is not penalised against one of 1 (the failure of comparing whole-sentence likelihoods).
    The score is the log odds ratio

        [s(a, X) - s(b, X)] - [s(a, Y) - s(b, Y)]

    the CrowS-Pairs stereotype pair plus its anti-stereotype pair: how much more the model pairs the
    stereotype with a than with b, beyond how much a term shifts any continuation (a rare term that
    lowers everything after it cancels). Positive: the stereotype is the likelier pairing. Summed, not
    length-normalized: each difference is over the same tokens, and the sum is a log likelihood ratio.
    """
    model, _, enc, meta = loaded_checkpoint(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    return {
        **bias_scores(model, enc, templates_path=templates_path, seed=seed, batch_size=batch_size),
        "checkpoint": meta["checkpoint_uri"],
    }


def bias_pairs(enc: tiktoken.Encoding, cats: dict) -> tuple[list[tuple], list[tuple[list[int], list[int]]]]:
    """(rows: (category, item, term a, term b), the (context, continuation) token pairs the probe scores:
    per row, stereotype then anti-stereotype, each after term a then term b)."""
    rows = [(name, item, a, b) for name, cat in cats.items() for item in cat["items"] for a, b in cat["groups"]]
    pairs = [
        bias_pair_tokens(enc, item["template"], g, item[c])
        for _, item, a, b in rows
        for c in ("stereotype", "anti_stereotype")
        for g in (a, b)
    ]
    return rows, pairs


def bias_scores(model, enc: tiktoken.Encoding, *, templates_path=None, seed: int = 0, batch_size: int = 16) -> dict:
    """``bias_probe``'s result for a model in memory (a checkpoint's, or one in training: every rank of a
    ZeRO-3 run calls it with the same inputs, its forwards being collective)."""
    path = templates_path or DEFAULT_BIAS_TEMPLATES
    cats = load_bias_templates(path)
    rows, pairs = bias_pairs(enc, cats)
    s = np.array(continuation_logprobs(model, pairs, batch_size=batch_size)).reshape(len(rows), 2, 2)
    scores = (s[:, 0, 0] - s[:, 0, 1]) - (s[:, 1, 0] - s[:, 1, 1])
    grids, start = {}, 0
    for name, cat in cats.items():  # rows run item-major within a category: one grid row per item
        size = len(cat["items"]) * len(cat["groups"])
        grids[name] = scores[start : start + size].reshape(len(cat["items"]), len(cat["groups"]))
        start += size
    boot = {"seed": seed, "resamples": 2000, "confidence": 0.95}
    largest = np.argsort(-np.abs(scores), kind="stable")[:5]
    return {
        "probe": BIAS_METHOD,
        "disclaimer": BIAS_DISCLAIMER,
        "templates_path": str(path),
        "overall": bootstrap_grid_mean(list(grids.values()), **boot),
        "categories": {
            name: {"sides": list(cats[name]["sides"]), **bootstrap_grid_mean([g], **boot)} for name, g in grids.items()
        },
        "largest": [
            {
                "category": rows[i][0],
                "groups": [rows[i][2], rows[i][3]],
                "stereotype": rows[i][1]["template"].replace("{attribute}", rows[i][1]["stereotype"]),
                "anti_stereotype": rows[i][1]["template"].replace("{attribute}", rows[i][1]["anti_stereotype"]),
                "score": float(scores[i]),
            }
            for i in largest
        ],
        "bootstrap": {**boot, "resampled": "items and group pairs, independently, within each category"},
    }


# ---------------------------------------------------------------- CLI entry

SUITES = {
    "lm": evaluate_lm,
    "continuation": continuation_scores,
    "mc": multiple_choice_suite,
    "bias": bias_probe,
    "privacy": privacy_audit,
}
ALL_SUITES = ("lm", "continuation", "mc", "bias")  # privacy needs a manifest with planted text: by name only


def run_eval_suite(suite: str, checkpoint_uri, data: Optional[str] = None, **options) -> dict:
    """Run one suite or "all" (lm, continuation, mc, bias; privacy by name) on one loaded checkpoint ->
    {"checkpoint", "step", "data": {"uri", "split", "origin"} (None for bias alone), "suites": {name: result}}.

    ``data`` None: the suites that score held-out text read the split (default val) of the manifest
    the checkpoint was trained on (``data_source.training_manifest``). ``options`` are the suites'
    keyword arguments (split, num_items, seed, device, ...); each suite gets those it takes, and an
    option no chosen suite takes is an error.
    """
    names = list(ALL_SUITES) if suite == "all" else [suite]
    if any(n not in SUITES for n in names):
        raise EvalError(f"unknown eval suite {suite!r}; choose one of {sorted(SUITES) + ['all']}")
    accepted = {n: set(inspect.signature(SUITES[n]).parameters) - {"checkpoint_uri", "data"} for n in names}
    unused = set(options) - set().union(*accepted.values())
    if unused:
        raise EvalError(
            f"options {sorted(unused)} are not taken by suite {suite!r}; "
            f"it takes {sorted(set().union(*accepted.values()))}"
        )
    scores_text = any(n != "bias" for n in names)
    if data is not None and not scores_text:
        raise EvalError(f"suite {suite!r} scores its templates, not held-out data: drop --data")
    if data is not None and "split" in options and not data.endswith(".json"):
        raise EvalError(f"split={options['split']!r} picks a manifest's split; {data} is a text file, read whole")
    loaded = loaded_checkpoint(
        checkpoint_uri, endpoint_url=options.get("endpoint_url"), device=options.get("device", "cpu")
    )
    source = None
    if scores_text:
        origin = "given"
        if data is None:
            own = training_manifest(loaded[3], options.get("endpoint_url"))
            data, origin = own.uri, own.origin
            print(f"[raylm] no --data: scoring {own.uri} ({origin})", flush=True)
        # a text file is read whole; the privacy suite reads what the manifest planted, not a split
        split = options.get("split", "val") if data.endswith(".json") and suite != "privacy" else None
        source = {"uri": data, "split": split, "origin": origin}
    results = {}
    for n in names:
        kwargs = {k: v for k, v in options.items() if k in accepted[n]}
        results[n] = SUITES[n](loaded, **kwargs) if n == "bias" else SUITES[n](loaded, data, **kwargs)
    return {"checkpoint": loaded[3]["checkpoint_uri"], "step": loaded[3].get("step"), "data": source, "suites": results}


def format_summary(result: dict) -> str:
    """A few printable lines for ``run_eval_suite``'s result."""
    lines = [f"checkpoint {result['checkpoint']} (step {result.get('step')})"]
    data = result.get("data")
    if data:
        split = f", {data['split']} split" if data["split"] else ""
        lines.append(f"data       {data['uri']}{split}" + (f" ({data['origin']})" if data["origin"] != "given" else ""))
    s = result["suites"]
    if "lm" in s:
        r = s["lm"]
        lines.append(
            f"lm            loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}  bits/byte "
            f"{r['bits_per_byte']:.4f}  ({r['tokens']:,} tokens, {r['bytes']:,} bytes)"
        )
    if "continuation" in s:
        r = s["continuation"]
        rs = r["rouge_settings"]
        lines.append(
            f"continuation  BLEU {r['bleu']:.2f}  ROUGE-1 {r['rouge1']:.3f}  ROUGE-2 {r['rouge2']:.3f}  "
            f"ROUGE-L {r['rougeL']:.3f}  ({r['items']} items, {r['prompt_tokens']} -> "
            f"{r['continuation_tokens']} tokens, greedy)"
        )
        lines.append(f"  BLEU: sacrebleu {r['bleu_signature']}")
        lines.append(
            f"  ROUGE: rouge-score {rs['version']} {'/'.join(rs['types'])} F1, "
            f"stemmer {'on' if rs['use_stemmer'] else 'off'}, tokenizer: {rs['tokenizer']}"
        )
    if "mc" in s:
        r = s["mc"]
        lines.append(
            f"mc            accuracy {r['accuracy']:.3f} ± {r['stderr']:.3f}  per-byte {r['accuracy_norm']:.3f} "
            f"± {r['stderr_norm']:.3f}  chance {r['chance']:.3f}  ({r['items']} items)"
        )
    if "bias" in s:
        r = s["bias"]
        o, b = r["overall"], r["bootstrap"]
        lines.append(
            f"bias probe    {o['n']} items, stereotype log odds ratio mean {o['mean']:+.3f} nats, "
            f"{b['confidence']:.0%} CI [{o['ci'][0]:+.3f}, {o['ci'][1]:+.3f}] "
            f"({'excludes' if o['excludes_zero'] else 'covers'} 0; bootstrap seed {b['seed']}); "
            f"stereotype likelier in {o['positive']:.0%}"
        )
        for name, c in r["categories"].items():
            lines.append(
                f"  {name:<12}{c['sides'][0]} vs {c['sides'][1]}: mean {c['mean']:+.3f}  CI "
                f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]  ({c['n']} items, stereotype likelier in {c['positive']:.0%})"
            )
        lines.append(f"  method: {r['probe']}")
        lines.append(f"  NOTE: {r['disclaimer']}")
    if "privacy" in s:
        lines.extend(format_privacy(s["privacy"]))
    return "\n".join(lines)
