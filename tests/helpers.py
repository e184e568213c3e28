"""Tiny data, configs and the shared runs of the training tests: the tiny corpus, the reference runs
(one per ZeRO stage) and the demo with its fine-tunes, each built once per test session
(tests/conftest.py's fixtures) and reused by every test that compares against or starts from them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple, Optional

from orchestration.config import Config

# One build per shape and test process: the BPE training is the costly part, so later callers get a copy.
_BUILT: dict[tuple[int, int, int], Path] = {}


def tiny_corpus_manifest(root: Path, *, seq_len: int = 32, vocab_size: int = 512, chars: int = 180_000) -> str:
    """Token shards (vocab 512, seq_len 32) of ~180 kB cut from one embedded play, written directly
    with the data pipeline's own tokenizer, shard and manifest writers (no `prepare` run: seconds, no Ray).

    3 train shards + 1 val shard, the layout `raylm prepare` writes, under ``root/data``. Reuses an
    existing one under ``root``; a shape already built in this process is copied (the files are
    identical: same text, same tokenizer training), not rebuilt.
    """
    import atexit
    import shutil
    import tempfile

    from data_pipeline.manifest import MANIFEST

    out = root / "data"
    if (out / MANIFEST).exists():
        return str(out / MANIFEST)
    key = (seq_len, vocab_size, chars)
    if key not in _BUILT:
        scratch = tempfile.mkdtemp(prefix="raylm_tiny_corpus_")
        atexit.register(shutil.rmtree, scratch, True)
        built = Path(scratch) / "data"
        _write_tiny_corpus(built, seq_len, vocab_size, chars)
        _BUILT[key] = built
    shutil.copytree(_BUILT[key], out)
    return str(out / MANIFEST)


def _write_tiny_corpus(out: Path, seq_len: int, vocab_size: int, chars: int) -> None:
    import hashlib

    import numpy as np
    import pyarrow.fs as pafs

    from data_pipeline import tokenizer as tok
    from data_pipeline.manifest import Manifest, ShardEntry, SplitEntry, TokenizerEntry, write_manifest
    from data_pipeline.row_index import write_index
    from data_pipeline.shards import CODEC, SHARD_FORMAT, shard_bytes
    from data_pipeline.storage import embedded_corpus_dir

    text = sorted(embedded_corpus_dir().glob("*_gut*.txt"))[0].read_text(encoding="utf-8", errors="replace")
    body = text[len(text) // 10 : len(text) // 10 + chars]
    spec = tok.train_bpe([body], vocab_size, "gpt4")
    ids = np.asarray(tok.encoding(spec).encode(body), dtype=np.int64)
    row = seq_len + 1
    rows = ids[: len(ids) // row * row].reshape(-1, row)
    parts = {"train": np.array_split(rows[: int(len(rows) * 0.9)], 3), "val": [rows[int(len(rows) * 0.9) :]]}
    splits = {}
    for split, shards in parts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        entries, index_records = [], []
        for i, shard in enumerate(shards):
            data, records = shard_bytes(
                shard.reshape(-1),
                row,
                "uint16",
                {
                    "format": SHARD_FORMAT,
                    "tokenizer_hash": spec["hash"],
                    "seq_len": seq_len,
                    "split": split,
                    "index": i,
                },
            )
            name = f"{split}/shard-{i:05d}.parquet"
            (out / name).write_bytes(data)
            entries.append(
                ShardEntry(
                    file=name,
                    sequences=len(shard),
                    sha256=hashlib.sha256(data).hexdigest(),
                    bytes=len(data),
                    row_groups=len(records),
                )
            )
            index_records.append(records.tobytes())
        n = sum(e.sequences for e in entries)
        splits[split] = SplitEntry(
            documents=len(entries),
            tokens=n * row,
            sequences=n,
            dropped_tail_tokens=0,
            num_shards=len(entries),
            shards=entries,
            index=write_index(pafs.LocalFileSystem(), str(out), split, index_records, CODEC),
        )
    for name, data in tok.to_files(spec).items():
        (out / name).write_bytes(data)
    manifest = Manifest(
        tokenizer=TokenizerEntry(
            name=spec["name"],
            hash=spec["hash"],
            n_vocab=spec["n_vocab"],
            eot_token=tok.eot_id(spec),
            ranks_file=tok.RANKS_FILE,
            meta_file=tok.META_FILE,
        ),
        seq_len=seq_len,
        row_tokens=row,
        dtype="uint16",
        splits=splits,
    )
    write_manifest(manifest, pafs.LocalFileSystem(), str(out))


def tiny_config(manifest: str, storage: Path, run_name: str, *, zero_stage: int = 2, overrides=()) -> Config:
    """A 2-worker run of a tiny GPT (vocab from the manifest) that takes a few seconds: 20 steps of a
    global batch of 24 sequences (2 workers x 2 x 6 accumulation steps; 24 also splits over 1, 3 and
    4 workers of 2-sequence micro-batches, so a run can branch onto them), checkpoints and evaluations
    at steps 10 and 20. μP at twice its base width: every run here (the reference runs at each ZeRO stage,
    their branches and resumes) trains with the hidden matrices in an AdamW group of their own at half the LR."""
    from orchestration.config import load_config

    base = [
        f"train.data={manifest}",
        f"train.storage_path={storage}",
        f"train.run_name={run_name}",
        f"train.zero_stage={zero_stage}",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=6",
        "train.max_steps=20",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.log_interval=5",
        "train.eval_interval=10",
        "train.val_sequences=16",
        "train.checkpoint_interval=10",
        "train.num_to_keep=3",
        "model.block_size=32",
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.parametrization=mup",
        "model.mup_base_width=16",
    ]
    return load_config(None, base + list(overrides))


def tiny_corpus_on_s3(root: Path, endpoint_url: str, bucket: str) -> str:
    """``tiny_corpus_manifest``'s shards uploaded to ``s3://bucket/data/`` on the S3 server at
    ``endpoint_url`` (the bucket is created); returns the manifest's URI there."""
    import boto3

    local = Path(tiny_corpus_manifest(root)).parent
    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in local.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"data/{path.relative_to(local)}")
    return f"s3://{bucket}/data/manifest.json"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all bound at once, so none repeats)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class RestartableS3:
    """A moto S3 server on a fixed 127.0.0.1 port that can go away and come back (moto keeps its
    buckets in-process, so a server restarted on the same port serves the same objects): a storage
    outage that loses nothing, as a flaky network or endpoint gives."""

    def __init__(self) -> None:
        (self.port,) = free_ports(1)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server = self._start()

    def _start(self):
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        return server

    def outage(self, seconds: float):
        """Stop the server now and start it again after ``seconds``; returns the timer (join() it)."""
        import threading

        self._server.stop()

        def restart() -> None:
            self._server = self._start()

        timer = threading.Timer(seconds, restart)
        timer.start()
        return timer

    def stop(self) -> None:
        self._server.stop()


