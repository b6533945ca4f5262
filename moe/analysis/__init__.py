"""Reading finished runs: `moe compare` (compare.py) and `moe report` (sweep_report.py), built on
runs.py (a run folder as a RunRecord), tables.py (markdown and number formats), plots.py (the PNG
figures) and wandb_summary.py (the W&B summary run of `moe report --wandb`)."""
