"""Fixtures of the config tests (plain helpers live in tests/helpers.py)."""
import pytest


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """An empty working folder, the current directory for the test: nothing may appear in it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