class ReferenceRuns:
    """Uninterrupted tiny 2-worker runs (``tiny_config``), one per ZeRO stage, each trained the first time
    a test asks for it. ``runs[stage]`` is ``(summary, metrics records)``.

    The ZeRO-0 run also feeds TensorBoard and MLflow and runs with selective activation checkpointing +
    per-block compile: that it matches ZeRO 1-3 to float noise shows both the stages and the recompute
    keep the math. Compiled with aot_eager: Dynamo and AOTAutograd trace each block and partition its
    recompute as inductor's would, without generating C++ kernels (the run took 72 CPU-s with inductor on
    a cold cache, as CI's is, 39 with aot_eager); inductor's kernels for the same blocks are pinned against eager in
    tests/model/test_checkpointing.py.
    """

    OVERRIDES = {
        0: [
            "train.trackers=[tensorboard, mlflow]",
            "train.activation_checkpointing=selective",
            "train.compile=true",
            "train.compile_backend=aot_eager",
        ]
    }

    def __init__(self, root: Path, manifest: str) -> None:
        self.root, self.manifest, self._runs = root, manifest, {}

    def __getitem__(self, stage: int) -> tuple[dict, list[dict]]:
        if stage not in self._runs:
            from orchestration.artifacts import RunDir, read_metrics
            from orchestration.train.driver import run_training

            overrides = self.OVERRIDES.get(stage, [])
            cfg = tiny_config(self.manifest, self.root / "runs", f"zero{stage}", zero_stage=stage, overrides=overrides)
            summary = run_training(cfg, resume=False)
            self._runs[stage] = (summary, read_metrics(RunDir.at(summary["run_dir"])))
        return self._runs[stage]

    def items(self) -> list[tuple[int, tuple[dict, list[dict]]]]:
        return [(stage, self[stage]) for stage in (0, 1, 2, 3)]


