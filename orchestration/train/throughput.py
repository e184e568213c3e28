"""Throughput and MFU math, the per-device peak-FLOPs table, and the ``metrics.jsonl`` writer."""

from __future__ import annotations

import json
from typing import Any, Optional

import pyarrow.fs as pafs

# Dense (no sparsity) bf16 tensor-core peaks per device, FLOP/s, from the vendors' datasheets.
# Matched in order against the CUDA device name, so specific variants come before their family.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),  # AWS g5's A10G runs lower clocks than the A10 (125 TFLOP/s)
    ("A10", 125e12),
)


def peak_flops_per_device(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak FLOP/s for a CUDA device name; None for CPU or an unknown device."""
    if not device_name:
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def throughput(
    *, tokens: int, seconds: float, flops_per_token: float, num_devices: int, peak_flops: Optional[float]
) -> dict:
    """tokens/s, achieved FLOP/s (all devices) and MFU (None when the peak is unknown, e.g. CPU).

    MFU = achieved FLOP/s / (num_devices x peak FLOP/s per device); ``flops_per_token`` is the
    training cost (forward + backward, attention included) of one token.
    """
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    flops_per_s = tokens_per_s * flops_per_token
    mfu = flops_per_s / (num_devices * peak_flops) if peak_flops else None
    return {"tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s, "mfu": mfu}


class MetricsLog:
    """Appends one JSON object per line to ``<run dir>/metrics.jsonl`` on any pyarrow filesystem.

    Object stores cannot append, so the whole file is rewritten at each ``flush`` (it is small: one
    line per log interval). ``truncate_after(step)`` drops lines past a resumed checkpoint so a
    restarted run never logs the same step twice.
    """

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path
        self.lines: list[str] = []
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as f:
                self.lines = [ln for ln in f.read().decode("utf-8").splitlines() if ln.strip()]

    def truncate_after(self, step: int) -> None:
        self.lines = [ln for ln in self.lines if json.loads(ln).get("step", 0) <= step]
        self.flush()

    def append(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record, sort_keys=False))

    def flush(self) -> None:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(("\n".join(self.lines) + "\n" if self.lines else "").encode("utf-8"))


def read_metrics(fs: pafs.FileSystem, path: str) -> list[dict]:
    """All records of a ``metrics.jsonl``."""
    with fs.open_input_stream(path) as f:
        return [json.loads(ln) for ln in f.read().decode("utf-8").splitlines() if ln.strip()]
