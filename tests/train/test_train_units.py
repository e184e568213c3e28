"""Fast checks of the training pieces that need no Ray Train launch: config, schedules, DeepSpeed
config, param groups, MFU math, the console line."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from orchestration.config import ConfigError, load_config
from orchestration.train.engine import deepspeed_config, param_groups
from orchestration.train.schedule import lr_at
from orchestration.train.throughput import peak_flops_per_device, throughput


def test_batch_arithmetic_is_derived_and_checked():
    cfg = load_config(None, ["train.micro_batch_size=4", "train.num_workers=2", "train.global_batch_size=32"])
    assert cfg.train.grad_accum_steps == 4
    cfg = load_config(None, ["train.micro_batch_size=4", "train.num_workers=2", "train.grad_accum_steps=3"])
    assert cfg.train.global_batch_size == 24
    with pytest.raises(ConfigError, match=r"global_batch_size \(30\) must be a multiple of .* = 8"):
        load_config(None, ["train.micro_batch_size=4", "train.num_workers=2", "train.global_batch_size=30"])
    with pytest.raises(ConfigError, match="!= global_batch_size"):
        load_config(
            None,
            [
                "train.micro_batch_size=4",
                "train.num_workers=2",
                "train.global_batch_size=32",
                "train.grad_accum_steps=2",
            ],
        )


def test_bad_zero_stage_fp16_on_cpu_and_offload_fail_at_load():
    with pytest.raises(ConfigError, match=r"train.zero_stage.*one of 0, 1, 2, 3"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="fp16.*not supported on CPU"):
        load_config(None, ["train.precision=fp16"])
    assert load_config(None, ["train.precision=fp16", "train.use_gpu=true"]).train.precision == "fp16"
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        load_config(None, ["train.offload_params=true", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="exactly one of max_steps and max_tokens"):
        load_config(None, ["train.max_tokens=1000"])
    cfg = load_config(
        None, ["train.max_steps=null", "train.max_tokens=100000", "train.micro_batch_size=4", "train.num_workers=2"]
    )
    assert cfg.train.total_steps(seq_len=128) == math.ceil(100000 / (8 * 128))


def test_missing_manifest_fails_before_any_worker(tmp_path):
    from orchestration.train.driver import validate

    cfg = load_config(None, [f"train.data={tmp_path}/nope/manifest.json"])
    with pytest.raises(ConfigError, match=r"train.data = .*nope/manifest.json.*raylm prepare"):
        validate(cfg)


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 50 / 99)))
    assert lr_at(109, **kw) == pytest.approx(0.1)
    cos = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    wsd = dict(kw, schedule="wsd", decay_fraction=0.2)  # decays over the last 22 steps
    assert lr_at(87, **wsd) == 1.0 and lr_at(88, **wsd) == 1.0
    assert 0.1 < lr_at(99, **wsd) < 1.0 and lr_at(109, **wsd) == pytest.approx(0.1)


def test_deepspeed_config_follows_ours():
    cfg = load_config(
        None,
        [
            "train.zero_stage=3",
            "train.offload_params=true",
            "train.offload_optimizer=true",
            "train.precision=bf16",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=3",
            "train.num_workers=2",
            "train.grad_clip=0.5",
        ],
    ).train
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in ds and "scheduler" not in ds  # torch AdamW passed in; LR set by our loop
    plain = deepspeed_config(load_config(None, ["train.zero_stage=0"]).train)
    assert plain["zero_optimization"] == {"stage": 0} and not plain["bf16"]["enabled"]


def test_deepspeed_buckets_are_sized_from_the_model_and_train_deepspeed_is_laid_over():
    zero3 = load_config(None, ["train.zero_stage=3"]).train
    z = deepspeed_config(zero3, hidden_size=4096)["zero_optimization"]
    block = 12 * 4096**2  # one transformer block's parameters
    assert z["reduce_bucket_size"] == 4096**2 and z["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    assert z["stage3_param_persistence_threshold"] == 10 * 4096 and z["sub_group_size"] == block
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 2 * block
    z1 = deepspeed_config(load_config(None, ["train.zero_stage=1"]).train, hidden_size=768)["zero_optimization"]
    # a small model's hidden² would be many latency-bound collectives: sizes stop at 1e7 elements
    assert z1["reduce_bucket_size"] == z1["allgather_bucket_size"] == 10**7 and "sub_group_size" not in z1
    assert "reduce_bucket_size" not in deepspeed_config(zero3)["zero_optimization"]  # no model: DeepSpeed's own
    # YAML reads 1e7 as a string: made a number; merged key by key over what raylm generates
    ours = load_config(None, ["train.zero_stage=3", "train.deepspeed.zero_optimization.sub_group_size=5e6"]).train
    merged = deepspeed_config(ours, hidden_size=4096)
    assert merged["zero_optimization"]["sub_group_size"] == 5 * 10**6
    assert merged["zero_optimization"]["reduce_bucket_size"] == 4096**2 and merged["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize(
    "override, said",
    [
        ("train.deepspeed.zero_optimization.stage=2", "derived from train.zero_stage"),
        ("train.deepspeed.train_batch_size=64", "derived from train.global_batch_size"),
        ("train.deepspeed.zero_optimisation.sub_group_size=5", "zero_optimisation is not a key DeepSpeed reads"),
        ("train.deepspeed.zero_optimization.sub_group_sise=5", "sub_group_sise"),
        ("train.deepspeed.zero_optimization.reduce_bucket_size=big", "reduce_bucket_size"),
    ],
)
def test_train_deepspeed_is_checked_against_deepspeed_before_workers_start(override, said):
    from orchestration.train.driver import check_train_section

    train = load_config(None, ["train.zero_stage=3", override]).train
    with pytest.raises(ConfigError, match=said):
        check_train_section(train, total_steps=100)


def test_train_deepspeed_accepts_what_deepspeed_reads_and_refuses_stage_0():
    from orchestration.train.driver import check_train_section

    ok = ["train.zero_stage=2", "train.deepspeed.flops_profiler.enabled=false"]
    check_train_section(
        load_config(None, ok + ["train.deepspeed.zero_optimization.round_robin_gradients=true"]).train, 100
    )
    with pytest.raises(ConfigError, match="zero_stage 0 is torch DDP"):
        load_config(None, ["train.zero_stage=0", "train.deepspeed.flops_profiler.enabled=false"])


def test_deepspeed_on_gpu_has_no_hidden_syncs_and_accumulates_in_fp32():
    """A bf16 GPU run at ZeRO-1: DeepSpeed's throughput timer and bf16 overflow check (each a device
    sync per step) are off, gradients accumulate in fp32 as under DDP's autocast, and overlap_comm is
    on only with more than one worker."""
    gpu = ["train.use_gpu=true", "train.precision=bf16", "train.zero_stage=1"]
    ds = deepspeed_config(load_config(None, [*gpu, "train.num_workers=1", "train.grad_accum_steps=4"]).train)
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_optimization"]["overlap_comm"] is False and ds["wall_clock_breakdown"] is False
    several = deepspeed_config(load_config(None, [*gpu, "train.num_workers=8", "train.grad_accum_steps=4"]).train)
    assert several["zero_optimization"]["overlap_comm"] is True
    fp32 = deepspeed_config(load_config(None, ["train.zero_stage=1"]).train)
    assert "data_types" not in fp32 and fp32["bf16"] == {"enabled": False}


def test_bf16_trains_the_same_trajectory_on_ddp_and_every_zero_stage():
    """tests/train/bf16_engines_run.py in its own process (DeepSpeed needs a process group): the same
    tiny GPT and batches through DDP + autocast and DeepSpeed bf16 at ZeRO 1-3, 12 steps of 4
    micro-batches, the loss in fp32 (model.loss). Not a trainer launch: one rank, no Ray."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_ports

    script = Path(__file__).with_name("bf16_engines_run.py")
    done = subprocess.run(
        [sys.executable, str(script), "--port", str(free_ports(1)[0])], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    losses = {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    ddp = losses[0]
    assert ddp[-1] < ddp[0] - 0.3  # it learns
    for stage in (1, 2, 3):
        gap = max(abs(a - b) for a, b in zip(losses[stage], ddp))
        print(f"bf16 ZeRO-{stage} vs DDP + autocast: largest loss gap over 12 steps {gap:.1e}")
        assert gap < 5e-3, (stage, gap)


def test_compile_checkpointing_and_zero3_train_the_same_losses():
    """tests/train/compile_engines_run.py in its own process: the same tiny GPT (dropout 0.1, so
    recomputation must replay its masks) and batches at ZeRO 0 (DDP) and 3 (DeepSpeed) x activation
    checkpointing none/full x compile off/on (aot_eager), 6 steps of 2 micro-batches, fp32. Compiled
    ZeRO-3 blocks are leaf modules: one graph, no graph break at DeepSpeed's hooks. Not a trainer
    launch: one rank, no Ray."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_ports

    script = Path(__file__).with_name("compile_engines_run.py")
    done = subprocess.run(
        [sys.executable, str(script), "--port", str(free_ports(1)[0]), "--dropout", "0.1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(runs) == {f"{s}/{c}/{o}" for s in (0, 3) for c in ("none", "full") for o in ("off", "on")}
    eager = runs["0/none/off"]["losses"]
    assert eager[-1] < eager[0] - 0.15  # it learns
    for combo, run in runs.items():
        gap = max(abs(a - b) for a, b in zip(run["losses"], eager))
        print(f"{combo} (ZeRO stage/checkpointing/compile) vs eager DDP: largest loss gap {gap:.1e}")
        assert gap < 1e-5, (combo, gap)
        if combo.endswith("/on"):
            assert (run["graph_breaks"], run["graphs"]) == (0, 1), combo
    assert "compile is off" not in done.stdout


@pytest.mark.slow
def test_zero3_holds_less_per_rank_than_zero1():
    """``measure_step_memory`` (what ``model-info --measure`` runs) at stages 1 and 3, 2 CPU ranks
    each, a ~60M-parameter GPT (fp32 weights ~240 MB, so model state, not the process, dominates):
    ZeRO-3 shards weights, gradients and Adam state, so its per-rank peak must be below ZeRO-1's.
    With DeepSpeed's defaults (1e9-element live/reuse limits and sub-groups, 5e8-element buckets)
    and glibc keeping freed layers resident it was not (2.29 GB vs 1.79 GB measured). Not a trainer
    launch: the worker's setup in fresh processes without Ray."""
    import dataclasses

    from model.build import build_model
    from model.config import ModelConfig
    from orchestration.config import load_config
    from orchestration.train.measure_memory import measure_step_memory

    cfg = ModelConfig(vocab_size=4096, block_size=64, n_layer=8, n_head=12, n_embd=768)
    fp32 = 4 * sum(p.numel() for p in build_model(cfg, device="meta").parameters())
    train = load_config(None, ["train.num_workers=2", "train.micro_batch_size=1"]).train
    peaks = {stage: measure_step_memory(cfg, dataclasses.replace(train, zero_stage=stage), 64) for stage in (1, 3)}
    for stage, run in peaks.items():
        gb = [round(b / 1e9, 3) for b in run.peak]
        print(f"ZeRO-{stage}: per-rank peak {gb} GB ({max(run.peak) / fp32:.1f}x the fp32 model)")
        assert set(run.phases) == {"build", "engine_init", "forward", "backward", "optimizer_step"}
        assert max(run.peak) == max(max(v) for v in run.phases.values())
        assert all(0 < b < p for b, p in zip(run.baseline, run.peak))
    assert max(peaks[3].peak) < min(peaks[1].peak)


def test_zero3_builds_a_share_of_the_model_on_each_rank():
    """Done when of the models-beyond-one-GPU issue: a 2-rank ZeRO-3 build of a 173M-parameter GPT
    (fp32 0.69 GB) holds at most 0.7x the fp32 model above the process baseline on each rank
    (zero.Init partitions each layer as it is built; each rank used to build the whole model first).
    Build only, in fresh processes: no engine and no step."""
    import dataclasses

    from model.build import build_model
    from model.config import ModelConfig
    from orchestration.config import load_config
    from orchestration.train.measure_memory import measure_step_memory

    cfg = ModelConfig(vocab_size=4096, block_size=64, n_layer=24, n_head=12, n_embd=768)
    fp32 = 4 * sum(p.numel() for p in build_model(cfg, device="meta").parameters())
    assert fp32 > 4 * 150e6
    train = load_config(None, ["train.num_workers=2", "train.micro_batch_size=1"]).train
    run = measure_step_memory(cfg, dataclasses.replace(train, zero_stage=3), 64, build_only=True)
    held = [build - baseline for build, baseline in zip(run.phases["build"], run.baseline)]
    print(f"ZeRO-3 init, 2 ranks: {[round(h / fp32, 2) for h in held]}x the fp32 model ({fp32 / 1e9:.2f} GB)")
    assert max(held) <= 0.7 * fp32


def test_zero3_compile_is_off_where_leaf_blocks_cannot_reduce_gradients():
    from model.config import ModelConfig
    from model.gpt import GPT
    from model.lstm import RecurrentLM
    from orchestration.train.engine import zero3_compile_obstacle

    gpt = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert zero3_compile_obstacle(gpt) is None
    gpt.transformer.wte.requires_grad_(False)
    assert zero3_compile_obstacle(gpt) is None  # learned positions still train: the blocks' input has a gradient
    gpt.requires_grad_(False)  # LoRA freezes everything but its adapters
    gpt.transformer.h[0].attn.c_attn.requires_grad_(True)
    assert "frozen" in zero3_compile_obstacle(gpt)
    assert "no transformer blocks" in zero3_compile_obstacle(RecurrentLM(ModelConfig(arch="lstm", vocab_size=64)))


def test_gpu_runs_default_to_bf16_and_compile():
    gpu = load_config(None, ["train.use_gpu=true"]).train
    assert (gpu.precision, gpu.compile) == ("bf16", True)
    cpu = load_config(None, []).train
    assert (cpu.precision, cpu.compile) == ("fp32", False)
    chosen = load_config(None, ["train.use_gpu=true", "train.precision=fp32", "train.compile=false"]).train
    assert (chosen.precision, chosen.compile) == ("fp32", False)


def _tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0))


