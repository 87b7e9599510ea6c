"""The OneRef train step is sharding-invariant: one fp32 step of the trainer's jitted step on
one device equals the same step on the 8 fake devices under the dp, fsdp and fsdp_tp layouts
(loss, every updated parameter and the BatchNorm statistics within 1e-5).

BatchNorm normalises with statistics of the *global* batch in every layout (a plain jit over a
batch-sharded array reduces across shards), which is what makes this hold with the seg head on.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from refjax import parallel
from tests.oneref_train_util import LAYOUTS, flat_variables, make_batch, run_train_steps

TOL = 1e-5


@pytest.fixture(scope="module")
def single_device() -> dict[str, Any]:
    """The reference: the same step on a 1-device mesh.

    It also guards the comparison: every head and the BatchNorm statistics must actually move
    in this step (a zero update would compare equal trivially).
    """
    out = run_train_steps({"data": 1}, "dp", jax.devices()[:1], [make_batch(0)],
                          keep_initial=True)
    after = flat_variables(out["state"])
    moved = {k: float(np.max(np.abs(after[k] - v))) for k, v in out["initial"].items()}
    for prefix in ("params/beit3/encoder", "params/beit3/vision_embed", "params/bbox_embed",
                   "params/vision_head", "params/seg_conv1", "params/bn3", "batch_stats/bn1"):
        assert max(v for k, v in moved.items() if k.startswith(prefix)) > 1e-3, prefix
    return {"loss": out["losses"][0], "vars": after}


def _max_diffs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    assert ref.keys() == got.keys()
    return {k: float(np.max(np.abs(ref[k] - got[k]), initial=0.0)) for k in ref}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_step_matches_single_device(name: str, single_device: dict[str, Any]) -> None:
    assert len(jax.devices()) == 8
    mesh_cfg, layout = LAYOUTS[name]
    out = run_train_steps(mesh_cfg, layout, jax.devices(), [make_batch(0)])
    state = out["state"]
    if layout == "fsdp":
        parallel.assert_params_sharded(state.params, min_bytes=16 * 1024)
    assert len(next(iter(jax.tree.leaves(state.params))).sharding.device_set) == 8

    got = flat_variables(state)
    ref = single_device["vars"]
    assert any(k.startswith("batch_stats/bn") for k in got), "the seg head's BatchNorm is missing"
    diffs = _max_diffs(ref, got)
    worst = max(diffs, key=diffs.get)
    print(f"{name}: loss diff {abs(out['losses'][0] - single_device['loss']):.2e}, "
          f"max |param/batch_stats diff| {diffs[worst]:.2e} at {worst}")
    assert abs(out["losses"][0] - single_device["loss"]) <= TOL
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"{name}: differs from one device beyond {TOL}: {bad}"
