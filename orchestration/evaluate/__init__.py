"""Evaluating checkpoints with plain PyTorch (no Ray Train, no DeepSpeed).

load (checkpoint URI -> model, config, tokenizer) -> data_source (which held-out text: --data, or the
manifest the checkpoint was trained on) -> lm (loss, perplexity, bits per byte on held-out windows),
suites (continuation BLEU/ROUGE via text_metrics, multiple choice, bias probe; scoring's log-likelihoods),
privacy (exposure, membership inference and extraction of data.audit's planted text), sample (generation);
baselines (n-gram fit and the n-gram / RNN / GRU / LSTM / transformer table); interpret (attention maps, logit
lens, integrated gradients, linear probes on one prompt; its page in ``report.interpret``)
"""
