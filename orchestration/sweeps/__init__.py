"""Many training runs as Ray Tune trials: hyperparameter searches and scaling-law sweeps.

config (TuneConfig, SweepConfig) -> tune (search space -> trials -> tune_results.json,
best_config.yaml) | scaling (ladder points -> trials -> points/<key>.json -> scaling_points.json)
-> sweep_fit (fits of fit: IsoFLOP, parametric law, holdout -> scaling_fit.json) -> plots;
trials holds the plumbing both share (function trainables, Tune storage, val_loss reports)
"""