def test_ddp_engine_steps_like_a_bare_loop_and_checkpoints(tmp_path):
    """ZeRO-0's engine: the same AdamW update as a hand-written accumulate/clip/step loop, the lr the
    loop sets honoured, and a save/load round trip that restores weights and Adam moments."""
    from orchestration.train.ddp import DDPEngine
    from orchestration.train.engine import build_optimizer, wrap_model

    train = load_config(None, ["train.zero_stage=0", "train.num_workers=1", "train.grad_accum_steps=2"]).train
    train.grad_clip = 0.05  # small enough that clipping acts
    engine = wrap_model(_tiny_gpt(), train, torch.device("cpu"))
    assert isinstance(engine, DDPEngine) and engine.ddp is None  # one process: nothing to all-reduce
    bare = _tiny_gpt()
    bare_opt = build_optimizer(bare, train)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for group in engine.optimizer.param_groups + bare_opt.param_groups:
            group["lr"] = 2e-3
        for _ in range(train.grad_accum_steps):
            x = torch.randint(0, 64, (4, 17), generator=gen)
            _, loss = engine(x[:, :-1], x[:, 1:])
            engine.backward(loss)
            engine.step()
            _, bare_loss = bare(x[:, :-1], x[:, 1:])
            (bare_loss / train.grad_accum_steps).backward()
        norm = torch.nn.utils.clip_grad_norm_(bare.parameters(), train.grad_clip)
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        assert torch.allclose(engine.get_global_grad_norm(), norm)
    for (name, ours), theirs in zip(engine.module.named_parameters(), bare.parameters()):
        assert torch.allclose(ours, theirs, atol=1e-6), name

    engine.save_checkpoint(str(tmp_path), tag="ds")
    restored = wrap_model(_tiny_gpt(seed=5), train, torch.device("cpu"))
    path, _ = restored.load_checkpoint(str(tmp_path), tag="ds")
    assert path is not None and restored.load_checkpoint(str(tmp_path), tag="missing")[0] is None
    for ours, theirs in zip(restored.module.parameters(), engine.module.parameters()):
        assert torch.equal(ours, theirs)
    moments = [s["exp_avg"] for s in restored.optimizer.state.values()]
    assert len(moments) == len(engine.params) and all(m.abs().sum() > 0 for m in moments)


