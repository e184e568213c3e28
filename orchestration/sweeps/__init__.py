"""Many training runs as Ray Tune trials: hyperparameter searches and scaling-law sweeps; and the tokenizer study.

config (TuneConfig, SweepConfig) -> tune (search space -> trials -> tune_results.json,
best_config.yaml) | scaling (ladder points -> trials -> points/<key>.json -> scaling_points.json)
-> sweep_fit (fits of fit: IsoFLOP, parametric law, holdout -> scaling_fit.json) -> plots;
trials holds the plumbing both share (function trainables, Tune storage, val_loss reports);
tokenizer_study (`raylm tokenizers`, in one process: tokenizers x the same model at equal FLOPs ->
tokenizer_study.json, its report in ``report.tokenizers``)
"""
