"""Eval suites on a tiny GPT trained in-process (no Ray, seconds) on play-like exchanges, scored on
held-out exchanges it never saw: new pairings of the words it learned."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from rouge_score.rouge_scorer import RougeScorer

from data_pipeline import tokenizer as tok
from data_pipeline.storage import embedded_corpus_dir
from model.config import ModelConfig
from model.gpt import GPT
from orchestration.evaluate.data_source import EvalError, manifest_rows, training_manifest
from orchestration.evaluate.lm import evaluate_lm, lm_metrics
from orchestration.evaluate.scoring import continuation_logprobs
from orchestration.evaluate.suites import (
    cloze_items,
    continuation_scores,
    format_summary,
    held_out_lines,
    held_out_pieces,
    multiple_choice_suite,
    run_eval_suite,
    score_choices,
)
from tests.helpers import write_inference_checkpoint

# Each exchange asks where a thing is and who is asked; the answer names the thing's place and the
# person's title. Held-out exchanges pair things and people the training text never paired, so every
# held-out line is new text: scoring it well takes the learned associations, not recall.
PLACE = {
    "sword": "armoury",
    "crown": "tower",
    "letter": "closet",
    "ring": "chapel",
    "cup": "cellar",
    "cloak": "wardrobe",
    "key": "gatehouse",
    "lute": "gallery",
}
TITLE = {
    "Osric": "sir",
    "Horatio": "my lord",
    "Bernardo": "good friend",
    "Marcellus": "my liege",
    "Reynaldo": "old man",
    "Francisco": "good soldier",
    "Cornelius": "my prince",
    "Voltemand": "your grace",
}


def exchanges(pairs: list[tuple[str, str]], n: int, rng: np.random.Generator) -> str:
    """``n`` two-line exchanges over (thing, person) pairs, one document each (end-of-text between)."""
    out = []
    for i in rng.integers(0, len(pairs), n):
        thing, person = pairs[i]
        out.append(
            f"  Ham. Where is the {thing}, good {person}?\n"
            f"  Hor. 'Tis in the {PLACE[thing]}, {TITLE[person]}--I'll go.\n"
        )
    return tok.EOT.join(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"text_file" (held-out), "text", "train_text", "spec", "trained": (model, cfg, enc, meta), "random": (...)}."""
    rng = np.random.default_rng(0)
    pairs = list(itertools.product(PLACE, TITLE))
    held = rng.random(len(pairs)) < 0.25
    train_text = exchanges([p for p, h in zip(pairs, held) if not h], 300, rng)
    text = exchanges([p for p, h in zip(pairs, held) if h], 60, rng)
    train_lines = set(train_text.replace(tok.EOT, "\n").split("\n"))
    assert not {line for line in text.replace(tok.EOT, "\n").split("\n") if line} & train_lines, "held-out leaked"
    spec = tok.train_bpe([train_text.replace(tok.EOT, "\n")], 450, "gpt4")  # every word one token
    enc = tok.encoding(spec)
    ids = torch.tensor(enc.encode(train_text, allowed_special="all"))
    cfg = ModelConfig(vocab_size=enc.n_vocab, block_size=48, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    random_model, model = GPT(cfg).eval(), GPT(cfg)
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 30) * max(0.1, 1 - i / steps))
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds sync waits on a busy machine
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - cfg.block_size - 1, (16,), generator=gen)
            batch = torch.stack([ids[s : s + cfg.block_size + 1] for s in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.5, "the fixture model should have learned the exchanges' form"
    model.eval()
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(text, encoding="utf-8")
    meta = {"checkpoint_uri": "<in-process>", "step": steps}
    return {
        "text_file": str(path),
        "text": text,
        "train_text": train_text,
        "spec": spec,
        "trained": (model, cfg, enc, meta),
        "random": (random_model, cfg, enc, meta),
    }


def test_bits_per_byte_of_a_model(tiny):
    model, cfg, enc, _ = tiny["trained"]
    ids = np.asarray(enc.encode(tiny["text"].replace(tok.EOT, "\n")))
    seqs = np.stack([ids[i : i + cfg.block_size + 1] for i in range(0, 6 * cfg.block_size, cfg.block_size)])
    r = lm_metrics(model, enc, seqs, batch_size=4)
    assert r["bytes"] == sum(len(enc.decode_bytes(row[1:].tolist())) for row in seqs)
    assert r["tokens"] == r["bpb_tokens"] == seqs[:, 1:].size
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / r["bytes"], rel=1e-6)
    # End-of-text targets count in the loss but decode to no bytes: bpb leaves them out entirely
    eot = enc.encode_single_token(tok.EOT)
    with_eot = seqs.copy()
    with_eot[:, 10] = eot
    r2 = lm_metrics(model, enc, with_eot, batch_size=4)
    assert r2["bpb_tokens"] == r2["tokens"] - len(seqs)
    assert r2["bytes"] == sum(len(enc.decode_bytes([t for t in row[1:].tolist() if t != eot])) for row in with_eot)


def test_continuation_logprobs_match_the_model_loss(tiny):
    model, _, enc, _ = tiny["trained"]
    ctx, cont = enc.encode("Let me not liue,"), enc.encode(" This his good melancholly")
    (lp,) = continuation_logprobs(model, [(ctx, cont)])
    ids = torch.tensor([ctx + cont])
    targets = ids[:, 1:].clone()
    targets[:, : len(ctx) - 1] = -1  # only the continuation's tokens are scored
    with torch.no_grad():
        _, loss = model(ids[:, :-1], targets)
    assert lp == pytest.approx(-float(loss) * len(cont), rel=1e-5)
    # Too long for the context: context is cut from the left and the score stays finite
    (long_lp,) = continuation_logprobs(model, [(ctx * 20, cont)])
    assert math.isfinite(long_lp) and long_lp < 0


def test_checkpoint_directory_through_run_eval_suite(tiny, tmp_path):
    model, _, _, _ = tiny["trained"]
    ckpt = write_inference_checkpoint(tmp_path / "run", model, tiny["spec"], step=300)
    lm = evaluate_lm(str(tmp_path / "run"), tiny["text_file"], max_sequences=8)  # run dir -> newest checkpoint
    assert lm["loss"] == pytest.approx(evaluate_lm(ckpt, tiny["text_file"], max_sequences=8)["loss"], rel=1e-5)
    assert lm["checkpoint"] == ckpt and lm["bits_per_byte"] > 0
    result = run_eval_suite(
        "all",
        ckpt,
        tiny["text_file"],
        num_items=8,
        num_options=3,
        prompt_tokens=8,
        continuation_tokens=8,
        max_sequences=8,
    )
    assert set(result["suites"]) == {"lm", "continuation", "mc", "bias"} and result["step"] == 300
    assert result["suites"]["mc"]["items"] == 8 and result["suites"]["mc"]["chance"] == pytest.approx(1 / 3)
    assert result["suites"]["continuation"]["prompt_tokens"] == 8
    summary = format_summary(result)
    for needle in (
        "bits/byte",
        "BLEU",
        "sacrebleu",
        "rouge-score",
        "chance 0.333",
        "95% CI",
        "not a certification",
        ckpt,
    ):
        assert needle in summary
    with pytest.raises(ValueError, match="num_options"):
        run_eval_suite("lm", ckpt, tiny["text_file"], num_options=3)
    with pytest.raises(ValueError, match="unknown eval suite"):
        run_eval_suite("mmlu", ckpt, tiny["text_file"])
    with pytest.raises(EvalError, match="names no training data; pass --data"):
        run_eval_suite("mc", ckpt)  # no --data, and the checkpoint's meta names none


def test_cloze_items_are_deterministic_shuffled_and_true(tiny):
    enc = tiny["trained"][2]
    pieces, cut = held_out_pieces(tiny["text_file"], enc)
    lines = held_out_lines(pieces, enc, cut)
    assert not cut and len(lines) == 60 and all(len(piece) == 2 for piece in lines)  # one exchange per document
    items = cloze_items(lines, num_items=20, num_options=4, seed=0)
    assert items == cloze_items(lines, num_items=20, num_options=4, seed=0)
    assert items != cloze_items(lines, num_items=20, num_options=4, seed=1)
    assert len(items) == 20 and len({it["answer"] for it in items}) > 1  # the answer's position varies
    for it in items:
        assert [it["context"][0], it["options"][it["answer"]]] in lines  # the true next line
        assert len(set(it["options"])) == 4
    with pytest.raises(ValueError, match="too few"):
        cloze_items(lines[:3], num_options=4)


def test_score_choices_argmax_and_standard_error():
    items = [
        {"options": ["aa", "b"], "answer": 0},
        {"options": ["aa", "b"], "answer": 1},
        {"options": ["x", "yyyy"], "answer": 1},
        {"options": ["xxxx", "y"], "answer": 0},
    ]
    logps = [
        [-2.0, -3.0],  # sum right, per byte (-1 vs -3) right
        [-2.4, -1.5],  # sum right, per byte (-1.2 vs -1.5) wrong
        [-1.0, -2.0],  # sum wrong, per byte (-1 vs -0.5) right
        [-2.0, -1.0],
    ]  # sum wrong, per byte (-0.5 vs -1) right
    r = score_choices(items, logps)
    assert r["accuracy"] == 0.5 and r["stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert r["accuracy_norm"] == 0.75 and r["stderr_norm"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert r["chance"] == 0.5 and r["items"] == 4


def test_mc_suite_on_held_out_text_beats_chance(tiny):
    trained = multiple_choice_suite(tiny["trained"], tiny["text_file"], num_items=30, num_options=4, seed=0)
    random = multiple_choice_suite(tiny["random"], tiny["text_file"], num_items=30, num_options=4, seed=0)
    assert trained["items"] == 30 and trained["chance"] == 0.25
    assert trained["accuracy"] > trained["chance"] + 2 * trained["stderr"]
    assert trained["accuracy"] > random["accuracy"] + 2 * trained["stderr"]
    assert trained["stderr"] == pytest.approx(math.sqrt(trained["accuracy"] * (1 - trained["accuracy"]) / 30))
    for ex in trained["examples"]:  # the items are held-out text
        assert ex["context"][0] not in tiny["train_text"] and ex["options"][ex["answer"]] not in tiny["train_text"]


def test_continuation_of_held_out_text_beats_random_model_with_the_libraries_scores(tiny):
    # The prompt is the question and the speaker; the continuation scored is the answer line
    kwargs = dict(num_items=12, prompt_tokens=14, continuation_tokens=12)
    trained = continuation_scores(tiny["trained"], tiny["text_file"], **kwargs)
    random = continuation_scores(tiny["random"], tiny["text_file"], **kwargs)
    assert trained["items"] == random["items"] == 12
    for g in trained["generations"]:
        assert g["prompt"].endswith("Hor.") and g["reference"] not in tiny["train_text"]
    assert trained["rougeL"] > 0.5 and trained["rougeL"] > random["rougeL"] + 0.3
    assert trained["bleu"] > random["bleu"] + 10
    # BLEU and ROUGE are sacrebleu's and rouge-score's on the suite's own generations (play text with
    # "--" and "'Tis"), and the result and summary name their settings
    hyps, refs = [g["generated"] for g in trained["generations"]], [g["reference"] for g in trained["generations"]]
    assert any("--" in h for h in hyps) and all("'Tis" in x for x in refs)
    assert trained["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert trained["bleu_signature"] == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, hyp) for hyp, ref in zip(hyps, refs)]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert trained[name] == pytest.approx(sum(s[name].fmeasure for s in scores) / len(scores), abs=1e-12)
    assert trained["rouge_settings"]["types"] == ["rouge1", "rouge2", "rougeL"]
    assert not trained["rouge_settings"]["use_stemmer"]
    summary = format_summary({"checkpoint": "<in-process>", "step": 300, "suites": {"continuation": trained}})
    assert f"BLEU: sacrebleu {trained['bleu_signature']}" in summary
    assert "ROUGE: rouge-score" in summary and "stemmer off" in summary
    with pytest.raises(ValueError, match="fit the context"):
        continuation_scores(tiny["trained"], tiny["text_file"], prompt_tokens=40, continuation_tokens=40)


def test_held_out_lines_from_a_manifest(tiny, tmp_path):
    from data_pipeline.manifest import ManifestMismatchError, load_tokenizer_from_manifest
    from tests.helpers import tiny_corpus_manifest

    manifest = tiny_corpus_manifest(tmp_path, seq_len=64, chars=30_000)
    enc = load_tokenizer_from_manifest(manifest)
    pieces, cut = held_out_pieces(manifest, enc, split="val", max_sequences=5)
    assert cut and len(pieces) == 5 and all(len(p) == 65 for p in pieces)
    lines = held_out_lines(pieces, enc, cut)
    source = sorted(embedded_corpus_dir().glob("*_gut*.txt"))[0].read_text(encoding="utf-8", errors="replace")
    assert sum(map(len, lines)) > 0 and all(line in source for piece in lines for line in piece)
    with pytest.raises(ManifestMismatchError, match="checkpoint's tokenizer"):
        held_out_pieces(manifest, tiny["trained"][2], max_sequences=5)


# ---------------------------------------------------------------- no --data: the checkpoint's own manifest


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A run directory as `raylm train` leaves it, without Ray Train: a tiny GPT trained in-process (a
    second) on tiny_corpus_manifest's train rows; config.yaml, run.json and the checkpoint's
    raylm_meta.json name the manifest, as the driver writes them.
    {"run", "checkpoint", "manifest", "model", "spec"}."""
    from helpers import tiny_corpus_manifest

    from orchestration.artifacts import RunDir, write_config, write_run_facts
    from orchestration.config import config_to_dict, load_config

    root = tmp_path_factory.mktemp("own_run")
    manifest = tiny_corpus_manifest(root)
    spec = tok.load_spec(str(Path(manifest).parent))
    rows = torch.from_numpy(manifest_rows(manifest, "train")[0])
    cfg = ModelConfig(vocab_size=spec["n_vocab"], block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        batch = rows[torch.randint(0, len(rows), (16,))]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    run = root / "runs" / "tiny"
    facts = {"seq_len": 32, "tokenizer_hash": spec["hash"], "data": manifest}  # the driver's checkpoint meta
    ckpt = write_inference_checkpoint(run, model, spec, step=40, meta=facts)
    write_config(RunDir.at(str(run)), config_to_dict(load_config(None, [f"train.data={manifest}"])))
    write_run_facts(RunDir.at(str(run)), {"task": "pretrain_task", "model": asdict(cfg), "total_steps": 40, **facts})
    return {"run": str(run), "checkpoint": ckpt, "manifest": manifest, "model": model, "spec": spec}


def test_eval_without_data_scores_the_val_split_of_the_run_s_manifest(own_run, tmp_path, capsys):
    """`raylm eval --checkpoint RUN_DIR`: the lm suite reads the val split of the manifest the run trained
    on (in this process: no Ray started), and the console and the JSON it writes name that manifest."""
    import ray

    from orchestration.cli import main

    out = tmp_path / "eval.json"
    ray_before = ray.is_initialized()
    assert main(["eval", "--checkpoint", own_run["run"], "--out", str(out)]) == 0
    assert ray.is_initialized() == ray_before
    console = capsys.readouterr().out
    manifest = own_run["manifest"]
    assert f"no --data: scoring {manifest}" in console
    assert f"data       {manifest}, val split (the manifest the checkpoint was trained on)" in console
    result = json.loads(out.read_text())
    assert result["checkpoint"] == own_run["checkpoint"] and result["step"] == 40
    assert result["data"] == {"uri": manifest, "split": "val", "origin": "the manifest the checkpoint was trained on"}
    val = manifest_rows(manifest, "val")[0]
    lm = result["suites"]["lm"]
    assert lm["sequences"] == min(256, len(val))
    expected = lm_metrics(own_run["model"], tok.encoding(own_run["spec"]), val[: lm["sequences"]])["loss"]
    assert lm["loss"] == pytest.approx(expected, rel=1e-5) and lm["loss"] < math.log(own_run["spec"]["n_vocab"])


def test_the_lm_suite_scores_the_rows_ray_data_streams(own_run, ray_session):
    """evaluate_lm reads a manifest's val rows in this process: the same rows, in the same order, as the
    Ray Data stream it read before and fine-tuning still validates on (``sequence_dataset(..., "val")``),
    so the same loss."""
    from data_pipeline.stream import sequence_dataset

    manifest = own_run["manifest"]
    streamed = sequence_dataset(manifest, "val", seed=0).take_all()
    assert [r["position"] for r in streamed] == list(range(len(streamed)))
    ray_rows = np.stack([np.asarray(r["tokens"], dtype=np.int64) for r in streamed])
    rows = manifest_rows(manifest, "val")[0]
    assert np.array_equal(rows, ray_rows)
    result = evaluate_lm(own_run["checkpoint"], manifest, max_sequences=len(rows))
    expected = lm_metrics(own_run["model"], tok.encoding(own_run["spec"]), ray_rows)
    assert result["sequences"] == len(ray_rows) and result["loss"] == pytest.approx(expected["loss"], rel=1e-7)


def test_eval_without_data_when_the_manifest_is_gone_names_it_and_data(own_run, tmp_path, capsys):
    """A checkpoint whose manifest was deleted: exit 2 and one line naming the manifest and --data,
    before anything is scored (no Ray)."""
    import shutil

    from orchestration.cli import main

    moved = tmp_path / "data"
    shutil.copytree(Path(own_run["manifest"]).parent, moved)
    meta = {"seq_len": 32, "tokenizer_hash": own_run["spec"]["hash"], "data": str(moved / "manifest.json")}
    ckpt = write_inference_checkpoint(tmp_path / "run", own_run["model"], own_run["spec"], step=40, meta=meta)
    shutil.rmtree(moved)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--suite", "mc"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{ckpt} was trained on {moved}/manifest.json, which cannot be read now" in err and "pass --data" in err


def test_a_fine_tune_on_task_rows_and_an_export_lead_to_the_pretraining_manifest(own_run, tmp_path):
    """A fine-tune trained on prompts or labels (no token rows to hold out) scores the manifest its base
    checkpoint was trained on; an exported folder follows the checkpoint it was exported from."""
    from orchestration.deploy.export import export_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model

    model, spec, manifest, base = own_run["model"], own_run["spec"], own_run["manifest"], own_run["checkpoint"]
    sft = {"data": "shakespeare-play-qa", "base_checkpoint": base}
    tuned = write_inference_checkpoint(tmp_path / "sft", model, spec, step=5, meta=sft)
    found = training_manifest(load_checkpoint_model(tuned)[3])
    assert found.uri == manifest
    hop = f"{tuned} was fine-tuned from {base} on task rows (shakespeare-play-qa)"
    assert found.origin == f"the manifest {base} was trained on; {hop}"
    exported = export_checkpoint(tuned, str(tmp_path / "export"), fmt="raylm")["out_dir"]
    found = training_manifest(load_checkpoint_model(exported)[3])  # the export carries the fine-tune's data
    exported_hop = f"{exported} was exported from {tuned}, fine-tuned from {base} on task rows (shakespeare-play-qa)"
    assert found.uri == manifest and found.origin == f"the manifest {base} was trained on; {exported_hop}"
    meta_file = Path(exported) / "raylm_meta.json"  # an export from before it copied them: via its source
    older = {k: v for k, v in json.loads(meta_file.read_text()).items() if k not in sft}
    meta_file.write_text(json.dumps(older))
    found = training_manifest(load_checkpoint_model(exported)[3])
    assert found.uri == manifest and f"{exported} was exported from {tuned}; {hop}" in found.origin
    lm_tuned = write_inference_checkpoint(
        tmp_path / "lm", model, spec, step=5, meta={"data": manifest, "base_checkpoint": "x"}
    )
    assert training_manifest(load_checkpoint_model(lm_tuned)[3]).uri == manifest  # task lm: its own manifest
    orphan_meta = {"data": str(tmp_path / "qa_{split}.jsonl"), "base_checkpoint": str(tmp_path / "gone")}
    orphan = write_inference_checkpoint(tmp_path / "orphan", model, spec, step=5, meta=orphan_meta)
    with pytest.raises(EvalError, match=f"but {re.escape(str(tmp_path))}/gone is gone .* pass --data"):
        training_manifest(load_checkpoint_model(orphan)[3])


def test_an_export_scores_its_training_manifest_after_its_source_is_gone(own_run, tmp_path):
    """`raylm export --format raylm` copies the checkpoint's training data into its own meta: eval
    without --data works on the exported folder once the checkpoint it came from is deleted."""
    import shutil

    from orchestration.deploy.export import export_checkpoint
    from orchestration.evaluate.load import load_checkpoint_model

    source = shutil.copytree(own_run["checkpoint"], tmp_path / "run" / Path(own_run["checkpoint"]).name)
    exported = export_checkpoint(str(source), str(tmp_path / "export"), fmt="raylm")["out_dir"]
    shutil.rmtree(tmp_path / "run")
    meta = load_checkpoint_model(exported)[3]
    assert meta["data"] == own_run["manifest"] and meta["checkpoint"] == str(source)
    found = training_manifest(meta)
    assert found.uri == own_run["manifest"] and found.origin == "the manifest the checkpoint was trained on"


def test_eval_without_data_on_object_storage(own_run, s3_server, tmp_path, capsys, monkeypatch):
    """A run and its manifest on S3: the checkpoint's meta names the s3:// manifest and eval reads it
    (the mc suite: no Ray); a manifest deleted from the bucket, or storage that cannot be reached, is
    the same clean error."""
    import boto3
    from helpers import free_ports, tiny_corpus_on_s3

    from orchestration.cli import main

    endpoint, bucket = s3_server["endpoint_url"], "raylm-own-data"
    manifest = tiny_corpus_on_s3(tmp_path, endpoint, bucket)
    meta = {"seq_len": 32, "tokenizer_hash": own_run["spec"]["hash"], "data": manifest}
    local = Path(write_inference_checkpoint(tmp_path / "run", own_run["model"], own_run["spec"], step=40, meta=meta))
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for path in local.iterdir():
        s3.upload_file(str(path), bucket, f"runs/tiny/{local.name}/{path.name}")
    argv = ["eval", "--checkpoint", f"s3://{bucket}/runs/tiny", "--endpoint-url", endpoint, "--suite", "mc"]
    assert main([*argv, "--num-items", "8"]) == 0
    assert f"data       {manifest}, val split (the manifest the checkpoint was trained on)" in capsys.readouterr().out
    monkeypatch.setenv("RAYLM_S3_RETRY_ATTEMPTS", "1")  # no ~13 s of backoff against a closed port
    (closed,) = free_ports(1)
    unreachable = f"http://127.0.0.1:{closed}"  # the local run's manifest is on S3, behind this endpoint
    assert main(["eval", "--checkpoint", str(local.parent), "--endpoint-url", unreachable, "--suite", "mc"]) == 2
    err = capsys.readouterr().err
    assert f"was trained on {manifest}, which cannot be read now" in err and "Traceback" not in err
    s3.delete_object(Bucket=bucket, Key="data/manifest.json")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"was trained on {manifest}, which cannot be read now" in err and "Traceback" not in err
