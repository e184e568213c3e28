"""Tiny data and configs for the training tests (imported by tests/test_train_*.py)."""

from __future__ import annotations

from pathlib import Path

from orchestration.config import Config


def tiny_corpus_manifest(root: Path, *, seq_len: int = 32, vocab_size: int = 512, chars: int = 180_000) -> str:
    """Token shards (vocab 512, seq_len 32) of ~180 kB cut from one embedded play, written directly
    with the data pipeline's own tokenizer, shard and manifest writers (no `prepare` run: seconds, no Ray).

    3 train shards + 1 val shard, the layout `raylm prepare` writes. Reuses an existing one under ``root``.
    """
    import hashlib

    import numpy as np
    import pyarrow.fs as pafs

    from data_pipeline import tokenizer as tok
    from data_pipeline.manifest import MANIFEST, Manifest, ShardEntry, SplitEntry, TokenizerEntry, write_manifest
    from data_pipeline.shards import SHARD_FORMAT, shard_bytes
    from data_pipeline.storage import embedded_corpus_dir

    out = root / "data"
    if (out / MANIFEST).exists():
        return str(out / MANIFEST)
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
        entries = []
        for i, shard in enumerate(shards):
            data = shard_bytes(
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
            entries.append(ShardEntry(file=name, sequences=len(shard), sha256=hashlib.sha256(data).hexdigest()))
        n = sum(e.sequences for e in entries)
        splits[split] = SplitEntry(
            documents=len(entries),
            tokens=n * row,
            sequences=n,
            dropped_tail_tokens=0,
            num_shards=len(entries),
            shards=entries,
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
    return str(out / MANIFEST)


def tiny_config(manifest: str, storage: Path, run_name: str, *, zero_stage: int = 2, overrides=()) -> Config:
    """A 2-worker run of a tiny GPT (vocab from the manifest) that takes a few seconds."""
    from orchestration.config import load_config

    base = [
        f"train.data={manifest}",
        f"train.storage_path={storage}",
        f"train.run_name={run_name}",
        f"train.zero_stage={zero_stage}",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=2",
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
