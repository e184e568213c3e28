"""Pretraining on Ray Train + DeepSpeed: one driver path and one worker loop for every training job.

config (TrainConfig) -> driver: validate, resume point, a data mixture's weights and schedule
  (data_mixture), WorkerPlan (plan), launch a TorchTrainer
  (rendezvous: rank 0's store on 127.0.0.1 on a local Ray)
  -> loop (on every worker): the Task (task; pretraining here, fine-tuning in finetune.task) and
     its model (rank_model: seeded, built sharded under ZeRO-3), the engine (engine: DeepSpeed
     config, AdamW, the wrap; ddp: ZeRO-0; dp: DP-SGD with Opacus at ZeRO-0), lr from schedule,
     metrics (throughput, prometheus, memory: each phase's peak), checkpoints (checkpoint: each
     rank's engine files; consolidate: model.safetensors streamed at the run's end or on demand;
     reshard: a resume on another worker count, converted once per checkpoint, read by share)
  -> run dir (orchestration.artifacts)
measure_memory: the worker's setup and steps without Ray or data (`raylm model-info --measure`).
"""
