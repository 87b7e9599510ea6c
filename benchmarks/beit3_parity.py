"""Print max |refjax - torchscale| of BEiT-3 ``encoder_out`` per config and mode (fp32, CPU).

  PYTHONPATH=. python benchmarks/beit3_parity.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "shims"))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from refjax.convert import beit3 as conv  # noqa: E402
from refjax.models.beit3 import BEiT3  # noqa: E402
from tests.test_beit3_parity import CONFIGS, _inputs  # noqa: E402
from tests.torch_ref import state_dict_numpy, torchscale_beit3  # noqa: E402


def main() -> None:
    for name, cfg in sorted(CONFIGS.items()):
        tmodel = torchscale_beit3(cfg, seed=1)
        params, _ = conv.from_torch(state_dict_numpy(tmodel), cfg)
        ids, pad, img, mim = _inputs(cfg)
        nhwc = jnp.asarray(img.transpose(0, 2, 3, 1))
        model = BEiT3(cfg)
        t = lambda a: torch.from_numpy(a)  # noqa: E731
        cases = {
            "vision": (dict(visual_tokens=t(img)), dict(image=nhwc)),
            "text": (dict(textual_tokens=t(ids), text_padding_position=t(pad)),
                     dict(text_ids=jnp.asarray(ids), text_padding=jnp.asarray(pad))),
            "joint+pad": (dict(textual_tokens=t(ids), visual_tokens=t(img),
                               text_padding_position=t(pad)),
                          dict(text_ids=jnp.asarray(ids), text_padding=jnp.asarray(pad),
                               image=nhwc)),
            "joint+pad+mim": (dict(textual_tokens=t(ids), visual_tokens=t(img),
                                   text_padding_position=t(pad), vision_masked_position=t(mim)),
                              dict(text_ids=jnp.asarray(ids), text_padding=jnp.asarray(pad),
                                   image=nhwc, vision_mask=jnp.asarray(mim))),
        }
        for mode, (tk, jk) in cases.items():
            with torch.no_grad():
                ref = tmodel(**tk)["encoder_out"].numpy()
            out = np.asarray(model.apply({"params": params}, **jk)[0])
            err = np.abs(out - ref).max()
            print(f"{name:6s} dim={cfg.dim:4d} {mode:14s} max|diff| = {err:.2e}")


if __name__ == "__main__":
    main()
