"""The errors a user sees. Each is a `MoeError`: the CLI prints its message as one `error:` line and
exits 2 (the traceback only with MOE_DEBUG=1). A message names the key, file or value at fault."""
from __future__ import annotations


class MoeError(Exception):
    """A user-facing failure; the message is shown as is, after `error: `."""


class ConfigError(MoeError, ValueError):
    """A config value is invalid; the message names the key."""


class CheckpointError(MoeError, RuntimeError):
    """A checkpoint is incomplete, inconsistent, corrupt, or does not fit the model; names the file."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """There is no checkpoint where one was asked for."""


class DataError(MoeError, ValueError):
    """A dataset cannot be read or is unusable (empty, too small, a bad line); names the file or name."""


class TrainingDiverged(MoeError, RuntimeError):
    """The loss or the gradient norm became non-finite; names the step. Nothing non-finite is saved."""


class RunFolderBusy(MoeError, RuntimeError):
    """Another live process tree trains in the same run folder; names the holder."""
