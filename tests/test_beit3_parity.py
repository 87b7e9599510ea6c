"""Parity of refjax BEiT3 with torchscale BEiT3 on the same random weights (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import beit3 as conv
from refjax.models.beit3 import BEiT3, beit3_config
from tests.torch_ref import state_dict_numpy, torchscale_beit3
from tests.torch_util import require_torch

TOL = 1e-5

CONFIGS = {
    "tiny": beit3_config("tiny", img_size=32, vocab_size=100, max_source_positions=64),
    "base2": beit3_config("base", depth=2, img_size=64, vocab_size=1000,
                          max_source_positions=128),
}


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, lt = 2, 9
    ids = rng.integers(0, cfg.vocab_size, (b, lt)).astype(np.int64)
    pad = np.zeros((b, lt), bool)
    pad[0, 6:] = True  # first sample padded after 6 tokens, second unpadded
    img = rng.standard_normal((b, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    n = cfg.grid**2
    mim = rng.random((b, n)) < 0.4
    return ids, pad, img, mim


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    torch = require_torch()
    cfg = CONFIGS[request.param]
    tmodel = torchscale_beit3(cfg, seed=1)
    params, report = conv.from_torch(state_dict_numpy(tmodel), cfg)
    assert not report.unexpected and not report.missing
    return torch, cfg, tmodel, {"params": params}


def _torch_out(torch, tmodel, **kw):
    with torch.no_grad():
        t = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        return tmodel(**t)["encoder_out"].numpy()


@pytest.mark.parametrize("mode", ["vision", "text", "joint", "joint_mim"])
def test_encoder_out_matches_torchscale(pair, mode):
    torch, cfg, tmodel, variables = pair
    ids, pad, img, mim = _inputs(cfg)
    model = BEiT3(cfg)
    img_nhwc = jnp.asarray(img.transpose(0, 2, 3, 1))
    if mode == "vision":
        ref = _torch_out(torch, tmodel, visual_tokens=img)
        out, aux = model.apply(variables, image=img_nhwc)
        assert aux["multiway_split"] == -1
    elif mode == "text":
        ref = _torch_out(torch, tmodel, textual_tokens=ids, text_padding_position=pad)
        out, aux = model.apply(variables, text_ids=jnp.asarray(ids), text_padding=jnp.asarray(pad))
        assert aux["multiway_split"] == 0
    else:
        vm = mim if mode == "joint_mim" else None
        ref = _torch_out(torch, tmodel, textual_tokens=ids, visual_tokens=img,
                         text_padding_position=pad, vision_masked_position=vm)
        out, aux = model.apply(variables, jnp.asarray(ids), jnp.asarray(pad), img_nhwc,
                               None if vm is None else jnp.asarray(vm))
        assert aux["multiway_split"] == aux["vision_len"] == cfg.grid**2 + 1
    out = np.asarray(out)
    assert out.shape == ref.shape
    err = np.abs(out - ref).max()
    assert err <= TOL, f"max |diff| {err:.3g} > {TOL}"


def test_export_roundtrip_is_exact(pair):
    torch, cfg, tmodel, variables = pair
    sd = state_dict_numpy(tmodel)
    back = conv.to_torch(variables["params"], cfg)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # and the exported dict loads strictly into torchscale
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_drop_path_train_mode_runs_and_differs(pair):
    _, cfg, _, variables = pair
    ids, pad, img, _ = _inputs(cfg)
    model = BEiT3(cfg.replace(drop_path_rate=0.5))
    img_nhwc = jnp.asarray(img.transpose(0, 2, 3, 1))
    det, _ = model.apply(variables, jnp.asarray(ids), jnp.asarray(pad), img_nhwc)
    tr, _ = model.apply(variables, jnp.asarray(ids), jnp.asarray(pad), img_nhwc,
                        deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert np.isfinite(np.asarray(tr)).all()
    assert np.abs(np.asarray(tr) - np.asarray(det)).max() > 1e-3
