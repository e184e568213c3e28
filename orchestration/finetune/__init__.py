"""Fine-tuning a pretrained checkpoint through the training driver and loop.

config (FinetuneConfig) -> driver: base checkpoint, task data (data: rows -> tokens -> Ray Data
stream; or token shards for task lm and distill), before metrics (scores) -> train.driver.launch with
the fine-tuning Task (task: head / LoRA / frozen blocks, loss, weight files, early stopping; distill:
a fresh or checkpointed student and the frozen teacher whose predictions it learns)
-> best checkpoint -> after metrics -> finetune_summary.json, finetune.md (summary)
"""
