"""The RAS AR baseline (spec 5.6) through the real setup chain: a batch of tiny-RefShapes
examples is overfitted (Hungarian-matched [SEG] CE + [SEG]/EOS decision CE fall by a large
factor). The eval path (in-model greedy decoding) is tested in ``test_ras_eval.py``."""

import numpy as np

from tests import ras_task_util as U
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401
from tests.test_ras_train import overfit


def test_ar_overfits_a_batch(refshapes_tiny_dir):  # noqa: F811
    c = U.small_config(refshapes_tiny_dir, arg="tiny,data=tiny,encoders=clip,decoding=ar",
                       seg_max=5)
    with c.unlocked():
        c.optim.update(lr=1e-2, grad_clip_norm=0.0)
    losses, s, state, batch, m, _ = overfit(c, steps=120)
    print(f"AR overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"(x{losses[0] / losses[-1]:.1f}); match {float(m['ar_match']):.4f}, "
          f"stop {float(m['ar_stop']):.4f}")
    # the match CE has a floor where two positive candidates are the same canvas mask (a
    # [SEG] cannot prefer one twin: log 2 each); the decision CE goes to ~0
    assert np.isfinite(losses).all() and losses[-1] < losses[0] / 8
    assert float(m["ar_stop"]) < 0.05 and float(m["stop_acc"]) == 1.0
    assert int(m["matched"]) == int(batch["seg_valid"].sum())
    assert "seg_proj" in state.params and "head" not in state.params
