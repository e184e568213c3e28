"""Throughput and MFU math, and the per-device peak-FLOPs table."""

from __future__ import annotations

from typing import Optional

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


def peak_flops_per_device(device_name: Optional[str], precision: str = "bf16") -> Optional[float]:
    """Dense peak FLOP/s of the precision the matmuls run in, for a CUDA device name; None for CPU or
    an unknown device. bf16 / fp16: the tensor-core peak above. fp32: the TF32 tensor-core peak (half
    the bf16 one on every device listed), as fp32 runs enable TF32 matmuls (``engine.worker_device``)."""
    if not device_name:
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops / 2 if precision == "fp32" else flops
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
