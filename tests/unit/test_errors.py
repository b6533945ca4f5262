"""moe/errors.py: the errors a user sees. Every one is a MoeError, so the CLI prints its message as
one `error:` line and exits 2; each is also the builtin exception callers already catch
(ConfigError and DataError are ValueErrors, CheckpointNotFound is a FileNotFoundError, ...)."""
import inspect

import pytest

import moe.config
import moe.errors
from moe.cli import commands, describe_error, main
from moe.errors import (CheckpointError, CheckpointNotFound, ConfigError, DataError, MoeError, RunFolderBusy,
                        TrainingDiverged)

HIERARCHY = {
    ConfigError: (MoeError, ValueError),
    CheckpointError: (MoeError, RuntimeError),
    CheckpointNotFound: (CheckpointError, MoeError, RuntimeError, FileNotFoundError, OSError),
    DataError: (MoeError, ValueError),
    TrainingDiverged: (MoeError, RuntimeError),
    RunFolderBusy: (MoeError, RuntimeError),
}


def error_classes():
    return [c for _, c in inspect.getmembers(moe.errors, inspect.isclass)
            if issubclass(c, BaseException) and c.__module__ == "moe.errors"]


def test_every_error_of_the_module_is_listed_here_and_is_a_moe_error():
    """A new error class must be a MoeError (and get its row in HIERARCHY)."""
    assert sorted(c.__name__ for c in error_classes()) == sorted(c.__name__ for c in [MoeError, *HIERARCHY])
    assert all(issubclass(c, MoeError) for c in error_classes())
    assert MoeError.__bases__ == (Exception,)  # not a BaseException: `except Exception` sees it


@pytest.mark.parametrize("cls,bases", list(HIERARCHY.items()), ids=lambda x: getattr(x, "__name__", ""))
def test_each_error_is_also_the_builtin_callers_catch(cls, bases):
    exc = cls("runs/x/checkpoints: what went wrong")
    for base in bases:
        assert isinstance(exc, base), base
        with pytest.raises(base):
            raise exc
    assert str(exc) == "runs/x/checkpoints: what went wrong"


def test_the_ones_that_are_not_something_else():
    """The distinctions callers branch on: a config or data problem is no checkpoint problem, a missing
    checkpoint is, and a damaged checkpoint is no FileNotFoundError (it must not read as 'start over')."""
    assert not issubclass(ConfigError, (RuntimeError, OSError))
    assert not issubclass(DataError, (RuntimeError, OSError, ConfigError))
    assert not issubclass(CheckpointError, (OSError, ValueError))
    assert not issubclass(TrainingDiverged, CheckpointError)
    assert not issubclass(RunFolderBusy, (CheckpointError, OSError))


def test_config_error_is_reexported_by_moe_config():
    assert moe.config.ConfigError is ConfigError


@pytest.mark.parametrize("cls", [MoeError, *HIERARCHY], ids=lambda c: c.__name__)
def test_the_cli_shows_the_message_as_is_on_one_line(monkeypatch, capsys, cls):
    monkeypatch.delenv("MOE_DEBUG", raising=False)

    def command(args):
        raise cls("runs/x/config.yaml: model.d_model must be > 0,\ngot -1")

    monkeypatch.setattr(commands, "cmd_info", command)
    with pytest.raises(SystemExit) as info:
        main(["info"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: runs/x/config.yaml: model.d_model must be > 0, got -1\n"


def test_checkpoint_not_found_reads_as_its_message_not_as_an_os_error():
    """Also an OSError, but shown by its own message (no errno, no strerror formatting)."""
    exc = CheckpointNotFound("runs/x/checkpoints/step_00000002: not a checkpoint (no meta.json)")
    assert exc.errno is None and exc.filename is None
    assert describe_error(exc) == "runs/x/checkpoints/step_00000002: not a checkpoint (no meta.json)"
