"""Many training runs as Ray Tune trials: hyperparameter searches and scaling-law sweeps; the tokenizer study and
the μP coordinate check.

config (TuneConfig, SweepConfig) -> tune (search space -> trials -> tune_results.json,
best_config.yaml) | scaling (ladder points -> trials -> points/<key>.json -> scaling_points.json)
-> sweep_fit (fits of fit: IsoFLOP, parametric law, holdout -> scaling_fit.json) -> plots;
trials holds the plumbing both share (function trainables, Tune storage, val_loss reports);
tokenizer_study (`raylm tokenizers`, in one process: tokenizers x the same model at equal FLOPs ->
tokenizer_study.json, its report in ``report.tokenizers``); mup_check (`raylm mup-check`, in one process:
widths x {sp, mup} x seeds -> a few AdamW steps -> per-layer activation scale and its slope in width ->
mup_check.json, its report in ``report.mup_check``)
"""
