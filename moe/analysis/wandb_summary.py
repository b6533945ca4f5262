"""The W&B summary run of `moe report --wandb`: the report's table and plots, logged to one run in
the sweep's W&B group (offline unless WANDB_MODE says otherwise)."""
from __future__ import annotations

import os
from typing import Any, Dict, List

__all__ = ["TABLE_COLUMNS", "log_report"]

# The columns of the report rows logged as the W&B table "report/table".
TABLE_COLUMNS = ["variant", "finished", "val_loss", "val_loss_std", "tokens_per_s", "load_max_over_mean"]


def log_report(rows: List[Dict[str, Any]], out_dir: str, group: str) -> None:
    """Log ``rows`` (as "report/table") and every PNG in ``out_dir`` (as "report/<name>") to a run
    named ``<group>-report`` (job type "report") in W&B group ``group``, its files under ``out_dir``."""
    import wandb  # deferred: importing wandb takes seconds, and only --wandb needs it

    run = wandb.init(project="moe", group=group, job_type="report", name=f"{group}-report", dir=out_dir,
                     mode=os.environ.get("WANDB_MODE", "offline"))
    data = [[r.get(c) for c in TABLE_COLUMNS] for r in rows]
    run.log({"report/table": wandb.Table(columns=TABLE_COLUMNS, data=data)})
    for fname in sorted(os.listdir(out_dir)):
        if fname.endswith(".png"):
            run.log({f"report/{fname[:-4]}": wandb.Image(os.path.join(out_dir, fname))})
    run.finish()
