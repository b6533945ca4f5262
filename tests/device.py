"""The device the op tests run on: MOE_TEST_DEVICE (default cpu; benchmarks/gpu_check.sh sets cuda)."""
import os

import torch

DEVICE = torch.device(os.environ.get("MOE_TEST_DEVICE", "cpu"))
