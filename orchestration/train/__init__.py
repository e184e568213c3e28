"""Pretraining on Ray Train + DeepSpeed: one driver path and one worker loop for every training job.

config (TrainConfig) -> driver: validate, resume point, WorkerPlan (plan), launch a TorchTrainer
  (rendezvous: rank 0's store on 127.0.0.1 on a local Ray)
  -> loop (on every worker): the Task (task; pretraining here, fine-tuning in finetune.task),
     the engine (engine: DeepSpeed config, AdamW, the wrap; ddp: ZeRO-0), lr from schedule, metrics
     (throughput, prometheus), checkpoints (checkpoint: each rank's engine files; consolidate:
     model.safetensors streamed at the run's end or on demand) -> run dir (orchestration.artifacts)
"""
