"""RAS (NAR) through the real setup chain (refjax.train.setup.build + its jitted train step):
a batch of tiny-RefShapes examples is overfitted (the weighted BCE falls by a large factor and
the candidates are classified as labelled), and the eval step scores it."""

import jax
import numpy as np

from refjax.data.pipeline import make_pipeline
from refjax.train import setup
from tests import ras_task_util as U
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401

STEPS = 80


def overfit(config, steps=STEPS):
    """Train ``steps`` steps on one fixed train batch; returns (losses, setup, state, batch,
    last metrics, eval outputs). The eval step runs on the params the last metrics were
    measured at (before the last update), so the two describe the same model."""
    s = setup.build(config, total_steps=steps, devices=jax.devices()[:1], seed=0)
    with make_pipeline(config.data, "train", task=s.task.data_task(config), train=True,
                       seed=0) as it:
        batch = next(it)
    state, losses = s.state, []
    with s.activate():
        gb = s.global_batch(batch)
        for i in range(steps):
            if i == steps - 1:  # before the step: it donates ``state``
                out = jax.device_get(s.eval_step(state.variables(), gb))
            state, m = s.train_step(state, gb)
            losses.append(float(m["loss"]))
    return losses, s, state, batch, jax.device_get(m), out


def test_nar_overfits_a_batch(refshapes_tiny_dir):  # noqa: F811
    c = U.small_config(refshapes_tiny_dir, arg="tiny,data=tiny,encoders=clip")
    with c.unlocked():
        c.optim.update(lr=1e-2, grad_clip_norm=1.0)
    losses, s, state, batch, m, out = overfit(c)
    print(f"NAR overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f} (x{losses[0] / losses[-1]:.0f}),"
          f" cand_acc {float(m['cand_acc']):.3f}")
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] / 20
    assert float(m["cand_acc"]) == 1.0
    assert set(state.frozen) == {"clip"}  # the tower is frozen, the rest trained
    # the eval step on the same rows and params: the selection is the labelled set
    assert np.asarray(out["num_selected"]).tolist() == (
        (batch["pool_labels"] == 1) & (batch["pool_valid"] == 1)).sum(1).tolist()
