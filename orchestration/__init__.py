"""Ray Train, Tune and Serve wired around ``model/`` and ``data_pipeline/``: the `raylm` commands.

Top level: ``cli`` (one subcommand per job) -> ``config`` (one typed schema per command, strict YAML +
``key=value`` overrides) -> a stage package below; ``artifacts`` (every file a run writes, read and
written through a ``RunDir`` on local disk or object storage); ``checkpoint_format`` (a checkpoint's
names, meta record and completeness rule, which training writes and every reader reads);
``runtime`` (starting or joining Ray); ``demo`` (prepare -> train -> eval -> generate on the
embedded corpus).

    train/     driver -> WorkerPlan -> worker loop (a Task's hooks) -> checkpoints, metrics.jsonl
    finetune/  a pretrained checkpoint + task data -> the same driver and loop -> before/after summary
    evaluate/  checkpoint -> model -> LM metrics, eval suites, samples, baselines
    sweeps/    Ray Tune search and scaling-law sweeps of training runs -> tune_results.json, scaling_fit.json
    report/    any of those directories -> report.html / report.md / results.json
    deploy/    Ray Serve endpoint, Hugging Face export, Ray Jobs submission
"""
