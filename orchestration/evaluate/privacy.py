"""`raylm eval --suite privacy`: how much of the text ``data.audit`` planted in the training split the
model memorised (``data_pipeline.plant`` plants it; its record names every item).

  exposure     per canary, log2|R| - log2 rank of its secret among all |R| = 10^digits secrets ranked by
               log P(secret | template text) (Carlini et al. 2019, "The Secret Sharer"). Every candidate is
               scored: no sampling, no extrapolation. Never-planted canaries are the control: a model that
               knows nothing of them ranks them uniformly, and E[exposure] = 1/ln 2 = 1.44 bits.
  membership   ROC AUC of planted member passages vs never-planted ones built the same way, per copy
               count, scored by loss and by Min-K% Prob (Shi et al. 2024: the mean of the lowest k% token
               log-probs), with a bootstrap CI over passages.
  extraction   greedy continuation of each passage's first ``prompt_tokens``: the rate at which the next
               ``continuation_tokens`` come out exactly, per copy count; non-members give the rate of a
               correct guess without having seen the passage.

Every passage and canary copy opens a document, so each is scored after the end-of-text token, as
training saw most copies: packing cuts a few at row boundaries, and ``copies_kept`` counts the copies
dedup kept, not those a shard's dropped tail lost. Results go to the eval JSON and, through `raylm eval`,
to the run directory's privacy_audit.json and report.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Optional

import numpy as np
import tiktoken

from orchestration.evaluate.data_source import EvalError, check_tokenizer
from orchestration.evaluate.load import loaded_checkpoint
from orchestration.evaluate.scoring import continuation_token_logprobs

MIN_K_FRACTION = 0.2  # Shi et al.'s k = 20%


def load_audit(manifest_uri: str, endpoint_url: Optional[str] = None) -> tuple[dict, dict]:
    """(the manifest, its audit record); EvalError when it planted nothing or the record was altered."""
    from data_pipeline.manifest import manifest_dir, read_manifest
    from data_pipeline.storage import join, read_bytes

    if not manifest_uri.endswith(".json"):
        raise EvalError(f"the privacy suite reads the planted text a manifest names; {manifest_uri} is a text file")
    manifest = read_manifest(manifest_uri, endpoint_url)
    entry = manifest.get("audit")
    if not entry:
        raise EvalError(
            f"{manifest['uri']} planted no audit text; prepare the data with data.audit.enabled=true, train on "
            "it, then run the privacy suite on that checkpoint"
        )
    uri = join(manifest_dir(manifest["uri"]), entry["file"])
    data = read_bytes(uri, endpoint_url)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise EvalError(f"{uri} does not match the sha256 in {manifest['uri']}; prepare the data again")
    return manifest, json.loads(data)


# ---------------------------------------------------------------- exposure


def candidate_logprobs(
    model, enc: tiktoken.Encoding, template: str, digits: int, eot: int, *, batch_size: int = 512
) -> np.ndarray:
    """log P(template prefix + s | end-of-text, the prefix's shared tokens) in nats for every secret s in
    0 .. 10^digits - 1, indexed by s. Each candidate is tokenized whole, as training tokenized the canary;
    what all candidates share is the context, the rest is scored."""
    prefix = template.split("{secret}")[0]
    tokens = enc.encode_ordinary_batch([prefix + f"{s:0{digits}d}" for s in range(10**digits)])
    first = tokens[0]
    shared = min(len(first), *(len(t) for t in tokens))
    for t in tokens:
        while t[:shared] != first[:shared]:
            shared -= 1
    context = [eot, *first[:shared]]
    pairs = [(context, t[shared:]) for t in tokens]
    return np.array([float(t.sum()) for t in continuation_token_logprobs(model, pairs, batch_size=batch_size)])


def exposures(logprobs: np.ndarray, secrets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(rank, exposure in bits) of each secret: 1 + the candidates the model finds likelier + half the
    others it ties with (the mid-rank: a model that scores every candidate alike gives ~1 bit, not the most)."""
    ordered = np.sort(logprobs)
    above = len(ordered) - np.searchsorted(ordered, logprobs[secrets], side="right")
    ties = np.searchsorted(ordered, logprobs[secrets], side="right") - np.searchsorted(ordered, logprobs[secrets])
    ranks = 1 + above + (ties - 1) / 2
    return ranks, math.log2(len(logprobs)) - np.log2(ranks)


def exposure_falls(groups: list[dict]) -> list[list[int]]:
    """The (fewer, more) copy counts whose mean exposure is lower at more copies by over two standard
    errors of the difference. Below what a model memorises, groups sit at chance (per canary exposure
    has a standard deviation of ~1.44 bits) and their means differ by noise; that is not a fall."""
    falls = []
    for a, b in zip(groups, groups[1:]):
        spread = 2 * math.hypot(a["stderr"] or 0.0, b["stderr"] or 0.0)
        if b["mean"] < a["mean"] - spread:
            falls.append([a["repetitions"], b["repetitions"]])
    return falls


def _exposure_section(model, enc, record: dict, eot: int, batch_size: int) -> dict:
    digits, canaries = record["canary_digits"], record["canaries"]
    logprobs = candidate_logprobs(model, enc, record["canary_template"], digits, eot, batch_size=batch_size)
    ranks, bits = exposures(logprobs, [int(c["secret"]) for c in canaries])
    groups = []
    for r in sorted({c["repetitions"] for c in canaries}):
        idx = [i for i, c in enumerate(canaries) if c["repetitions"] == r]
        groups.append(
            {
                "repetitions": r,
                "canaries": len(idx),
                "copies_kept": float(np.mean([canaries[i].get("copies_kept", 0) for i in idx])),
                "mean": float(bits[idx].mean()),
                "stderr": float(bits[idx].std(ddof=1) / math.sqrt(len(idx))) if len(idx) > 1 else None,
                "median": float(np.median(bits[idx])),
                "min": float(bits[idx].min()),
                "max": float(bits[idx].max()),
            }
        )
    return {
        "template": record["canary_template"],
        "candidates": len(logprobs),
        "max_bits": math.log2(len(logprobs)),
        "by_repetitions": groups,
        "never_planted_mean": groups[0]["mean"] if groups[0]["repetitions"] == 0 else None,
        "falls": exposure_falls(groups),
        "canaries": [
            {**c, "log_prob": float(logprobs[int(c["secret"])]), "rank": float(k), "exposure": float(e)}
            for c, k, e in zip(canaries, ranks, bits)
            if c["repetitions"] > 0
        ],
    }


# ---------------------------------------------------------------- membership inference


def roc_auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member scores above a non-member), ties counted half (the Mann-Whitney U statistic)."""
    diff = np.asarray(members, np.float64)[:, None] - np.asarray(others, np.float64)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def bootstrap_auc(members, others, *, seed: int, resamples: int = 1000, confidence: float = 0.95) -> dict:
    """{"auc", "ci"}: the AUC and its percentile bootstrap CI, members and non-members resampled apart."""
    members, others = np.asarray(members, np.float64), np.asarray(others, np.float64)
    rng = np.random.default_rng(seed)
    draws = [
        roc_auc(members[rng.integers(0, len(members), len(members))], others[rng.integers(0, len(others), len(others))])
        for _ in range(resamples)
    ]
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"auc": roc_auc(members, others), "ci": [float(low), float(high)]}


def min_k_prob(token_logprobs: np.ndarray, fraction: float = MIN_K_FRACTION) -> float:
    """The mean of the lowest ``fraction`` of a text's token log-probs (at least one token)."""
    k = max(1, math.ceil(fraction * len(token_logprobs)))
    return float(np.sort(token_logprobs)[:k].mean())


