"""A checkpoint restores onto a different mesh than the one that wrote it: written on 8 fake
devices with fsdp, restored for training on 4 devices with fsdp+tensor (optimizer included) and
for inference on 1 device (variables only); values equal."""

from __future__ import annotations

import jax
import numpy as np

from refjax import parallel
from refjax.train import setup
from refjax.train.trainer import _checkpointer, restore_train_state, restore_variables
from tests.oneref_train_util import make_batch, tiny_config


def _host(tree):
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def test_restore_onto_other_meshes(tmp_path):
    config = tiny_config()
    mesh8 = parallel.create_mesh({"data": 2, "fsdp": 4})
    s = setup.build(config, total_steps=4, mesh=mesh8, rules=parallel.rules_for("fsdp"),
                    sample_batch=make_batch(0))
    # Distinct values in every optimizer slot too (fresh Adam moments are all zeros).
    state = s.state.replace(opt_state=jax.tree.map(
        lambda x: x + 0.5 if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
        s.state.opt_state))
    kernel = state.params["bbox_embed"]["layers_0"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and "fsdp" in str(kernel.sharding.spec)
    with _checkpointer(config, str(tmp_path)) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
    want = _host(state)

    mesh4 = parallel.create_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    restored, _, step = restore_train_state(config, str(tmp_path), mesh=mesh4,
                                            rules=parallel.rules_for("fsdp_tp"))
    assert step == 1
    fc1 = restored.params["beit3"]["encoder"]["layers"]["ffn"]["A"]["fc1"]["kernel"]
    assert fc1.sharding.device_set == set(jax.devices()[:4])
    assert "tensor" in str(fc1.sharding.spec) and "fsdp" in str(fc1.sharding.spec)
    got = _host(restored)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    mesh1 = parallel.create_mesh({"data": 1}, jax.devices()[:1])
    _, _, variables, _, _ = restore_variables(config, str(tmp_path), step=1, mesh=mesh1,
                                              rules=parallel.rules_for("dp"))
    assert set(variables) == {"params", "frozen", "batch_stats"}
    leaf = jax.tree.leaves(variables["params"])[0]
    assert leaf.sharding.device_set == {jax.devices()[0]}
    for a, b in zip(jax.tree.leaves(want.variables()), jax.tree.leaves(_host(variables))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