def test_ddp_engine_bf16_autocast_keeps_fp32_masters():
    from orchestration.train.engine import wrap_model

    train = load_config(None, ["train.zero_stage=0", "train.num_workers=1", "train.precision=bf16"]).train
    engine = wrap_model(_tiny_gpt(), train, torch.device("cpu"))
    x = torch.randint(0, 64, (4, 17))
    logits, _ = engine(x[:, :-1])
    _, loss = engine(x[:, :-1], x[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32  # matmuls in bf16, the loss in fp32
    engine.backward(loss)
    engine.step()
    assert all(p.dtype == torch.float32 and p.grad is None for p in engine.module.parameters())
    assert math.isfinite(float(engine.get_global_grad_norm()))


def test_param_groups_decay_only_matrices():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(no_decay["params"]) > 0  # biases and norm gains exist in this model
    n_group = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n_group == sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert model.lm_head.weight in decay["params"]


def test_mfu_math_and_peak_table():
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("NVIDIA L4") == 121e12 and peak_flops_per_device("NVIDIA L40S") == 362e12
    assert peak_flops_per_device("NVIDIA A10G") == 70e12
    assert peak_flops_per_device(None) is None and peak_flops_per_device("cpu") is None
    # fp32 runs use TF32 tensor cores: MFU against that peak, not bf16's
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "fp32") == 494.5e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB", "fp32") == 156e12
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "fp16") == 989e12
    out = throughput(tokens=1000, seconds=2.0, flops_per_token=1e9, num_devices=2, peak_flops=1e12)
    assert out == {"tokens_per_s": 500.0, "flops_per_s": 5e11, "mfu": 0.25}
    assert throughput(tokens=1000, seconds=2.0, flops_per_token=1e9, num_devices=1, peak_flops=None)["mfu"] is None


