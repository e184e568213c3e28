"""After training: serving, exporting, and running raylm on a cluster.

serve (`raylm serve`: the FastAPI ingress and routes on Ray Serve; a /generate body flows serve_request
(pydantic model -> a validated, tokenized Job; a 4xx naming the field) -> serve_replica (one replica:
the model, quantized at load if asked; the answer, whole or as server-sent events) -> serve_batch (a
serve batch decoded one token per step through model.generate.generate_steps; a failing request retried
alone); serve_metrics: its Prometheus series (dashboards/raylm_serve.json); serve_cli: its options,
replicas or autoscaling, and the blocking process) | export (checkpoint -> Hugging Face or raylm folder,
through hf: raylm shape -> the transformers architecture that computes it exactly, weights, PEFT
adapters, tokenizer.json; a quantized checkpoint only as raylm) | quantize (checkpoint -> weight-only
int8/int4 checkpoint, with its size and val loss against the fp32 one) | prune (checkpoint -> smaller
checkpoint: the least important heads and MLP units removed, model.prune) | submit (any raylm command as
a Ray Job on a cluster)
"""
