"""The `raylm` command line: one subcommand per job, each a thin layer over a library function.

Heavy imports (torch, ray, deepspeed) happen inside the command that needs them, so
`raylm --help` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from orchestration.arg_types import (
    host_name,
    ngram_order,
    non_negative_float,
    non_negative_int,
    output_dir,
    output_file,
    port_number,
    positive_int,
    probability,
    pruning_fraction,
    temperature,
    torch_device,
    zero_stages,
)
from orchestration.config import ConfigError, check_finetune_data, load_config
from orchestration.runtime import RAY_DATA_LOGGING_CONFIG, VERBOSE_ENV, keep_local_ray_on_loopback

CONFIG_HELP = "YAML config file (see configs/); defaults are used when omitted"
OVERRIDE_HELP = "config overrides as key.sub=value, e.g. model.n_layer=4 train.lr=3e-4"


def _load(args: argparse.Namespace, schema: str = "PretrainConfig"):
    """The command's config: ``schema`` names its class in ``orchestration.config`` (imported lazily)."""
    from orchestration import config

    return load_config(args.config, args.overrides, schema=getattr(config, schema))


# Options a command declares outside this file as plain int/str (deploy/serve.py), checked here with the
# same argparse types before the command starts Ray; they can move into that parser as `type=`.
OPTION_CHECKS: dict[str, dict[str, Callable[[str], object]]] = {
    "serve": {
        "--port": port_number,
        "--host": host_name,
        "--max-batch-size": positive_int,
        "--batch-wait-timeout-s": non_negative_float,
        "--max-tokens-cap": positive_int,
        "--num-replicas": positive_int,
        "--device": torch_device,
    },
}


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The command's ``OPTION_CHECKS``, reported as argparse reports a bad value: one line naming the
    option, exit status 2."""
    for option, check in OPTION_CHECKS.get(args.command, {}).items():
        try:
            check(str(getattr(args, option.lstrip("-").replace("-", "_"))))
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument {option}: {err}")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)


def cmd_model_info(args: argparse.Namespace) -> int:
    from model.flops import model_info_text, preset_size_table_text

    if args.list:
        print(preset_size_table_text())
        return 0
    # --preset is model.preset: the preset fills the shape, explicit model.* keys still win.
    preset = [f"model.preset={args.preset}"] if args.preset else []
    cfg = load_config(args.config, [*args.overrides, *preset])
    print(
        model_info_text(
            cfg.model,
            micro_batch_size=args.micro_batch_size,
            seq_len=args.seq_len or cfg.model.block_size,
            num_workers=args.num_workers,
            precision=args.precision,
            offload_optimizer=args.offload_optimizer,
            activation_checkpointing=cfg.train.activation_checkpointing,
            checkpoint_every=cfg.train.activation_checkpointing_every,
        )
    )
    if args.measure:
        _measure_model_memory(args, cfg)
    return 0


def _measure_model_memory(args: argparse.Namespace, cfg) -> None:
    """``model-info --measure``: the stages trained for real on this machine's CPU or GPUs."""
    import dataclasses

    import torch

    from orchestration.train.measure_memory import measured_rows

    train = dataclasses.replace(
        cfg.train,
        num_workers=args.num_workers,
        min_workers=None,
        micro_batch_size=args.micro_batch_size,
        grad_accum_steps=None,
        global_batch_size=None,
        precision=args.precision,
        use_gpu=torch.cuda.is_available(),
        offload_optimizer=False,
        offload_params=False,
    )
    seq_len = args.seq_len or cfg.model.block_size
    for line in measured_rows(cfg.model, train, seq_len, args.stages, offload_optimizer=args.offload_optimizer):
        print(line, flush=True)


def cmd_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.prepare import prepare
    from data_pipeline.sources import resolve_mixture, resolve_sources
    from orchestration.config import COMMAND_OF, schema_of
    from orchestration.runtime import init_ray

    cfg = load_config(args.config, args.overrides, schema=schema_of(args.config))
    if not hasattr(cfg, "data"):
        raise ConfigError(
            f"{args.config} has no data section to prepare (it is a `{COMMAND_OF[type(cfg)]}` config); pass a "
            "train, finetune, tune or scaling config"
        )
    # a corpus that is not there is refused before Ray starts
    resolve_mixture(cfg.data.mixture) if cfg.data.mixture else resolve_sources(cfg.data.sources)
    init_ray()
    prepare(cfg.data)
    return 0


def _report(path: str, cfg) -> None:
    """train, tune and scaling end by writing the report of what they produced."""
    from orchestration.report.write import write_report

    written = write_report(path, endpoint_url=cfg.train.endpoint_url)
    print(f"[raylm] report: {written['report.html']}")