# One worker per run: the demo's and the fine-tunes' own sizes, shrunk to seconds.
TINY_TRAIN = [
    "train.num_workers=1",
    "train.cpus_per_worker=1",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=1",
    "train.warmup_steps=1",
    "train.log_interval=2",
]
# What each shipped fine-tune config runs with besides TINY_TRAIN: sizes, and one engine per task so
# they cover ZeRO-2 (LoRA), ZeRO-0 (a full fine-tune with its classification head, stopped
# early) and ZeRO-3 (frozen embeddings and blocks gathered unchanged into the checkpoint; a fresh
# distillation student partitioned as built, its teacher a plain module beside the engine).
FINETUNE_OVERRIDES = {
    "sft": [
        "finetune.max_per_document=2",
        "finetune.max_val_examples=8",
        "finetune.sample_prompts=1",
        "train.zero_stage=2",
        "train.max_steps=8",
        "train.eval_interval=4",
        "train.checkpoint_interval=4",
    ],
    "genre": [
        "finetune.max_per_document=2",
        "finetune.max_val_examples=8",
        "finetune.patience=1",  # with min_delta 100 no evaluation improves: stops at the second one
        "finetune.min_delta=100",
        "train.zero_stage=0",
        "train.max_steps=12",
        "train.eval_interval=4",
        "train.checkpoint_interval=4",
    ],
    "poems": ["train.zero_stage=3", "train.max_steps=4", "train.eval_interval=2", "train.checkpoint_interval=2"],
    "distill": [
        "finetune.student.n_layer=1",  # of the demo's 3, at half its width 32
        "finetune.student.n_embd=16",
        "finetune.max_val_examples=8",
        "train.zero_stage=3",
        "train.max_steps=4",
        "train.eval_interval=2",
        "train.checkpoint_interval=2",
    ],
}


# The privacy audit's planted text in the demo's corpus, at the demo's size: 2 canaries planted once and
# 2 four times among 1,000 secrets, 32 never planted; 8 member passages planted once and 8 four times
# (exact dedup keeps one copy of each), 8 non-members.
DEMO_AUDIT = [
    "data.audit.enabled=true",
    "data.audit.canary_digits=3",
    "data.audit.canary_repetitions=[1,4]",
    "data.audit.canaries_per_count=2",
    "data.audit.never_planted_canaries=32",
    "data.audit.passages=8",
    "data.audit.passage_repetitions=[1,4]",
    "data.audit.passage_lines=2",
    "data.audit.filler_lines=2",
]


