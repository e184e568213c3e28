"""After training: serving, exporting, and running raylm on a cluster.

serve (Ray Serve HTTP generation endpoint) | export (checkpoint -> Hugging Face or raylm folder,
through hf: raylm shape -> the transformers architecture that computes it exactly, weights, PEFT
adapters, tokenizer.json; a quantized checkpoint only as raylm) | quantize (checkpoint -> weight-only
int8/int4 checkpoint, with its size and val loss against the fp32 one) | submit (any raylm command as
a Ray Job on a cluster)
"""
