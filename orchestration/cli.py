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


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import prepare
    from orchestration.ray_runtime import init_ray

    cfg = _load(args)
    init_ray()
    prepare(cfg.data)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from orchestration.report import write_report
    from orchestration.trainer import run_training

    cfg = _load(args)
    summary = run_training(cfg, resume=not args.no_resume)
    written = write_report(summary["run_dir"], endpoint_url=cfg.train.endpoint_url)
    print(f"[raylm] report: {written['report.html']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestration.report import write_report

    for name, uri in write_report(args.path, out=args.out, endpoint_url=args.endpoint_url).items():
        print(f"wrote {uri}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from orchestration.evaluate import evaluate

    result = evaluate(args.checkpoint, args.data, split=args.split, max_sequences=args.max_sequences,
                      batch_size=args.batch_size, endpoint_url=args.endpoint_url, device=args.device)
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
          f"({result['tokens']:,} tokens in {result['sequences']} sequences of {args.data})")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestration.evaluate import generate_text

    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        text = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=seed, endpoint_url=args.endpoint_url,
                             device=args.device)
        print(f"--- sample {i + 1} ---\n{args.prompt}{text}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestration.demo import DEFAULT_CONFIG, run_demo

    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    run_demo(cfg, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    return 0


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory/URI (checkpoint_NNNNNN) or a run directory (its latest checkpoint)")
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs (MinIO, R2)")
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu, cuda (default cpu)")


def _add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"tokens to generate per sample (default {max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; higher = more random (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")


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

    prep = sub.add_parser(
        "prepare", help="raw corpus -> cleaned, tokenized, packed train/val shards + manifest (Ray Data)",
        description="Read the corpus under data.sources (s3://, gs://, abfs://, local paths/globs, or the "
                    "embedded 'shakespeare'), clean it, train or load a BPE tokenizer, tokenize on every CPU, "
                    "pack data.output.seq_len+1-token sequences and write Parquet shards, the tokenizer and "
                    "manifest.json to data.output.uri.")
    _add_config_args(prep)
    prep.set_defaults(func=cmd_prepare)

    train = sub.add_parser(
        "train", help="pretrain with Ray Train + DeepSpeed ZeRO on prepared shards",
        description="Pretrain the model on train.data (a manifest from `raylm prepare`) with train.num_workers "
                    "Ray Train workers running DeepSpeed. Writes <train.storage_path>/<train.run_name>/ "
                    "(config.yaml, metrics.jsonl, checkpoints) and resumes a run name that has a checkpoint.")
    _add_config_args(train)
    train.add_argument("--no-resume", action="store_true",
                       help="fail if the run directory exists instead of resuming from its latest checkpoint")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint",
                        description="Loss and perplexity of a checkpoint (loaded without DeepSpeed) on a "
                                    "prepared manifest's split or on a plain text file.")
    _add_checkpoint_args(ev)
    ev.add_argument("--data", required=True, help="a manifest.json URI from `raylm prepare`, or a UTF-8 text file")
    ev.add_argument("--split", default="val", choices=["train", "val"], help="manifest split to score (default val)")
    ev.add_argument("--max-sequences", type=int, default=256, help="sequences to score at most (default 256)")
    ev.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="sample text from a checkpoint (KV cache; greedy/temperature/top-k/top-p)",
                         description="Continue a prompt with a trained checkpoint; stops at end-of-text.")
    _add_checkpoint_args(gen)
    gen.add_argument("--prompt", required=True, help="text to continue")
    _add_sampling_args(gen, max_new_tokens=200)
    gen.add_argument("--num-samples", type=int, default=1, help="independent samples to draw (default 1)")
    gen.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser(
        "demo", help="prepare + train + eval + generate on the embedded Shakespeare corpus, local Ray",
        description="The end-to-end job on the embedded default (configs/shakespeare.yaml): prepare the "
                    "Shakespeare corpus, pretrain with Ray Train + DeepSpeed, evaluate, sample, and print a "
                    "summary with the run directory. About 10 minutes on 2 CPU cores.")
    _add_config_args(demo)
    demo.add_argument("--prompt", default="ROMEO:", help="prompt for the closing sample (default 'ROMEO:')")
    demo.add_argument("--max-new-tokens", type=int, default=200, help="length of the closing sample (default 200)")
    demo.set_defaults(func=cmd_demo)

    report = sub.add_parser(
        "report", help="HTML + Markdown + JSON report of a run, scaling sweep or tune directory",
        description="Render a self-contained report.html (plots embedded), report.md and results.json for a "
                    "run directory (metrics.jsonl + config.yaml), a scaling sweep (scaling_points.json) or a "
                    "tune experiment (tune_results.json).")
    report.add_argument("path", help="the run, sweep or tune directory (local or s3://)")
    report.add_argument("--out", default=None, help="where to write the report (default: inside PATH)")
    report.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// paths")
    report.set_defaults(func=cmd_report)

    from orchestration.submit import add_submit_parser

    add_submit_parser(sub)  # `raylm submit [...] -- <command ...>`: any raylm command as a Ray Job
    return parser


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input (a URI, a manifest, a checkpoint, a directory), imported only
    when something failed so `raylm --help` stays fast."""
    from data_pipeline.loader import ManifestMismatchError
    from data_pipeline.storage import DataSourceError
    from data_pipeline.tokenizer import TokenizerError
    from orchestration.checkpoint import CheckpointError
    from orchestration.report import ReportError

    return ManifestMismatchError, DataSourceError, TokenizerError, CheckpointError, ReportError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"raylm: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if isinstance(err, _input_errors()):  # bad input: its message says what and where; no traceback
            print(f"raylm: {type(err).__name__}: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
