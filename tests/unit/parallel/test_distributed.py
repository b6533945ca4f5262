"""moe/parallel/distributed.py without a process group (the named collective of a failing peer is
covered by tests/integration/test_expert_parallel.py)."""
from moe.parallel.distributed import CollectiveError, collective_failure, world_size_from_env


def test_world_size_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size_from_env() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from_env() == 4


def test_an_already_named_failure_is_not_renamed():
    try:
        raise CollectiveError("rank 0 (EP group ranks [0, 1]): all_to_all_single ... failed")
    except CollectiveError as exc:
        assert collective_failure(exc, 0, 2, 20) is None
    try:
        raise RuntimeError("not a collective")
    except RuntimeError as exc:
        assert collective_failure(exc, 0, 2, 20) is None