# command -> (runner "module:function", its config schema, the summary key naming the directory it wrote)
RUNS = {
    "train": ("orchestration.train.driver:run_training", "PretrainConfig", "run_dir"),
    "finetune": ("orchestration.finetune.driver:run_finetune", "FinetuneRunConfig", "run_dir"),
    "tune": ("orchestration.sweeps.tune:run_tune", "TuneRunConfig", "tune_dir"),
    "scaling": ("orchestration.sweeps.scaling:run_scaling", "ScalingRunConfig", "sweep_dir"),
}


def cmd_run(args: argparse.Namespace) -> int:
    """train, finetune, tune, scaling: load the command's config, run it, write its report."""
    import importlib

    runner, schema, out_key = RUNS[args.command]
    module, function = runner.split(":")
    cfg = _load(args, schema)
    if args.command == "finetune":
        check_finetune_data(cfg.finetune)
    branch = {"branch_from": args.branch_from} if getattr(args, "branch_from", None) else {}
    summary = getattr(importlib.import_module(module), function)(cfg, resume=not args.no_resume, **branch)
    _report(summary[out_key], cfg)
    return 0


def cmd_baseline_ngram(args: argparse.Namespace) -> int:
    from orchestration.evaluate.baselines import evaluate_ngram, train_ngram

    fitted = train_ngram(args.data, args.out, n=args.n, discount=args.discount, endpoint_url=args.endpoint_url)
    scores = evaluate_ngram(
        args.out, args.data, split="val", max_sequences=args.max_sequences, endpoint_url=args.endpoint_url
    )
    print(
        f"{args.n}-gram Kneser-Ney on {fitted['train_tokens']:,} train tokens ({fitted['fit_s']:.1f} s): val loss "
        f"{scores['loss']:.4f}  perplexity {scores['perplexity']:.2f}  bits/byte {scores['bits_per_byte']:.4f}"
    )
    print(f"model written to {args.out}")
    return 0


def cmd_baseline_compare(args: argparse.Namespace) -> int:
    from orchestration.evaluate.baselines import compare_baselines, markdown_table
    from orchestration.report.write import write_report

    result = compare_baselines(
        args.data,
        transformer_checkpoint=args.transformer,
        lstm_checkpoint=args.lstm,
        gru_checkpoint=args.gru,
        rnn_checkpoint=args.rnn,
        ngram_dir=args.ngram or None,
        out_dir=args.out,
        max_sequences=args.max_sequences,
        endpoint_url=args.endpoint_url,
    )
    print(markdown_table(result))
    print(f"[raylm] report: {write_report(args.out)['report.html']}")
    return 0


def cmd_tokenizers(args: argparse.Namespace) -> int:
    from orchestration.report.write import write_report
    from orchestration.sweeps.tokenizer_study import markdown_table, run_tokenizer_study

    result = run_tokenizer_study(_load(args, "TokenizerStudyRunConfig"), args.out)
    print(markdown_table(result))
    print(f"[raylm] tokenizer study: {args.out}; report: {write_report(args.out)['report.html']}")
    return 0


