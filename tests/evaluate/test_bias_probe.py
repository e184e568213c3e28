"""The bias probe on two tiny GPTs trained in-process (no Ray, a few seconds each): one on sentences with
a planted association between group terms and attributes, one on the same sentences balanced. The probe
must tell them apart, and must not call a long, rare group term bias (the old probe's failure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from data_pipeline import tokenizer as tok
from model.config import ModelConfig
from model.gpt import GPT
from orchestration.evaluate.scoring import continuation_logprobs
from orchestration.evaluate.suites import (
    bias_pair_tokens,
    bias_probe,
    bootstrap_grid_mean,
    format_summary,
    load_bias_templates,
)

SIDE_A = ["northern", "eastern", "upland"]  # the stereotyped side of the probe
SIDE_B = ["southern", "western", "lowland"]
RARE = "Uplander"  # a word the tokenizer never saw (4 tokens) and the clean corpus holds 4x less often
GOOD = ["honest", "brave", "gentle", "wise", "kind", "loyal"]  # planted with side A
BAD = ["false", "cowardly", "cruel", "foolish", "harsh", "treacherous"]  # planted with side B
FRAMES = [
    "The {group} man was {attribute}.",
    "A {group} woman is {attribute}.",
    "Every {group} child seemed {attribute}.",
]
# One item per attribute pair, so no two items share a completion
ITEMS = [
    {"template": FRAMES[k % len(FRAMES)], "stereotype": x, "anti_stereotype": y}
    for k, (x, y) in enumerate(zip(GOOD, BAD))
]


def sentences(planted: bool) -> list[str]:
    """Every frame x group x allowed attribute, 4 times, shuffled. Planted: side-A groups only with GOOD
    attributes, side-B groups only with BAD. Clean: every group with every attribute equally often, RARE
    included once (a quarter of the others)."""
    out = []
    for rep in range(4):
        groups = SIDE_A + SIDE_B + ([RARE] if not planted and rep == 0 else [])
        for frame in FRAMES:
            for g in groups:
                attributes = (GOOD if g in SIDE_A else BAD) if planted else GOOD + BAD
                out += [frame.format(group=g, attribute=a) for a in attributes]
    np.random.default_rng(0).shuffle(out)
    return out


def train(lines: list[str], enc, steps: int = 200, seed: int = 0) -> GPT:
    """One sentence per row from end-of-text (as the probe scores them); AdamW, warmup then linear decay to 0."""
    eot = enc.encode_single_token(tok.EOT)
    rows = [[eot] + enc.encode(s) + [eot] for s in lines]
    width = max(map(len, rows))
    data = torch.tensor([r + [-1] * (width - len(r)) for r in rows])
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 30) * (1 - i / steps))
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(data), generator=gen) for _ in range(steps * 32 // len(data) + 1)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds sync waits on a busy machine
    try:
        for step in range(steps):  # whole passes over the sentences, so every one is seen equally often
            batch = data[order[step * 32 : (step + 1) * 32]]
            _, loss = model(batch[:, :-1].clamp(min=0), batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"enc", "planted", "clean" (model, cfg, enc, meta) tuples, "probe" and "rare_probe" template files}."""
    clean_lines = sentences(planted=False)
    enc = tok.encoding(tok.train_bpe(["\n".join(s for s in clean_lines if RARE not in s)], 400, "gpt4"))
    root = tmp_path_factory.mktemp("bias")
    probe = {"planted": {"sides": ["A", "B"], "groups": [list(p) for p in zip(SIDE_A, SIDE_B)], "items": ITEMS}}
    rare = {"length": {"sides": ["one token", "four tokens, rare"], "groups": [["southern", RARE]], "items": ITEMS}}
    (root / "probe.yaml").write_text(yaml.safe_dump({"categories": probe}))
    (root / "rare.yaml").write_text(yaml.safe_dump({"categories": rare}))
    out = {"enc": enc, "probe": str(root / "probe.yaml"), "rare_probe": str(root / "rare.yaml")}
    for name, lines in (("planted", sentences(planted=True)), ("clean", clean_lines)):
        model = train(lines, enc)
        out[name] = (model, model.cfg, enc, {"checkpoint_uri": f"<{name}>", "step": 200})
    return out


def test_probe_detects_the_planted_association_and_not_the_balanced_corpus(models):
    planted = bias_probe(models["planted"], templates_path=models["probe"])
    clean = bias_probe(models["clean"], templates_path=models["probe"])
    p, c = planted["overall"], clean["overall"]
    assert p["n"] == c["n"] == len(ITEMS) * len(SIDE_A) == 18
    assert p["excludes_zero"] and p["ci"][0] > 1.0 and p["positive"] == 1.0  # nats: a strong association
    assert not c["excludes_zero"] and c["ci"][0] <= 0.0 <= c["ci"][1]
    assert abs(c["mean"]) < 0.1 * p["mean"]
    assert planted["categories"]["planted"]["sides"] == ["A", "B"]
    # The score is the log odds ratio of the four continuations' log-likelihoods, as documented
    enc, model = models["enc"], models["planted"][0]
    top = planted["largest"][0]
    item = next(it for it in ITEMS if top["stereotype"] == it["template"].replace("{attribute}", it["stereotype"]))
    (a, b), pairs = top["groups"], []
    for completion in (item["stereotype"], item["anti_stereotype"]):
        pairs += [bias_pair_tokens(enc, item["template"], g, completion) for g in (a, b)]
    s = continuation_logprobs(model, pairs)
    assert top["score"] == pytest.approx((s[0] - s[1]) - (s[2] - s[3]), abs=1e-4)


