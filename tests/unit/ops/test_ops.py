"""The public dispatch ops (moe/ops/__init__.py): backend choice, what every backend promises
(no host sync when nothing can be dropped), the capacity formula and the public names."""
import subprocess
import sys

import pytest
import torch

from moe import ops
from moe.ops import extension, reference
from tests.helpers import DEVICE, ROOT

HAVE_EXT = DEVICE.type in ops.extension_devices()


# -------------------------------------------------------------------------------- backend choice

def test_backend_choice(monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH", "reference")
    assert ops.dispatch_backend("extension") == "reference"
    monkeypatch.delenv("MOE_DISPATCH")
    assert ops.dispatch_backend("reference") == "reference"
    assert ops.dispatch_backend("auto") == ("extension" if HAVE_EXT else "reference")
    index = ops.build_routing_index(torch.tensor([[2, 0]], device=DEVICE), 4, None, None, backend="reference")
    with pytest.raises(ValueError):
        ops.permute(torch.zeros(1, 1), index, backend="fast")


def test_extension_backend_is_refused_without_the_build(monkeypatch):
    """dispatch=extension names the load error when moe._C is not there; auto falls back."""
    monkeypatch.setattr(extension, "_extension_devices", lambda: "")
    monkeypatch.setattr(ops, "_extension_devices", lambda: "")  # where the public ops look it up
    monkeypatch.delenv("MOE_DISPATCH", raising=False)
    assert not ops.extension_available() and ops.extension_devices() == ()
    assert ops.dispatch_backend("auto") == "reference"
    with pytest.raises(RuntimeError, match="moe._C is not built"):
        ops.dispatch_backend("extension")
    index = reference.build_routing_index_reference(torch.tensor([[0, 1]]), 2)
    with pytest.raises(RuntimeError, match="moe._C is not"):
        ops.permute(torch.ones(1, 3), index, backend="extension")
    assert ops.permute(torch.ones(1, 3), index, backend="auto").shape == (2, 3)  # the reference


def test_auto_backend_equals_the_reference():
    ei = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], device=DEVICE)
    x = torch.randn(4, 5, device=DEVICE)
    w = torch.rand(4, 2, device=DEVICE)
    got = ops.build_routing_index(ei, 3, 2, None, backend="auto")
    want = reference.build_routing_index_reference(ei, 3, 2, None)
    assert torch.equal(got.dest_rows, want.dest_rows) and got.num_rows == want.num_rows
    torch.testing.assert_close(ops.permute(x, got, backend="auto"), reference.permute_reference(x, want))
    torch.testing.assert_close(ops.unpermute(ops.permute(x, got, backend="auto"), got, w, backend="auto"),
                               reference.unpermute_reference(reference.permute_reference(x, want), want, w))


def test_expert_capacity():
    assert ops.expert_capacity(100, 2, 8, 0.0, 4) is None  # dropless
    assert ops.expert_capacity(100, 2, 8, 1.0, 4) == 25  # ceil(1.0 * 100 * 2 / 8)
    assert ops.expert_capacity(100, 2, 8, 1.1, 4) == 28  # ceil(27.5)
    assert ops.expert_capacity(4, 1, 8, 1.0, 4) == 4  # at least min_capacity


def test_public_names():
    """Everything other modules use through `moe.ops` (the reference included, for benchmarks)."""
    for name in ("RoutingIndex", "build_routing_index", "build_routing_index_reference", "check_environment",
                 "cpu_expert_gemm", "cpu_has_avx512", "dispatch_backend",
                 "expert_capacity", "expert_counts", "extension_available", "extension_devices", "grouped_swiglu",
                 "grouped_swiglu_supported", "permute", "permute_reference", "unpermute", "unpermute_reference"):
        assert name in ops.__all__ and callable(getattr(ops, name)), name
    assert ops.permute_reference is reference.permute_reference and ops.RoutingIndex is reference.RoutingIndex


# ------------------------------------------------------------------------------------ host syncs

_SYNC_FREE_CODE = """\
import torch, moe.ops as o
E, T, k, d = 8, 512, 2, 64
ei = torch.randn(T, E, device='cuda').topk(k, dim=-1).indices
x = torch.randn(T, d, device='cuda', requires_grad=True)
w = torch.rand(T, k, device='cuda', requires_grad=True)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode('error')  # any host sync below raises
for backend in ('extension', 'reference'):
    for cap in (None, T * k):  # nothing can be dropped: the buffer's size is known on the host
        idx = o.build_routing_index(ei, E, cap, backend=backend)
        out = o.unpermute(o.permute(x, idx, backend=backend) * 2, idx, w, backend=backend)
        out.backward(torch.ones_like(out))
torch.cuda.set_sync_debug_mode(0)
print('ok', float(out.sum()))
"""


@pytest.mark.skipif(DEVICE.type != "cuda" or not HAVE_EXT, reason="a CUDA device and moe._C's CUDA kernels")
def test_dropless_dispatch_on_cuda_makes_no_host_sync():
    """Routing index, permute, unpermute and their backward, dropless: no host sync (so the layer can be
    captured in a CUDA graph), with the extension and with the reference. A subprocess: a sync raises
    there, leaving this process's CUDA state alone."""
    proc = subprocess.run([sys.executable, "-c", _SYNC_FREE_CODE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr[-3000:]
