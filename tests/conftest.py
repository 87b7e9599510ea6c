"""Test setup: 8 fake CPU devices, absl flags parsed, torch shim for torchscale."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# torchscale imports timm.models.layers.drop_path; timm needs torchvision (no CPU build here).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "shims"))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from tests.torch_util import require_torch  # noqa: E402,F401  (re-export)
