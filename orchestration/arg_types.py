"""argparse types for the `raylm` commands: each checks one option's value and, when it is wrong, raises
``ArgumentTypeError``, which argparse turns into a one-line error naming the option (exit status 2)
before a command imports anything heavy or starts Ray. Its own module so a command declared outside
``cli.py`` (``deploy/serve.py``, ``deploy/submit.py``) can use them without importing the CLI.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option and exits 2 otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def zero_stages(text: str) -> list[int]:
    """argparse type: comma-separated ZeRO stages, each 0-3, e.g. ``1,3``."""
    try:
        stages = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated stages 0-3, e.g. 1,3; got {text!r}") from None
    if not stages or any(s not in (0, 1, 2, 3) for s in stages):
        raise argparse.ArgumentTypeError(f"stages must be 0, 1, 2 or 3, got {text!r}")
    return stages


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str, what: str = "a finite number >= 0") -> float:
    """argparse type: a finite number >= 0 (a timeout, a wait)."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port to listen on, 1-65535."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in [1, 65535], got {value}")
    return value


def probability(text: str) -> float:
    """argparse type: a finite number in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def pruning_fraction(text: str) -> float:
    """argparse type: a fraction in [0, 1) of units to remove (1 would remove them all)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction removed; 1 would remove all), got {text}")
    return value


def temperature(text: str) -> float:
    """argparse type: 0 (greedy) or a finite positive temperature."""
    return non_negative_float(text, "0 (greedy) or a finite positive number")


def torch_device(text: str) -> str:
    """argparse type: a torch device this machine has (cpu; cuda or cuda:N where CUDA is available)."""
    if text == "cpu":
        return text  # every machine has one: no torch import
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: raylm runs on cpu or cuda")
    return text


def ngram_order(text: str) -> int:
    """argparse type: an n-gram order the n-gram model supports."""
    from model.ngram import MAX_ORDER, MIN_ORDER

    value = int(text)
    if not MIN_ORDER <= value <= MAX_ORDER:
        raise argparse.ArgumentTypeError(f"must be in [{MIN_ORDER}, {MAX_ORDER}], got {value}")
    return value


def output_dir(text: str) -> str:
    """argparse type: a local directory to write into (made if missing), not an existing file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; name a directory")
    return text


def output_file(text: str) -> str:
    """argparse type: a local file to write, not an existing directory."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name a file, e.g. {Path(text) / 'eval.json'}")
    return text


def host_name(text: str) -> str:
    """argparse type: a host name or IP address that resolves (an address to listen on: whether this
    node has it is for the server to say, as on a cluster it may be another node's)."""
    import socket

    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise argparse.ArgumentTypeError(
            f"{text!r} does not resolve ({reason}); use an IP address, e.g. 127.0.0.1 (0.0.0.0: every interface)"
        ) from None
    return text