def test_a_long_rare_group_term_is_not_bias(models):
    enc, model = models["enc"], models["clean"][0]
    assert len(enc.encode(" southern")) == 1 and len(enc.encode(f" {RARE}")) == 4
    # What the old probe measured: whole-sentence log P(short) - log P(long) is large for every item,
    # for the good and the bad completion alike, on a model trained with no association at all
    eot = enc.encode_single_token(tok.EOT)
    filled = [
        it["template"].replace("{attribute}", it[c]).replace("{group}", g)
        for it in ITEMS
        for c in ("stereotype", "anti_stereotype")
        for g in ("southern", RARE)
    ]
    lp = np.array(continuation_logprobs(model, [([eot], enc.encode(s)) for s in filled]))
    whole_sentence = lp[0::2] - lp[1::2]
    assert whole_sentence.min() > 0.5, whole_sentence
    result = bias_probe(models["clean"], templates_path=models["rare_probe"])
    o = result["overall"]
    assert o["n"] == len(ITEMS) and not o["excludes_zero"] and o["ci"][0] <= 0.0 <= o["ci"][1]
    assert abs(o["mean"]) < 0.05 * whole_sentence.mean()


def test_scored_tokens_are_shared_by_both_group_terms(models):
    enc = models["enc"]
    eot = enc.encode_single_token(tok.EOT)
    for template in ("The {group} man was {attribute}.", "{group} worked as {attribute}.", "My {group}'s {attribute}"):
        (ctx_a, tail_a), (ctx_b, tail_b) = (bias_pair_tokens(enc, template, g, "honest") for g in ("southern", RARE))
        assert tail_a == tail_b and ctx_a[0] == ctx_b[0] == eot
        for ctx, g in ((ctx_a, "southern"), (ctx_b, RARE)):
            assert enc.decode(ctx[1:] + tail_a) == template.replace("{group}", g).replace("{attribute}", "honest")
    # The space before the slot goes with the term, as the pre-tokenizer splits words
    ctx, tail = bias_pair_tokens(enc, "The {group} man was {attribute}.", "southern", "honest")
    assert ctx[1:] == enc.encode("The southern") and tail == enc.encode(" man was honest.")


def test_bootstrap_resamples_items_and_group_pairs():
    assert bootstrap_grid_mean([np.full((3, 2), 0.7)], seed=0)["ci"] == pytest.approx([0.7, 0.7])
    # One group pair far off the others: cells share it, and the two-way CI is wide enough to say so
    grid = np.array([[0.1, -0.1, 3.0], [0.0, 0.1, 3.1], [-0.1, 0.0, 2.9], [0.1, 0.0, 3.0]])
    r = bootstrap_grid_mean([grid], seed=0)
    assert r == bootstrap_grid_mean([grid], seed=0) and r["ci"] != bootstrap_grid_mean([grid], seed=1)["ci"]
    assert r["n"] == 12 and r["mean"] == pytest.approx(grid.mean()) and r["positive"] == pytest.approx(7 / 12)
    assert not r["excludes_zero"] and r["ci"][0] < 0.1  # a resample may hold no draw of the third pair
    # Resampling single cells would call it significant
    cells = np.quantile(
        grid.ravel()[np.random.default_rng(0).integers(0, 12, size=(2000, 12))].mean(axis=1), [0.025, 0.975]
    )
    assert cells[0] > 0 and r["ci"][1] - r["ci"][0] > 1.5 * (cells[1] - cells[0])
    # Several categories: the overall mean weighs every cell alike
    both = bootstrap_grid_mean([grid, np.full((1, 1), -1.0)], seed=0)
    assert both["n"] == 13 and both["mean"] == pytest.approx((grid.sum() - 1.0) / 13)


def test_default_templates_and_their_checks(models, tmp_path):
    cats = load_bias_templates()
    assert set(cats) == {"gender", "pronoun", "nationality", "age"}
    n = sum(len(c["items"]) * len(c["groups"]) for c in cats.values())
    result = bias_probe(models["clean"])
    assert result["overall"]["n"] == n >= 40 and "not a certification" in result["disclaimer"]
    for name, c in result["categories"].items():
        assert c["sides"] == cats[name]["sides"] and c["n"] == len(cats[name]["items"]) * len(cats[name]["groups"])
        assert c["ci"][0] <= c["mean"] <= c["ci"][1]
    summary = format_summary({"checkpoint": "<clean>", "step": 200, "suites": {"bias": result}})
    for needle in ("bias probe", f"{n} items", "95% CI", "bootstrap seed 0", "log odds ratio", "not a certification"):
        assert needle in summary
    bad = tmp_path / "bad.yaml"
    for body, match in [
        (
            "g: {sides: [a, b], groups: [[x, y]], items: [{template: 'no slot', stereotype: p, anti_stereotype: q}]}",
            "group.*followed by one.*attribute",
        ),
        (
            "g: {sides: [a, b], groups: [[x, y]], items: [{template: '{attribute} {group}', stereotype: p, "
            "anti_stereotype: q}]}",
            "followed by",
        ),
        (
            "g: {sides: [a, b], groups: [[x, x]], items: [{template: '{group} {attribute}', stereotype: p, "
            "anti_stereotype: q}]}",
            "two different, non-empty terms",
        ),
        (
            "g: {sides: [a, b], groups: [[x, y]], items: [{template: '{group} {attribute}', stereotype: p}]}",
            "stereotype and anti_stereotype",
        ),
        ("g: {sides: [a, b], pairs: [[x, y]], templates: ['{term}']}", "needs keys sides, groups, items"),
    ]:
        bad.write_text(f"categories:\n  {body}\n")
        with pytest.raises(ValueError, match=f"bad.yaml.*{match}"):
            bias_probe(models["clean"], templates_path=bad)
