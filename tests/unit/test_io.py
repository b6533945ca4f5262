"""moe/io.py: atomic, durable writes; secret redaction."""
import os

import pytest

from moe import io


def test_atomic_write_is_fsynced_before_the_rename_and_redacts(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    target = tmp_path / "config.yaml"
    io.atomic_write(str(target), "token: hf_abcdefghijkl\n")
    assert target.read_text() == "token: <redacted>\n"
    assert events == ["fsync", "rename", "fsync"]  # the file, the rename, then the folder
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def full_disk(a, b):
        raise OSError(28, "No space left on device", a)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        io.atomic_write(str(target), "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_redact_replaces_the_longest_secret_first():
    env = {"API_KEY": "abcdef", "OTHER_TOKEN": "abcdefghij", "HOME": "/root/abcdef"}
    assert io.redact("x abcdefghij y abcdef", env) == "x <redacted> y <redacted>"
