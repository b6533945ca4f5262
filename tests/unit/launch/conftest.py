"""Fixtures of the moe.launch unit tests (the shared ones are in tests/conftest.py)."""
import os

import pytest

from moe.launch import slurm

FAKE_SCONTROL = r"""#!/bin/bash
# scontrol requeue JOB: appends "requeue JOB" to <bin>/scontrol.calls; fails with $FAKE_SCONTROL_ERROR on
# stderr when it is set; with $FAKE_SCONTROL_SIGNAL it first sends itself that signal (Slurm ending the job's
# processes while the requeue is answered). scontrol -o show job JOB: prints <bin>/scontrol.out (one line per job), if present.
bin=$(dirname "$0")
echo "$@" >> "$bin/scontrol.calls"
case $1 in
  requeue)
    if [[ -n ${FAKE_SCONTROL_SIGNAL:-} ]]; then kill -s "$FAKE_SCONTROL_SIGNAL" $$; fi
    if [[ -n ${FAKE_SCONTROL_ERROR:-} ]]; then echo "$FAKE_SCONTROL_ERROR" >&2; exit 1; fi ;;
  -o)
    cat "$bin/scontrol.out" 2>/dev/null || true ;;
esac
"""


@pytest.fixture
def fake_scontrol(fake_slurm, monkeypatch):
    """tests/conftest.py's fake Slurm commands plus a fake `scontrol` (see FAKE_SCONTROL); the bin folder.
    No pause before a requeue: no torchrun is copying output here."""
    monkeypatch.setattr(slurm, "REQUEUE_DRAIN_S", 0.0)
    path = fake_slurm / "scontrol"
    path.write_text(FAKE_SCONTROL)
    os.chmod(path, 0o755)
    return fake_slurm