def cmd_mup_check(args: argparse.Namespace) -> int:
    from orchestration.report.write import write_report
    from orchestration.sweeps.mup_check import MupCheckConfig, MupCheckError, run_mup_check

    # only the options the user set: MupCheckConfig holds the defaults
    options = {
        "widths": args.widths and tuple(args.widths),
        "base_width": args.base_width,
        "steps": args.steps,
        "lr": args.lr,
        "seeds": args.seeds,
        "device": args.device,
    }
    try:
        cfg = MupCheckConfig(**{k: v for k, v in options.items() if v is not None})
    except MupCheckError as err:  # widths that give no slope or do not fit the heads
        print(f"raylm: mup-check: {err}", file=sys.stderr)
        return 2
    result = run_mup_check(cfg, args.out)
    print(
        f"[raylm] max |slope| of log activation scale vs log width at step {result['steps']}: "
        f"sp {result['sp_max_abs_slope']:.3f}, mup {result['mup_max_abs_slope']:.3f} ({result['wall_s']:.0f} s)"
    )
    print(f"[raylm] mup check: {args.out}; report: {write_report(args.out)['report.html']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestration.report.write import write_report

    for uri in write_report(args.path, out=args.out, endpoint_url=args.endpoint_url).values():
        print(f"wrote {uri}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from orchestration.evaluate.suites import format_summary, run_eval_suite

    # Only the options the user set: each suite keeps its own defaults, and an option that no
    # chosen suite takes is an error rather than silently ignored.
    options = {
        "split": args.split,
        "max_sequences": args.max_sequences,
        "batch_size": args.batch_size,
        "num_items": args.num_items,
        "num_options": args.num_options,
        "seed": args.seed,
        "prompt_tokens": args.prompt_tokens,
        "continuation_tokens": args.continuation_tokens,
        "templates_path": args.templates,
        "endpoint_url": args.endpoint_url,
        "device": args.device,
    }
    result = run_eval_suite(
        args.suite, args.checkpoint, args.data, **{k: v for k, v in options.items() if v is not None}
    )
    print(format_summary(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    if "privacy" in result["suites"]:
        _privacy_into_run_report(result["checkpoint"], result["suites"]["privacy"], args.endpoint_url)
    return 0


def _privacy_into_run_report(checkpoint_uri: str, privacy: dict, endpoint_url) -> None:
    """The audit into the checkpoint's run directory and its report, when it lies in one."""
    from orchestration.artifacts import PRIVACY_AUDIT_FILE, RUN_FILE, RunDir
    from orchestration.report.write import write_report

    run = RunDir.at(checkpoint_uri.rsplit("/", 1)[0], endpoint_url)
    if not run.has(RUN_FILE):
        print(f"[raylm] {run.uri} is not a training run directory: the audit is only in this output")
        return
    print(f"wrote {run.write_json(PRIVACY_AUDIT_FILE, privacy)}")
    print(f"wrote {write_report(run.uri, endpoint_url=endpoint_url)['report.html']} (with the privacy audit)")


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestration.evaluate.sample import generate_text

    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        text = generate_text(
            args.checkpoint,
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=seed,
            endpoint_url=args.endpoint_url,
            device=args.device or "cpu",
        )
        print(f"--- sample {i + 1} ---\n{args.prompt}{text}")
    return 0


def cmd_interpret(args: argparse.Namespace) -> int:
    from orchestration.evaluate.interpret import run_interpret

    result = run_interpret(
        args.checkpoint,
        args.prompt,
        args.out,
        top_k=args.top_k,
        ig_steps=args.ig_steps,
        probe=args.probe,
        probe_windows=args.probe_windows,
        endpoint_url=args.endpoint_url,
        device=args.device or "cpu",
    )
    ig = result["integrated_gradients"]
    print(f"[interpret] {result['checkpoint']}: {len(result['tokens'])} prompt tokens")
    print(f"[interpret] explicit attention vs SDPA: max |diff| {result['attention_explicit_vs_sdpa_max_abs_diff']:.2e}")
    print(f"[interpret] logit lens last layer vs logits: max |diff| {result['logit_lens_last_layer_max_abs_diff']:.2e}")
    print(
        f"[interpret] integrated gradients for next token {ig['target_text']!r}: completeness error "
        f"{ig['completeness_error']:.2e} ({ig['steps']} steps)"
    )
    for row in result.get("probes", {}).get("layers", []):
        print(
            f"[interpret] probe layer {row['layer']}: accuracy {row['accuracy']:.3f}, control "
            f"{row['control_accuracy']:.3f}, selectivity {row['selectivity']:+.3f}"
        )
    print(f"[interpret] wrote {', '.join(result['files'])}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestration.demo import DEFAULT_CONFIG, run_demo

    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    run_demo(cfg, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from orchestration.deploy.export import export_checkpoint

    result = export_checkpoint(
        args.checkpoint, args.out, fmt=args.format, lora=args.lora, endpoint_url=args.endpoint_url
    )
    print(f"exported step {result['step']} of {result['checkpoint']} as {result['format']} to {result['out_dir']}:")
    for name in result["files"]:
        print(f"  {name}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from orchestration.deploy.quantize import quantize_checkpoint

    quantize_checkpoint(
        args.checkpoint,
        args.out,
        scheme=args.scheme,
        group_size=args.group_size,
        data=args.data,
        max_sequences=args.max_sequences,
        evaluate=not args.no_eval,
        endpoint_url=args.endpoint_url,
    )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from orchestration.deploy.prune import PruneError, prune_checkpoint

    try:
        prune_checkpoint(
            args.checkpoint,
            args.out,
            heads=args.heads,
            neurons=args.neurons,
            data=args.data,
            calibration_batches=args.calibration_batches,
            endpoint_url=args.endpoint_url,
        )
    except PruneError as err:  # fractions that do not fit this checkpoint's shape
        print(f"raylm: prune: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from orchestration.artifacts import RunDir, request_stop

    uri = request_stop(RunDir.at(args.run, args.endpoint_url))
    print(f"[raylm] wrote {uri}: the run saves a checkpoint at its next log interval and ends")
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from orchestration.artifacts import RunDir
    from orchestration.checkpoint_format import MODEL_FILE
    from orchestration.train.checkpoint import ensure_consolidated

    # args.checkpoint: a complete checkpoint directory (main resolved a run directory to its newest)
    if not ensure_consolidated(RunDir.at(args.checkpoint, args.endpoint_url)):
        print(f"{args.checkpoint} already has {MODEL_FILE}")
    return 0


def _add_run_parser(sub, name: str, *, help: str, description: str, no_resume_help: str) -> None:
    """A command that runs a training job (``RUNS``): a config, overrides and --no-resume."""
    parser = sub.add_parser(name, help=help, description=description)
    _add_config_args(parser)
    parser.add_argument("--no-resume", action="store_true", help=no_resume_help)
    parser.set_defaults(func=cmd_run)


def _add_storage_command(sub, name: str, func, *, help: str, description: str, target: tuple[str, str]) -> None:
    """A command on one directory or URI (``target``: its argument name and help) with --endpoint-url."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.add_argument(target[0], help=target[1])
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs")
    parser.set_defaults(func=func)


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory/URI (checkpoint_NNNNNN) or a run directory (its latest checkpoint)",
    )
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs (MinIO, R2)")
    parser.add_argument(
        "--device", type=torch_device, default=None, help="torch device to run on, e.g. cpu, cuda (default cpu)"
    )


def _add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        help=f"tokens to generate per sample (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature", type=temperature, default=0.8, help="0 = greedy; higher = more random (default 0.8)"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=50, help="sample among the k most likely tokens (default 50)"
    )
    parser.add_argument("--top-p", type=probability, default=None, help="nucleus sampling: smallest set with mass >= p")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylm",
        description="Build GPT-style language models from scratch and train them on Ray + DeepSpeed.",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also show worker logs and Ray's INFO lines (default: raylm's progress lines only)",
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
    info.add_argument("--list", action="store_true", help="print every preset's shape and parameter counts")
    _add_config_args(info)
    info.add_argument(
        "--micro-batch-size", type=positive_int, default=8, help="sequences per GPU per micro step (default 8)"
    )
    info.add_argument(
        "--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the model's block_size)"
    )
    info.add_argument(
        "--num-workers", type=positive_int, default=8, help="data-parallel GPUs sharing ZeRO state (default 8)"
    )
    info.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default="bf16", help="training precision (default bf16)"
    )
    info.add_argument("--offload-optimizer", action="store_true", help="ZeRO optimizer state offloaded to CPU memory")
    info.add_argument(
        "--measure",
        action="store_true",
        help="also train each stage 2 steps on random tokens with --num-workers local processes (this "
        "machine's GPUs, one each, or its CPU) and print each rank's measured peak beside the estimate",
    )
    info.add_argument(
        "--stages", type=zero_stages, default="0,1,2,3", help="ZeRO stages --measure trains (default 0,1,2,3)"
    )
    info.set_defaults(func=cmd_model_info)

    prep = sub.add_parser(
        "prepare",
        help="raw corpus -> cleaned, tokenized, packed train/val shards + manifest (Ray Data)",
        description="Read the corpus under data.sources (s3://, gs://, abfs://, local paths/globs, or the "
        "embedded 'shakespeare'), clean it, train or load a BPE tokenizer, tokenize on every CPU, "
        "pack data.output.seq_len+1-token sequences and write Parquet shards, the tokenizer and "
        "manifest.json to data.output.uri.",
    )
    _add_config_args(prep)
    prep.set_defaults(func=cmd_prepare)

    _add_run_parser(
        sub,
        "train",
        help="pretrain with Ray Train + DeepSpeed ZeRO on prepared shards",
        description="Pretrain the model on train.data (a manifest from `raylm prepare`) with train.num_workers "
        "Ray Train workers running DeepSpeed. Writes <train.storage_path>/<train.run_name>/ "
        "(config.yaml, metrics.jsonl, checkpoints) and resumes a run name that has a checkpoint.",
        no_resume_help="fail if the run directory exists instead of resuming from its latest checkpoint",
    )
    sub.choices["train"].add_argument(
        "--branch-from",
        metavar="CHECKPOINT",
        help="start a new run (a train.run_name with no checkpoint yet) from another run's complete checkpoint "
        "directory: its weights, optimizer, step and data position, with a new train.seed or train.data "
        "allowed (a resume keeps them)",
    )

    _add_run_parser(
        sub,
        "finetune",
        help="fine-tune a checkpoint: continued pretraining, classification head or SFT; full/partial/LoRA",
        description="Start from finetune.checkpoint and train on finetune.data through Ray Train + DeepSpeed "
        "(finetune.task lm | classification | sft | distill; finetune.mode full | partial | lora), with early "
        "stopping on val loss. Scores the pretrained and the best fine-tuned checkpoint on the same "
        "val rows and writes finetune_summary.json, finetune.md and the report to the run dir.",
        no_resume_help="fail if the run directory exists instead of resuming from its latest checkpoint",
    )

    ev = sub.add_parser(
        "eval",
        help="loss / perplexity / bits-per-byte, continuation BLEU+ROUGE, multiple choice, bias probe, privacy audit",
        description="Evaluate a checkpoint (loaded without DeepSpeed). Suites: lm = loss, perplexity and "
        "bits-per-byte; continuation = BLEU and ROUGE of greedy continuations of held-out text; "
        "mc = zero-shot multiple choice (cloze of held-out lines) with accuracy and standard error; "
        "bias = a templated log-likelihood probe (a probe, not a certification); privacy = exposure of planted "
        "canaries, membership inference and extraction of planted passages (data.audit; also written to the "
        "run directory and its report); all = lm, continuation, mc and bias. Without "
        "--data, held-out text is the val split of the manifest the checkpoint was trained on (a fine-tune on "
        "task rows or an export: that of the checkpoint it came from), named in the output.",
    )
    _add_checkpoint_args(ev)
    ev.add_argument(
        "--data",
        default=None,
        help="a manifest.json URI from `raylm prepare`, or a UTF-8 text file (all suites but bias; default: "
        "the --split of the manifest the checkpoint was trained on)",
    )
    ev.add_argument(
        "--suite",
        default="lm",
        choices=["lm", "continuation", "mc", "bias", "privacy", "all"],
        help="what to evaluate (default lm)",
    )
    ev.add_argument("--split", default=None, choices=["train", "val"], help="manifest split to score (default val)")
    ev.add_argument("--max-sequences", type=positive_int, default=None, help="sequences to read at most (default 256)")
    ev.add_argument(
        "--batch-size", type=positive_int, default=None, help="sequences per forward pass (default 8; privacy 256)"
    )
    ev.add_argument("--num-items", type=positive_int, default=None, help="continuation / mc items (defaults 50 / 200)")
    ev.add_argument("--num-options", type=positive_int, default=None, help="mc options per item (default 4)")
    ev.add_argument("--seed", type=non_negative_int, default=None, help="mc item sampling / bootstrap seed (default 0)")
    ev.add_argument(
        "--prompt-tokens",
        type=positive_int,
        default=None,
        help="continuation / extraction prompt length (default 32; privacy 16)",
    )
    ev.add_argument(
        "--continuation-tokens",
        type=positive_int,
        default=None,
        help="continuation length scored (default 32; privacy 16)",
    )
    ev.add_argument("--templates", default=None, help="bias templates file (default configs/eval/bias_templates.yaml)")
    ev.add_argument("--out", type=output_file, default=None, help="also write the full result as JSON to this file")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser(
        "generate",
        help="sample text from a checkpoint (GPT KV cache or LSTM state; greedy/temperature/top-k/top-p)",
        description="Continue a prompt with a trained checkpoint; stops at end-of-text.",
    )
    _add_checkpoint_args(gen)
    gen.add_argument("--prompt", required=True, help="text to continue")
    _add_sampling_args(gen, max_new_tokens=200)
    gen.add_argument("--num-samples", type=positive_int, default=1, help="independent samples to draw (default 1)")
    gen.add_argument("--seed", type=non_negative_int, default=None, help="random seed for reproducible samples")
    gen.set_defaults(func=cmd_generate)

    interp = sub.add_parser(
        "interpret",
        help="look inside a GPT checkpoint on a prompt: attention maps, logit lens, attributions, probes",
        description="Writes OUT/index.html (self-contained) and OUT/interpret.json: attention per layer and "
        "head (explicit path, checked against SDPA), the logit lens (last layer checked against the "
        "logits), integrated gradients on the token embeddings (completeness error) and per-layer linear "
        "probes for First Folio vs modern spelling with a control task.",
    )
    _add_checkpoint_args(interp)
    interp.add_argument("--prompt", required=True, help="text to look at")
    interp.add_argument("--out", type=output_dir, default="interpret", help="directory to write (default interpret)")
    interp.add_argument("--top-k", type=positive_int, default=5, help="logit-lens tokens kept per position")
    interp.add_argument("--ig-steps", type=positive_int, default=64, help="integrated-gradients steps (default 64)")
    interp.add_argument(
        "--probe", choices=["folio", "none"], default="folio",
        help="folio: probe First Folio vs modern spelling on the embedded plays (default); none: skip",
    )  # fmt: skip
    interp.add_argument("--probe-windows", type=positive_int, default=96, help="probe token windows, both labels")
    interp.set_defaults(func=cmd_interpret)

    demo = sub.add_parser(
        "demo",
        help="prepare + train + eval + generate on the embedded Shakespeare corpus, local Ray",
        description="The end-to-end job on the embedded default (configs/shakespeare.yaml): prepare the "
        "Shakespeare corpus, pretrain with Ray Train + DeepSpeed, evaluate, sample, and print a "
        "summary with the run directory. About 5 minutes on 2 CPU cores.",
    )
    _add_config_args(demo)
    demo.add_argument("--prompt", default="ROMEO:", help="prompt for the closing sample (default 'ROMEO:')")
    demo.add_argument(
        "--max-new-tokens", type=positive_int, default=200, help="length of the closing sample (default 200)"
    )
    demo.set_defaults(func=cmd_demo)

    _add_run_parser(
        sub,
        "tune",
        help="Ray Tune hyperparameter search (ASHA, optional Optuna/HyperOpt) over raylm train",
        description="Search the tune.search_space of a config (keys are config paths, e.g. train.lr: "
        "{loguniform: [1e-4, 1e-2]}) with Ray Tune: each trial is a raylm training run, ASHA stops "
        "weak trials on validation loss, an existing experiment is restored. Writes "
        "tune_results.json, best_config.yaml (ready for `raylm train --config`) and a report.",
        no_resume_help="fail if the experiment exists instead of restoring it",
    )

    _add_run_parser(
        sub,
        "scaling",
        help="scaling-law sweep (size x tokens grid, IsoFLOP profiles, WSD branches) and fits",
        description="Run the scaling.* sweep of a config: model sizes from a width/depth ladder trained at token "
        "budgets (grid) or compute budgets (IsoFLOP), optionally as warmup-stable-decay runs with "
        "decay branches; every point is a Ray Tune trial, finished points are reused. Fits IsoFLOP "
        "parabolas and L(N, D) = E + A/N^alpha + B/D^beta with bootstrap CIs; writes "
        "scaling_points.json, scaling_fit.json and a report.",
        no_resume_help="fail if the sweep directory already exists",
    )

    baseline = sub.add_parser(
        "baseline",
        help="n-gram (Kneser-Ney) baseline and n-gram vs LSTM vs transformer comparison",
        description="Baselines on the same shards and tokenizer: fit an interpolated modified Kneser-Ney "
        "n-gram model, or compare n-gram / LSTM / transformer on validation loss, perplexity and "
        "bits-per-byte. Train the LSTM with `raylm train --config configs/lstm_shakespeare.yaml` (add model.arch=gru "
        "or model.arch=rnn, with a new train.run_name, for the GRU and the plain RNN).",
    )
    kinds = baseline.add_subparsers(dest="baseline", metavar="KIND")
    kinds.required = True
    ngram = kinds.add_parser(
        "ngram",
        help="fit and evaluate an n-gram model",
        description="Fit an n-gram model on a manifest's train split; score its val split.",
    )
    ngram.add_argument("--data", required=True, help="manifest.json URI from `raylm prepare`")
    ngram.add_argument("--out", type=output_dir, required=True, help="directory to write the model to")
    ngram.add_argument("--n", type=ngram_order, default=3, help="order, 1-5 (default 3)")
    ngram.add_argument(
        "--discount",
        type=probability,
        default=None,
        help="one fixed KN discount (default: modified KN's three estimated discounts per order)",
    )
    compare = kinds.add_parser(
        "compare",
        help="n-gram vs RNN / GRU / LSTM vs transformer on the same val windows",
        description="Score baselines and a transformer on the same validation windows; "
        "writes baselines.json and baselines.md.",
    )
    compare.add_argument("--data", required=True, help="manifest.json URI from `raylm prepare`")
    compare.add_argument("--transformer", required=True, help="transformer checkpoint or run directory")
    compare.add_argument("--lstm", default=None, help="LSTM checkpoint or run directory (model.arch=lstm)")
    compare.add_argument("--gru", default=None, help="GRU checkpoint or run directory (model.arch=gru)")
    compare.add_argument("--rnn", default=None, help="plain tanh RNN checkpoint or run directory (model.arch=rnn)")
    compare.add_argument("--ngram", action="append", default=[], help="n-gram model directory (repeatable)")
    compare.add_argument("--out", type=output_dir, required=True, help="directory for baselines.json / baselines.md")
    for kind in (ngram, compare):
        kind.add_argument("--max-sequences", type=positive_int, default=256, help="val sequences scored (default 256)")
        kind.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs")
    ngram.set_defaults(func=cmd_baseline_ngram)
    compare.set_defaults(func=cmd_baseline_compare)

    tokenizers = sub.add_parser(
        "tokenizers",
        help="tokenizer study: bits per byte of byte-level, BPE and Unigram at equal training compute",
        description="Train each tokenizer of study.tokenizers (byte, bpe:<vocab>, unigram:<vocab>) on the same "
        "train text, the same model on each one's tokens for study.train_flops, and score every model in bits "
        "per byte and characters per token on the same val text. In this process (no Ray). Writes "
        "tokenizer_study.json, tokenizer_study.md, config.yaml and a report to --out.",
    )
    _add_config_args(tokenizers)
    tokenizers.add_argument(
        "--out", type=output_dir, default="runs/tokenizer-study", help="output directory (default runs/tokenizer-study)"
    )
    tokenizers.set_defaults(func=cmd_tokenizers)

    mup = sub.add_parser(
        "mup-check",
        help="μP coordinate check: activation scale vs width under sp and μP after a few AdamW steps",
        description="Train a 2-layer GPT at each of --widths under sp and μP (mup_base_width = --base-width) for "
        "--steps AdamW steps at one --lr on byte-level Shakespeare, record every layer's mean |activation| at "
        "every step (averaged over --seeds) and fit the slope of log scale vs log width per layer, as the mup "
        "package's coordinate check does. μP's lines should be flat, sp's grow with width. In this process "
        "(no Ray). Writes mup_check.json and a report to --out.",
    )
    mup.add_argument(
        "--out", type=output_dir, default="runs/mup-check", help="output directory (default runs/mup-check)"
    )
    mup.add_argument(
        "--widths",
        type=positive_int,
        nargs="+",
        help="model widths (n_embd), at least two (default 64 128 256 512 1024)",
    )
    mup.add_argument(
        "--base-width", type=positive_int, default=None, help="μP's mup_base_width (default: the smallest width)"
    )
    mup.add_argument("--steps", type=positive_int, help="AdamW steps per model (default 5)")
    mup.add_argument("--lr", type=non_negative_float, help="AdamW LR at every width, before μP's scale (default 0.01)")
    mup.add_argument("--seeds", type=positive_int, help="seeds averaged per width (default 3)")
    mup.add_argument("--device", type=torch_device, help="torch device, e.g. cpu, cuda (default cpu)")
    mup.set_defaults(func=cmd_mup_check)

    report = sub.add_parser(
        "report",
        help="HTML + Markdown + JSON report of a run, fine-tune, scaling sweep, tune or baselines directory",
        description="Render a self-contained report.html (plots embedded), report.md and results.json for a "
        "run directory (metrics.jsonl + config.yaml; a fine-tune adds its before/after table), a "
        "scaling sweep (scaling_points.json), a tune experiment (tune_results.json) or a baseline "
        "comparison (baselines.json).",
    )
    report.add_argument("path", help="the run, sweep, tune or baselines directory (local or s3://)")
    report.add_argument("--out", type=output_dir, default=None, help="where to write the report (default: inside PATH)")
    report.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// paths")
    report.set_defaults(func=cmd_report)

    export = sub.add_parser(
        "export",
        help="a checkpoint as a Hugging Face transformers folder (or raylm's own safetensors format)",
        description="Export a consolidated checkpoint. --format hf writes a folder that AutoModelForCausalLM and "
        "AutoTokenizer load (config.json, model.safetensors, generation_config.json, tokenizer.json) in the "
        "standard architecture that computes the model exactly: GPT-2 shapes -> GPT2LMHeadModel, "
        "RoPE+SwiGLU+RMSNorm (ladder-*) -> LlamaForCausalLM, RoPE+GELU+LayerNorm (shakespeare) -> "
        "Starcoder2ForCausalLM, RoPE+GELU+RMSNorm -> ArceeForCausalLM, RoPE+SwiGLU+LayerNorm without biases -> "
        "StableLmForCausalLM. Other shapes get an error saying why; --format raylm writes raylm's own "
        "self-describing checkpoint.",
    )
    export.add_argument("--checkpoint", required=True, help="a checkpoint directory/URI or a run directory")
    export.add_argument("--out", type=output_dir, required=True, help="output directory")
    export.add_argument("--format", choices=["hf", "raylm"], default="hf", help="output format (default hf)")
    export.add_argument(
        "--lora",
        choices=["merged", "separate"],
        default="merged",
        help="a LoRA fine-tune: adapters merged into the weights (default), or the base model plus "
        "the adapters in OUT/adapter/ (hf: PEFT format)",
    )
    export.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs")
    export.set_defaults(func=cmd_export)

    quant = sub.add_parser(
        "quantize",
        help="a checkpoint with weight-only int8 or int4 weights, loadable by eval, generate, serve, export",
        description="Weight-only quantization: int8 (symmetric, one scale per output channel) or int4 "
        "(asymmetric, groups of --group-size columns, packed two per byte) for every linear layer and the "
        "token embedding (a tied embedding and head share one quantized matrix); norms stay fp32. Writes a "
        "complete checkpoint (model.quantized.safetensors + quantization.json) that eval, generate, serve "
        "and `export --format raylm` load; prints the bytes before and after and, unless --no-eval, the val "
        "loss of the fp32 and the quantized model on the same windows.",
    )
    quant.add_argument("--checkpoint", required=True, help="a checkpoint directory/URI or a run directory")
    quant.add_argument("--scheme", choices=["int8", "int4"], required=True, help="weight format")
    quant.add_argument(
        "--group-size", type=int, choices=[32, 64, 128, 256], default=32, help="int4 columns per scale (default 32)"
    )
    quant.add_argument("--out", type=output_dir, required=True, help="output directory (the quantized checkpoint)")
    quant.add_argument(
        "--data", default=None, help="manifest or text file to compare losses on (default: the checkpoint's own)"
    )
    quant.add_argument(
        "--max-sequences", type=positive_int, default=256, help="val windows to compare on (default 256)"
    )
    quant.add_argument("--no-eval", action="store_true", help="skip the fp32-vs-quantized val loss comparison")
    quant.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs")
    quant.set_defaults(func=cmd_quantize)

    prune = sub.add_parser(
        "prune",
        help="a smaller checkpoint: the least important attention heads and MLP hidden units removed",
        description="Structured pruning: scores every attention head and MLP hidden unit by first-order Taylor "
        "importance on train windows (never val), removes the lowest --heads / --neurons fraction in every "
        "layer (whole KV groups under GQA; at least one head and unit stay) and writes a complete checkpoint of "
        "the smaller shape (fewer heads of the same width, a narrower MLP; same n_embd) that eval, generate, "
        "serve, export and finetune load. Prints params and file bytes before and after; recover the loss with "
        "`raylm finetune finetune.checkpoint=OUT finetune.task=lm ...`.",
    )
    prune.add_argument("--checkpoint", required=True, help="an fp32 checkpoint directory/URI or a run directory")
    prune.add_argument(
        "--heads", type=pruning_fraction, default=0.0, help="fraction of each layer's heads to remove (default 0)"
    )
    prune.add_argument(
        "--neurons",
        type=pruning_fraction,
        default=0.0,
        help="fraction of each layer's MLP hidden units to remove (default 0)",
    )
    prune.add_argument("--out", type=output_dir, required=True, help="output directory (the pruned checkpoint)")
    prune.add_argument(
        "--data",
        default=None,
        help="manifest (its train split) or text file to score on (default: the checkpoint's own)",
    )
    prune.add_argument(
        "--calibration-batches",
        type=positive_int,
        default=16,
        help="batches of 8 train windows to score importance on (default 16)",
    )
    prune.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs")
    prune.set_defaults(func=cmd_prune)

    _add_storage_command(
        sub,
        "consolidate",
        cmd_consolidate,
        help="write a checkpoint's model.safetensors from its engine files",
        description="Checkpoints a run saves before its end hold only the engine's sharded state (each rank "
        "its own files: no save stalls the step loop gathering the whole model); the run's last save also "
        "writes model.safetensors. This writes it for any other checkpoint, beside its files, streaming "
        "tensor by tensor. eval, generate, export, serve and finetune do the same by themselves when they "
        "load such a checkpoint.",
        target=("checkpoint", "a checkpoint directory/URI or a run directory (its newest)"),
    )
    _add_storage_command(
        sub,
        "stop",
        cmd_stop,
        help="ask a running training run to save a checkpoint at its next log interval and end",
        description="Writes stop_requested into the run directory. Every rank ends at the run's next log "
        "interval, after a checkpoint with consolidated weights, and the driver exits normally; re-running "
        "the same command resumes from that checkpoint (the request is removed then). Stopping the Ray Job "
        "or pressing Ctrl-C instead loses every step since the last checkpoint.",
        target=("run", "the run directory (local or s3:// / gs:// / abfs://), or its run family"),
    )

    from orchestration.deploy.serve import add_serve_parser
    from orchestration.deploy.submit import add_submit_parser

    add_serve_parser(sub)  # `raylm serve --checkpoint URI`: Ray Serve HTTP generate endpoint

    add_submit_parser(sub)  # `raylm submit [...] -- <command ...>`: any raylm command as a Ray Job
    return parser


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input (a URI, a manifest, a checkpoint, a directory), imported only
    when something failed so `raylm --help` stays fast."""
    from data_pipeline.manifest import ManifestMismatchError
    from data_pipeline.storage import DataSourceError
    from data_pipeline.tokenizer import TokenizerError
    from orchestration.checkpoint_format import CheckpointError
    from orchestration.deploy.export import ExportError
    from orchestration.evaluate.data_source import EvalError
    from orchestration.report.render import ReportError

    # and a path or address the command was given that the system refused (it names which)
    os_errors = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
    raylm_errors = (ManifestMismatchError, DataSourceError, TokenizerError, CheckpointError, ReportError, ExportError)
    return *raylm_errors, EvalError, *os_errors, ConnectionError


def _find_checkpoint(args: argparse.Namespace) -> None:
    """eval, generate, export, consolidate, serve: the checkpoint argument resolved (a run directory ->
    its newest complete checkpoint) before the command starts Ray or loads a model, so a wrong path is
    refused at once."""
    from orchestration.evaluate.load import resolve_checkpoint

    args.checkpoint = resolve_checkpoint(args.checkpoint, args.endpoint_url)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    if args.command != "submit":  # before any command imports ray; a submitted job joins its cluster
        keep_local_ray_on_loopback()
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # before Ray starts: its processes inherit it
    else:  # Ray Data reads its logging config when it is first imported: console at WARNING
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING_CONFIG))
    try:
        if getattr(args, "checkpoint", None):
            _find_checkpoint(args)
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
