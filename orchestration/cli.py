"""The `raylm` command line: one subcommand per job, each a thin layer over a library function.

Heavy imports (torch, ray, deepspeed) happen inside the command that needs them, so
`raylm --help` answers instantly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestration.config import Config, ConfigError, load_config

CONFIG_HELP = "YAML config file (see configs/); defaults are used when omitted"
OVERRIDE_HELP = "config overrides as key.sub=value, e.g. model.n_layer=4 train.lr=3e-4"


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)


def cmd_model_info(args: argparse.Namespace) -> int:
    from model.flops import model_info_text

    # --preset is model.preset: the preset fills the shape, explicit model.* keys still win.
    preset = [f"model.preset={args.preset}"] if args.preset else []
    cfg = load_config(args.config, [*args.overrides, *preset]).model
    print(model_info_text(cfg, micro_batch_size=args.micro_batch_size,
                          seq_len=args.seq_len or cfg.block_size, num_workers=args.num_workers,
                          precision=args.precision, offload_optimizer=args.offload_optimizer))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylm",
        description="Build GPT-style language models from scratch and train them on Ray + DeepSpeed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    info = sub.add_parser(
        "model-info",
        help="parameters, FLOPs per token and per-GPU training memory for ZeRO stages 0-3",
        description="Print parameter counts (total, non-embedding), training FLOPs per token and the "
                    "estimated per-GPU training memory for ZeRO stages 0-3: what to check before "
                    "renting a cluster.",
    )
    info.add_argument("--preset", help="a named model preset (model/config.py PRESETS), e.g. gpt2-small")
    _add_config_args(info)
    info.add_argument("--micro-batch-size", type=int, default=8, help="sequences per GPU per micro step (default 8)")
    info.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's block_size)")
    info.add_argument("--num-workers", type=int, default=8, help="data-parallel GPUs sharing ZeRO state (default 8)")
    info.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16", help="training precision (default bf16)")
    info.add_argument("--offload-optimizer", action="store_true", help="ZeRO optimizer state offloaded to CPU memory")
    info.set_defaults(func=cmd_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"raylm: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