def run_demo_and_finetunes(root: Path) -> dict:
    """The README's path in ``root``: `raylm demo` on 8 works of 12 kB (prepare takes seconds), then each
    configs/finetune_*.yaml with its finetune and data sections as shipped (only the sizes in
    ``FINETUNE_OVERRIDES``; the poems' seq_len shrunk to the tiny model), run through the CLI from
    ``root`` so the configs' relative ``runs/`` paths land there.

    Returns {"root", "config" (the demo's), "summary" (the demo's), "stdout" (what the demo printed),
    "finetunes": {name: finetune_summary.json}, "exit_codes": {name: CLI exit code}}.
    """
    import contextlib
    import io
    import os

    from data_pipeline.storage import embedded_corpus_dir
    from orchestration.cli import main
    from orchestration.config import load_config
    from orchestration.demo import DEFAULT_CONFIG, run_demo

    src = root / "plays"
    src.mkdir()
    for play in sorted(embedded_corpus_dir().glob("*_gut.txt"))[:8]:
        text = play.read_text(encoding="utf-8", errors="replace")
        (src / play.name).write_text(text[len(text) // 3 : len(text) // 3 + 12_000], encoding="utf-8")
    cfg = load_config(
        str(DEFAULT_CONFIG),
        [
            f"data.sources.uris=[{src}/*.txt]",
            "data.clean.strip_gutenberg=false",
            "data.near_dedup.enabled=false",
            "data.tokenizer.vocab_size=400",
            "data.output.seq_len=32",
            "data.output.val_fraction=0.25",
            "model.block_size=32",
            "model.n_layer=3",  # finetune_poems.yaml freezes the first 2 blocks
            "model.n_embd=32",
            "model.n_head=2",
            *TINY_TRAIN,
            "train.val_sequences=4",
            "train.max_steps=8",
            "train.eval_interval=4",
            "train.checkpoint_interval=8",
            "train.bias_probe=true",  # the bias probe at each eval, its curve in the demo's report
            *DEMO_AUDIT,
        ],
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            summary = run_demo(cfg, max_new_tokens=8)
        configs = DEFAULT_CONFIG.parent
        codes = {
            "prepare poems": main(["prepare", "-c", str(configs / "finetune_poems.yaml"), "data.output.seq_len=32"])
        }
        finetunes = {}
        for name, overrides in FINETUNE_OVERRIDES.items():
            codes[name] = main(["finetune", "-c", str(configs / f"finetune_{name}.yaml"), *TINY_TRAIN, *overrides])
            summary_file = root / "runs" / f"finetune_{name}" / "finetune_summary.json"
            finetunes[name] = json.loads(summary_file.read_text()) if summary_file.exists() else None
    finally:
        os.chdir(cwd)
    return {
        "root": root,
        "config": cfg,
        "summary": summary,
        "stdout": stdout.getvalue(),
        "finetunes": finetunes,
        "exit_codes": codes,
    }


class Child(NamedTuple):
    """A cluster script running in its own process, its output going to files (a pipe nobody reads
    while another scenario runs would fill up and block it) and its exit code to ``<stem>.rc`` when it
    ends, so another test process (a pytest-xdist worker) can ``attach`` and read its result."""

    out: Path
    err: Path
    rc: Path
    proc: Optional[subprocess.Popen] = None  # None in a process that attached

    @classmethod
    def start(cls, script: Path, out_dir: Path, *args: str) -> Child:
        child = cls.attach(script, out_dir)
        with open(child.out, "w") as stdout, open(child.err, "w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(script), *args],
                stdout=stdout,
                stderr=stderr,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
        threading.Thread(target=lambda: child.rc.write_text(str(proc.wait())), daemon=True).start()
        return child._replace(proc=proc)

    @classmethod
    def attach(cls, script: Path, out_dir: Path) -> Child:
        """The child that ``start`` runs (or ran) with this script in ``out_dir``, from any process."""
        return cls(*(out_dir / f"{script.stem}.{suffix}" for suffix in ("out", "err", "rc")))

    def wait(self, timeout_s: float = 600) -> int:
        """Its exit code, once it has ended."""
        deadline = time.monotonic() + timeout_s
        while not self.rc.exists() or not self.rc.read_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.out.stem} still running after {timeout_s:.0f} s: {self.out}")
            time.sleep(0.5)
        return int(self.rc.read_text())

    def result(self, timeout_s: float = 600) -> tuple[dict, str]:
        """(the JSON of its RESULT line, its stdout), once it has ended."""
        returncode = self.wait(timeout_s)
        stdout = self.out.read_text()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert returncode == 0 and lines, stdout[-3000:] + self.err.read_text()[-3000:]
        return json.loads(lines[-1][len("RESULT ") :]), stdout


def write_inference_checkpoint(root: Path, model, spec: dict, step: int, meta: dict | None = None) -> str:
    """A complete checkpoint directory as save_checkpoint lays it out (inference files only); ``meta``
    adds what a run's driver puts in its raylm_meta.json ("data", ...)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from data_pipeline import tokenizer as tok
    from orchestration.checkpoint_format import CHECKPOINT_META_FILE as META_FILE
    from orchestration.checkpoint_format import MODEL_CONFIG_FILE, MODEL_FILE

    ckpt = root / f"checkpoint_{step:08d}"
    ckpt.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(ckpt / MODEL_FILE))
    (ckpt / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model.cfg)))
    for name, data in tok.to_files(spec).items():
        (ckpt / name).write_bytes(data)
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / META_FILE).write_text(json.dumps({**(meta or {}), "step": step, "files": files}))
    return str(ckpt)


def assert_cached_decoding_matches_full(model, seq, prefill: int, chunk: tuple[int, int]) -> None:
    """A KV-cached model's next-token logits equal its full forward's on ``seq`` [B, T]: after a prefill of
    ``prefill`` tokens, then fed one token at a time, and for a multi-token chunk [a, b) on a cache that
    already holds [0, a)."""
    import torch

    from model.generate import KVCache

    batch, length = seq.shape
    with torch.no_grad():
        full, _ = model(seq)
        cache = KVCache(model.cfg, torch.zeros(batch, dtype=torch.long), length, torch.float32)
        step, _ = model(seq[:, :prefill], kv_cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, prefill - 1], rtol=1e-4, atol=1e-4)
        for t in range(prefill, length):
            step, _ = model(seq[:, t : t + 1], kv_cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
        # a chunk on a non-empty cache needs the explicit causal mask
        cache = KVCache(model.cfg, torch.zeros(batch, dtype=torch.long), length, torch.float32)
        model(seq[:, : chunk[0]], kv_cache=cache)
        out, _ = model(seq[:, chunk[0] : chunk[1]], kv_cache=cache)
        torch.testing.assert_close(out[:, 0], full[:, chunk[1] - 1], rtol=1e-4, atol=1e-4)
