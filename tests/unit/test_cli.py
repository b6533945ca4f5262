"""`moe info`: the rows that say which backends are live."""
import pytest
import torch

from moe import ops
from moe.cli import main
from moe.nn.experts import describe_auto_impl


def _info(capsys) -> dict:
    main(["info"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def test_info_names_the_live_dispatch_and_expert_backends(capsys, monkeypatch):
    monkeypatch.delenv("MOE_DISPATCH", raising=False)
    rows = _info(capsys)
    if ops.extension_available():
        assert rows["dispatch backend"].startswith("extension (moe._C has CPU")
        assert rows["expert backend"].startswith("loop, as one compiled grouped SwiGLU op")
    else:
        assert rows["dispatch backend"] == "reference (compiled extension not built)"
    monkeypatch.setenv("MOE_DISPATCH", "reference")
    rows = _info(capsys)
    assert rows["dispatch backend"].startswith("reference (") and rows["dispatch backend"].endswith(
        "[forced by MOE_DISPATCH]")
    assert rows["expert backend"].startswith("loop (a GEMM per expert")


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_auto_expert_backend_on_cuda_is_described_without_a_gpu(backend):
    text = describe_auto_impl(torch.device("cuda"), backend)
    assert ("torch._grouped_mm" in text) == hasattr(torch, "_grouped_mm") and "bf16" in text