def membership_scores(passages: list[dict], token_lp: list[np.ndarray], seed: int) -> dict:
    loss = np.array([-t.mean() for t in token_lp])
    min_k = np.array([min_k_prob(t) for t in token_lp])
    others = [i for i, p in enumerate(passages) if not p["member"]]
    groups = []
    for r in sorted({p["repetitions"] for p in passages if p["member"]}):
        idx = [i for i, p in enumerate(passages) if p["repetitions"] == r]
        groups.append(
            {
                "repetitions": r,
                "copies_kept": float(np.mean([passages[i].get("copies_kept", 0) for i in idx])),
                "members": len(idx),
                "non_members": len(others),
                "member_loss": float(loss[idx].mean()),
                "non_member_loss": float(loss[others].mean()),
                "loss": bootstrap_auc(-loss[idx], -loss[others], seed=seed),
                "min_k": bootstrap_auc(min_k[idx], min_k[others], seed=seed),
            }
        )
    return {
        "scores": {"loss": "minus the mean token loss", "min_k": f"Min-{MIN_K_FRACTION:.0%} Prob"},
        "bootstrap": {"seed": seed, "resamples": 1000, "confidence": 0.95},
        "by_repetitions": groups,
    }


# ---------------------------------------------------------------- extraction


def extraction_scores(
    model, passages: list[dict], tokens: list[list[int]], eot: int, prompt: int, length: int, batch_size: int
) -> dict:
    from model.generate import generate

    usable = [i for i, t in enumerate(tokens) if len(t) >= prompt + length]
    prompts = [[eot, *tokens[i][:prompt]] for i in usable]
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(generate(model, prompts[start : start + batch_size], length, temperature=0.0))
    matched = {i: [a == b for a, b in zip(o, tokens[i][prompt : prompt + length])] for i, o in zip(usable, out)}
    groups = []
    for r in sorted({p["repetitions"] for p in passages}):
        idx = [i for i in usable if passages[i]["repetitions"] == r]
        groups.append(
            {
                "repetitions": r,
                "member": r > 0,
                "copies_kept": float(np.mean([passages[i].get("copies_kept", 0) for i in idx])) if idx else 0.0,
                "passages": len(idx),
                "exact_match": float(np.mean([all(matched[i]) for i in idx])) if idx else None,
                "token_match": float(np.mean([np.mean(matched[i]) for i in idx])) if idx else None,
            }
        )
    return {
        "prompt_tokens": prompt,
        "continuation_tokens": length,
        "decoding": "greedy",
        "too_short": len(passages) - len(usable),
        "by_repetitions": groups,
    }