def test_optimizer_state_numel_walks_to_torch_optimizer():
    from orchestration.train.engine import optimizer_state_numel

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()

    class Wrapper:  # DeepSpeed's ZeRO optimizers hold the torch optimizer as .optimizer
        optimizer = opt

    class Engine:
        optimizer = Wrapper()

    assert optimizer_state_numel(Engine()) == 2 * (4 * 3 + 3)  # exp_avg + exp_avg_sq


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """In a fresh interpreter (this one may hold both already): DeepSpeed's autotuner goes without
    mlflow, and the mlflow tracker can still import it afterwards."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from orchestration.train.engine import import_deepspeed\n"
        "import_deepspeed()\n"
        "import deepspeed.autotuning.autotuner as autotuner\n"
        "print('mlflow' in sys.modules, autotuner.has_mlflow)\n"
        "import mlflow\n"
        "print(mlflow.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "mlflow"]


def test_a_run_larger_than_a_local_ray_is_refused_naming_the_keys(ray_session):
    """A Ray this process started has no autoscaler: asking for more than it has fails at once."""
    from orchestration.train.config import TrainConfig
    from orchestration.train.driver import check_resources

    check_resources(TrainConfig(num_workers=2, cpus_per_worker=0.5))
    refused = r"train.num_workers x train.cpus_per_worker = 8 CPU, but this machine's Ray has 2 CPU; lower"
    with pytest.raises(ConfigError, match=refused):
        check_resources(TrainConfig(num_workers=4, cpus_per_worker=2))


def test_an_elastic_range_keeps_the_global_batch_at_every_worker_count():
    from orchestration.train.config import TrainConfig

    train = TrainConfig(num_workers=4, min_workers=2, micro_batch_size=2, global_batch_size=24)
    assert [train.at_world_size(n).grad_accum_steps for n in (2, 3, 4)] == [6, 4, 3]
    assert {train.at_world_size(n).global_batch_size for n in (2, 3, 4)} == {24}
    with pytest.raises(ValueError, match=r"must split into micro_batch_size \(2\) x every worker count .* for \[3\]"):
        TrainConfig(num_workers=4, min_workers=2, micro_batch_size=2, global_batch_size=16)
    with pytest.raises(ValueError, match=r"min_workers \(3\) must be <= num_workers \(2\)"):
        TrainConfig(num_workers=2, min_workers=3)


def test_a_re_run_restores_the_newer_of_rays_checkpoint_and_the_drivers_pick(tmp_path):
    """A checkpoint complete on storage but never registered with Ray (a node lost in between) is the
    driver's pick; Ray restores its own older one unless the loop takes the newer of the two."""
    import json

    from orchestration.artifacts import RunDir
    from orchestration.checkpoint_format import CHECKPOINT_META_FILE
    from orchestration.train.loop import newer_checkpoint

    def checkpoint(step: int) -> RunDir:
        path = tmp_path / f"checkpoint_{step:08d}"
        path.mkdir()
        (path / CHECKPOINT_META_FILE).write_text(json.dumps({"step": step, "files": {}}))
        return RunDir.at(str(path))

    registered, on_storage = checkpoint(10), checkpoint(20)
    assert newer_checkpoint(registered, on_storage) is on_storage  # re-run after a lost node
    assert newer_checkpoint(on_storage, registered) is on_storage  # a worker restart within the run
    assert newer_checkpoint(registered, None) is registered and newer_checkpoint(None, on_storage) is on_storage
    assert newer_checkpoint(None, None) is None


def test_memory_phases_measure_each_phase_once_and_keep_the_lifetime_peak():
    from orchestration.train.memory import MemoryPhases

    mib = 2**20
    phases = MemoryPhases(torch.device("cpu"))
    held = torch.ones(64 * mib // 4)  # 64 MiB, touched, then freed: the phase's peak keeps it
    del held
    phases.end("build")
    with phases.first("eval"):
        pass
    with phases.first("eval"):  # a later eval runs unmeasured...
        held = torch.ones(128 * mib // 4)
        del held
    assert phases.peaks["build"] >= phases.baseline_bytes + 60 * mib
    assert phases.peaks["eval"] < phases.peaks["build"]
    assert phases.peak_bytes() >= phases.baseline_bytes + 120 * mib  # ...but the lifetime peak saw it
    assert list(phases.take_new()) == ["build", "eval"] and phases.take_new() == {}
