"""Every config file and variant lowers its train step at full size on the 8-device fake mesh
(MaxText's train_compile_test): the abstract state is built with ``eval_shape`` and the jitted
step is ``lower``-ed, nothing runs. A config that cannot compile at full size fails here."""

from __future__ import annotations

import glob
import os

import jax
import pytest

from refjax import parallel
from refjax.tasks import get_task
from refjax.train import setup
from refjax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variants(path: str) -> list[str]:
    """The config arguments a file declares in its VARIANT_ARGS (default: tiny/base/large)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(getattr(module, "COMPILE_ARGS", ("tiny", "base", "large")))


CASES = [
    (os.path.relpath(p, ROOT), arg)
    for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.py")))
    if not p.endswith("__init__.py")
    for arg in _variants(p)
]


@pytest.mark.parametrize("path, arg", CASES, ids=[f"{p}:{a}" for p, a in CASES])
def test_train_step_lowers_at_full_size(path: str, arg: str) -> None:
    config = load_config(f"{os.path.join(ROOT, path)}:{arg}")
    with config.unlocked():
        if "vocab_size" in config.model and config.model.vocab_size is None:
            config.model.vocab_size = 1000  # tiny reads it from the dataset's tokenizer
    get_task(config.task)  # the task exists
    layout = config.layout if config.layout != "dp" else "fsdp"
    mesh = parallel.create_mesh({"data": 2, "fsdp": 4})
    total = int(config.train.total_steps or 1000)
    s = setup.build(config, total_steps=total, steps_per_epoch=100, mesh=mesh,
                    rules=parallel.rules_for(layout), abstract=True)
    if layout != "dp":
        parallel.assert_params_sharded(s.state.params, min_bytes=1 << 20)
    with s.activate():
        lowered = s.train_step.lower(s.state, s.abstract_batch())
    out_state, metrics = lowered.out_info
    assert jax.tree.structure(out_state) == jax.tree.structure(s.state)
    assert "loss" in metrics
