"""One RAS (NAR) train step is sharding-invariant: the trainer's jitted step on 2 devices with
the parameters FSDP-sharded and the batch split equals the same step on 1 device from the same
variables (loss and every updated parameter within 1e-5)."""

import jax
import numpy as np
import pytest

from refjax import parallel
from refjax.data.pipeline import make_pipeline
from refjax.tasks import get_task
from refjax.train import setup
from tests import ras_task_util as U
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401
from tests.oneref_train_util import flat_variables

TOL = 1e-5


def _setup(config, mesh_cfg, layout, devices, abstract=False):
    mesh = parallel.create_mesh(mesh_cfg, devices)
    return setup.build(config, total_steps=1, mesh=mesh, rules=parallel.rules_for(layout),
                       seed=0, abstract=abstract)


def _step(s, state, batch):
    with s.activate():
        state, m = s.train_step(state, s.global_batch(batch))
    return float(m["loss"]), flat_variables(state), state


@pytest.mark.slow
def test_two_device_fsdp_step_equals_one_device(refshapes_tiny_dir):  # noqa: F811
    c = U.small_config(refshapes_tiny_dir, arg="tiny,data=tiny,encoders=clip")
    with c.unlocked():
        # Adam eps 1e-3: updates proportional to the gradients (see oneref_train_util)
        c.optim.update(lr=1e-2, eps=1e-3, grad_clip_norm=0.0)
    with make_pipeline(c.data, "train", task=get_task("ras").data_task(c), train=True,
                       seed=0) as it:
        batch = next(it)
    s1 = _setup(c, {"data": 1}, "dp", jax.devices()[:1])
    # the 2-device run starts from the same variables, placed with its own shardings (the
    # abstract setup: no second initialisation)
    s2 = _setup(c, {"fsdp": 2}, "fsdp", jax.devices()[:2], abstract=True)
    host = jax.device_get(s1.state.replace(rng=jax.random.key_data(s1.state.rng)))
    state2 = jax.device_put(host.replace(rng=jax.random.wrap_key_data(host.rng)), s2.shardings)
    init1 = flat_variables(s1.state)
    loss1, after1, _ = _step(s1, s1.state, batch)
    loss2, after2, state2 = _step(s2, state2, batch)
    emb = state2.params["llm"]["embed_tokens"]["embedding"]
    assert len(emb.sharding.device_set) == 2
    assert emb.sharding.shard_shape(emb.shape) != emb.shape  # really sharded
    moved = {k: float(np.max(np.abs(after1[k] - init1[k]))) for k in after1}
    for prefix in ("params/llm", "params/mask_projector", "params/head",
                   "params/image_projector", "params/mask_pool_pre"):
        assert max(v for k, v in moved.items() if k.startswith(prefix)) > 1e-4, prefix
    diffs = {k: float(np.max(np.abs(after1[k] - after2[k]))) for k in after1}
    worst = max(diffs, key=diffs.get)
    print(f"RAS fsdp x2 vs 1 device: loss diff {abs(loss1 - loss2):.2e}, "
          f"max param diff {diffs[worst]:.2e} at {worst}")
    assert abs(loss1 - loss2) <= TOL
    assert diffs[worst] <= TOL, worst
