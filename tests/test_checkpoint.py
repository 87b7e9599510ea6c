"""refjax.train.checkpoint: round trips with resharding, iterator resume, best-N, crash safety."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from refjax import parallel
from refjax.train import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loader():
    return grain.DataLoader(
        data_source=grain.sources.RangeDataSource(0, 100, 1),
        sampler=grain.samplers.IndexSampler(
            num_records=100,
            shard_options=grain.sharding.NoSharding(),
            shuffle=True,
            num_epochs=1,
            seed=3,
        ),
        operations=[grain.transforms.Batch(batch_size=4, drop_remainder=True)],
        worker_count=0,
    )


def _state(mesh):
    w = jax.device_put(
        jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16), NamedSharding(mesh, P("data", "fsdp"))
    )
    b = jax.device_put(jnp.linspace(0, 1, 16, dtype=jnp.bfloat16), NamedSharding(mesh, P("fsdp")))
    return {"params": {"w": w, "b": b}, "step": jnp.int32(7), "rng": jax.random.key(5)}


def test_round_trip_reshard_and_iterator_resume(tmp_path):
    mesh = parallel.create_mesh({"data": 2, "fsdp": 4})
    state = _state(mesh)
    it = iter(_loader())
    for _ in range(3):
        next(it)
    with ckpt.Checkpointer(tmp_path / "ck") as ck:
        assert ck.save(10, state, data_iter=it)
        ck.wait_until_finished()
    expected = next(it)

    new_mesh = parallel.create_mesh({"fsdp": 8})
    targets = {
        "params": {
            "w": NamedSharding(new_mesh, P(None, "fsdp")),
            "b": NamedSharding(new_mesh, P()),
        },
        "step": NamedSharding(new_mesh, P()),
        "rng": NamedSharding(new_mesh, P()),
    }
    it2 = iter(_loader())
    with ckpt.Checkpointer(tmp_path / "ck") as ck:
        assert ck.latest_step() == 10
        out = ck.restore(target=ckpt.abstract_tree(state, targets), data_iter=it2)
    np.testing.assert_array_equal(next(it2), expected)
    w = out["params"]["w"]
    assert w.sharding.is_equivalent_to(targets["params"]["w"], 2)
    assert w.addressable_shards[0].data.shape == (8, 2)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(state["params"]["w"]))
    assert out["params"]["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["params"]["b"]), np.asarray(state["params"]["b"]))
    assert int(out["step"]) == 7
    np.testing.assert_array_equal(
        jax.random.key_data(out["rng"]), jax.random.key_data(state["rng"])
    )


def test_nan_guard(tmp_path):
    assert ckpt.check_finite({"a": jnp.ones(3), "n": jnp.int32(1), "k": jax.random.key(0)}) is True
    assert ckpt.check_finite({"a": jnp.array([1.0, jnp.inf])}) is False
    assert ckpt.check_finite({"a": np.array([np.nan]), "b": jnp.ones(2)}) is False
    with ckpt.Checkpointer(tmp_path / "ck") as ck:
        with pytest.raises(ckpt.NonFiniteStateError):
            ck.save(1, {"a": jnp.array([0.0, jnp.nan])})
        ck.wait_until_finished()
        assert ck.latest_step() is None


@pytest.mark.parametrize("mode,best", [("max", 2), ("min", 1)])
def test_keep_latest_and_best(tmp_path, mode, best):
    accs = [0.1, 0.9, 0.3, 0.2, 0.4]
    with ckpt.Checkpointer(
        tmp_path / mode, max_to_keep=2, best_fn=lambda m: m["acc"], best_mode=mode
    ) as ck:
        for step, acc in enumerate(accs, 1):
            ck.save(step, {"x": jnp.full((2,), float(step))}, metrics={"acc": jnp.float32(acc)})
        ck.wait_until_finished()
        assert ck.best_step() == best
        assert ck.all_steps() == sorted({best, 4, 5})
        np.testing.assert_allclose(ck.metrics(best)["acc"], accs[best - 1], rtol=1e-6)
    with ckpt.Checkpointer(tmp_path / mode, best_fn=lambda m: m["acc"], best_mode=mode) as ck:
        assert ck.best_step() == best and ck.latest_step() == 5
        np.testing.assert_array_equal(np.asarray(ck.restore(best)["x"]), [best, best])


def test_params_only_round_trip(tmp_path):
    mesh = parallel.create_mesh({"fsdp": 8})
    params = {"enc": {"kernel": jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("fsdp")))}}
    ckpt.save_params_only(tmp_path / "p", params)
    sharding = NamedSharding(mesh, P(None, "fsdp"))
    target = {"enc": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=sharding)}}
    out = ckpt.restore_params(tmp_path / "p", target)
    assert out["enc"]["kernel"].sharding.is_equivalent_to(target["enc"]["kernel"].sharding, 2)
    np.testing.assert_array_equal(np.asarray(out["enc"]["kernel"]), 1.0)
    np.testing.assert_array_equal(
        np.asarray(ckpt.restore_params(tmp_path / "p")["enc"]["kernel"]), 1.0
    )


_CHILD = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from refjax.train.checkpoint import Checkpointer

    ck = Checkpointer(sys.argv[1], max_to_keep=1000)
    big = jnp.ones((8 * 1024 * 1024,), jnp.float32)  # 32 MiB per step
    step = ck.latest_step() or 0
    while True:
        step += 1
        ck.save(step, {"x": big * step, "step": jnp.int32(step)})
        ck.wait_until_finished()
        print(step, flush=True)
    """
)


def _tmp_dirs(path):
    return [n for n in os.listdir(path) if "tmp" in n]


def test_sigkill_mid_write_never_restores_partial(tmp_path):
    directory = str(tmp_path / "ck")
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    caught = None
    for _attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, directory], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip(), "child died before its first checkpoint"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if _tmp_dirs(directory):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.001)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        caught = _tmp_dirs(directory)
        if caught:
            break
    assert caught, "never caught a checkpoint mid-write"
    partial = int(caught[0].split(".")[0])

    with ckpt.Checkpointer(directory) as ck:
        latest = ck.latest_step()
        assert latest == partial - 1
        assert partial not in ck.all_steps()
        out = ck.restore()
    assert int(out["step"]) == latest
    x = np.asarray(out["x"])
    assert x.shape == (8 * 1024 * 1024,) and np.all(x == latest)
