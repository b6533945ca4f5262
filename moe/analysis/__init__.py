"""Reading finished runs: `moe compare` (compare.py) and `moe report` (sweep_report.py)."""