# ---------------------------------------------------------------- the suite


def privacy_audit(
    checkpoint_uri,
    data: str,
    *,
    prompt_tokens: int = 16,
    continuation_tokens: int = 16,
    batch_size: int = 256,
    seed: int = 0,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    """The audit of the planted text that the manifest ``data`` names -> {"exposure", "membership",
    "extraction", "audit" (what was planted: counts, copies kept after dedup, the record's URI), ...}."""
    from data_pipeline.tokenizer import EOT

    model, _, enc, meta = loaded_checkpoint(checkpoint_uri, endpoint_url=endpoint_url, device=device)
    manifest, record = load_audit(data, endpoint_url)
    check_tokenizer(manifest, enc)
    block = model.cfg.block_size
    if prompt_tokens + continuation_tokens + 1 > block:
        raise EvalError(
            f"extraction needs 1 + prompt_tokens + continuation_tokens <= block_size ({block}); got "
            f"1 + {prompt_tokens} + {continuation_tokens}: lower --prompt-tokens / --continuation-tokens"
        )
    eot = enc.encode_single_token(EOT)
    model.eval()
    passages = record["passages"]
    tokens = enc.encode_ordinary_batch([p["text"] for p in passages])
    token_lp = continuation_token_logprobs(model, [([eot], t[:block]) for t in tokens], batch_size=batch_size)
    return {
        "checkpoint": meta["checkpoint_uri"],
        "audit": {
            "manifest": manifest["uri"],
            "planted_documents": record["planted_documents"],
            "kept_documents": record["kept_documents"],
            "dedup": {
                "exact": manifest["config"]["clean"]["exact_dedup"],
                "near": manifest["config"]["near_dedup"]["enabled"],
            },
        },
        "exposure": _exposure_section(model, enc, record, eot, batch_size),
        "membership": membership_scores(passages, token_lp, seed),
        "extraction": extraction_scores(model, passages, tokens, eot, prompt_tokens, continuation_tokens, batch_size),
    }


def format_privacy(r: dict) -> list[str]:
    """Printable lines for ``privacy_audit``'s result."""
    e, a = r["exposure"], r["audit"]
    lines = [
        f"privacy       {a['planted_documents']} documents planted, {a['kept_documents']} kept after dedup "
        f"(exact {'on' if a['dedup']['exact'] else 'off'}, near {'on' if a['dedup']['near'] else 'off'})",
        f"  exposure over all {e['candidates']:,} secrets (max {e['max_bits']:.1f} bits), template {e['template']!r}:",
    ]
    for g in e["by_repetitions"]:
        planted = f"{g['repetitions']:>3} copies ({g['copies_kept']:g} kept)" if g["repetitions"] else "never planted"
        lines.append(
            f"    {planted:<24} {g['canaries']:>4} canaries  mean {g['mean']:5.2f} ± {g['stderr'] or 0:.2f} bits  "
            f"median {g['median']:5.2f}  range [{g['min']:.2f}, {g['max']:.2f}]"
        )
    falls = ", ".join(f"{a} -> {b} copies" for a, b in e["falls"])
    lines.append(
        f"    exposure falls as copies rise: {falls} (beyond 2 standard errors)"
        if falls
        else "    exposure does not fall as copies rise (no drop beyond 2 standard errors; ± is one)"
    )
    lines.append("  membership inference (planted members vs never-planted passages built the same way):")
    for g in r["membership"]["by_repetitions"]:
        lo, mk = g["loss"], g["min_k"]
        lines.append(
            f"    {g['repetitions']:>3} copies ({g['copies_kept']:g} kept): loss AUC {lo['auc']:.3f} "
            f"[{lo['ci'][0]:.3f}, {lo['ci'][1]:.3f}]  Min-K% AUC {mk['auc']:.3f} "
            f"[{mk['ci'][0]:.3f}, {mk['ci'][1]:.3f}]  "
            f"({g['members']} vs {g['non_members']}; loss {g['member_loss']:.3f} vs {g['non_member_loss']:.3f})"
        )
    x = r["extraction"]
    lines.append(
        f"  extraction (greedy, {x['prompt_tokens']} -> {x['continuation_tokens']} tokens): "
        "exact match / tokens matched"
    )
    for g in x["by_repetitions"]:
        who = "non-members" if not g["member"] else f"{g['repetitions']:>3} copies ({g['copies_kept']:g} kept)"
        rate = "n/a" if g["exact_match"] is None else f"{g['exact_match']:.3f} / {g['token_match']:.3f}"
        lines.append(f"    {who:<24} {rate}  ({g['passages']} passages)")
    return lines
