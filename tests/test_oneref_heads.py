"""OneRef REC/RES heads: shapes, parameter counts, logical axes and PyTorch parity (spec 2)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.boxes import upsample_seg_logits
from refjax.models.oneref import (
    LOGIT_SCALE_INIT,
    BatchNorm,
    ConvTranspose2x2,
    OneRef,
    OneRefHeads,
)
from tests.torch_util import require_torch

TINY_D, TINY_GRID, TEXT_LEN = 64, 4, 6


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _random_variables(abstract, seed: int = 0):
    """Concrete float32 variables for an abstract (eval_shape) tree without compiling init:
    N(0, 0.1) everywhere, 1 + U(0, 0.5) for norm scales and variances."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if any(k in name for k in ("scale", "var")) and "logit" not in name:
            return jnp.asarray(1 + 0.5 * rng.random(leaf.shape), jnp.float32)
        return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def _abstract_heads(dim: int, grid: int, text_len: int, seg: bool, batch: int = 2):
    vision_len = grid * grid + 1
    x = jax.ShapeDtypeStruct((batch, vision_len + text_len, dim), jnp.float32)
    model = OneRefHeads(dim, seg)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a, vision_len), x)
    outs = jax.eval_shape(lambda v, a: model.apply(v, a, vision_len)[0], variables, x)
    return nn.unbox(variables), outs


@pytest.mark.parametrize(
    "dim,grid,text_len", [(TINY_D, TINY_GRID, TEXT_LEN), (768, 24, 64)], ids=["tiny", "base"]
)
def test_head_shapes(dim, grid, text_len):
    _, rec = _abstract_heads(dim, grid, text_len, seg=False)
    assert {k: v.shape for k, v in rec.items()} == {
        "box": (2, 4),
        "sim": (2, grid * grid),
        "v_cls": (2, dim),
        "t_cls": (2, dim),
    }
    _, res = _abstract_heads(dim, grid, text_len, seg=True)
    assert res["seg_logits"].shape == (2, 8 * grid, 8 * grid)  # H/2: 64 px -> 32, 384 -> 192
    assert all(v.dtype == jnp.float32 for v in res.values())


def test_base_param_counts():
    rec, _ = _abstract_heads(768, 24, 64, seg=False)
    res, _ = _abstract_heads(768, 24, 64, seg=True)
    p = rec["params"]
    assert _count(p["bbox_embed"]) + _count(p["visu_proj"]) == 1_774_852  # spec 2.2
    assert _count(p) == 224_824_325 - 221_279_232  # all non-backbone REC params (spec 1.1, 2.6)
    assert _count(res["params"]) - _count(p) == 7_082_496  # spec 2.6 (BN stats are buffers)
    assert _count(res["batch_stats"]) == 6 * 768


def test_logical_axes_on_every_variable():
    x = jnp.zeros((1, TINY_GRID**2 + 1 + TEXT_LEN, TINY_D))
    model = OneRefHeads(TINY_D, True)
    variables = jax.eval_shape(lambda a: model.init(jax.random.key(0), a, TINY_GRID**2 + 1), x)
    boxed = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)
    assert all(len(v.names) == v.value.ndim for v in boxed)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["visu_proj"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["bbox_embed"]["layers_2"]["kernel"]) == ("embed", None)
    assert tuple(specs["seg_conv1"]["kernel"]) == ("embed", "mlp", None, None)


def test_text_proj_initialised_but_unused():
    vision_len = TINY_GRID**2 + 1
    x = jax.random.normal(jax.random.key(1), (2, vision_len + TEXT_LEN, TINY_D))
    model = OneRefHeads(TINY_D, True)
    v = nn.unbox(jax.jit(model.init, static_argnums=2)(jax.random.key(0), x, vision_len))
    assert v["params"]["text_proj"]["kernel"].shape == (TINY_D, TINY_D)
    assert float(v["params"]["logit_scale"]) == pytest.approx(LOGIT_SCALE_INIT)
    assert float(jnp.abs(v["params"]["vision_head"]["kernel"]).max()) <= 0.02  # trunc at 1 std
    apply = jax.jit(model.apply, static_argnums=2)
    out = apply(v, x, vision_len)[0]
    v2 = jax.tree.map(lambda a: a, v)
    v2["params"]["text_proj"] = jax.tree.map(lambda a: a + 1.0, v["params"]["text_proj"])
    out2 = apply(v2, x, vision_len)[0]
    for k in out:
        np.testing.assert_array_equal(out[k], out2[k])


# ----------------------------------------------------------------------------- torch parity
def _torch_heads(torch, d: int, seg: bool):
    tnn, F = torch.nn, torch.nn.functional

    class MLP(tnn.Module):
        def __init__(self):
            super().__init__()
            self.layers = tnn.ModuleList([tnn.Linear(d, d), tnn.Linear(d, d), tnn.Linear(d, 4)])

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x) if i == 2 else F.relu(layer(x))
            return x

    class Heads(tnn.Module):
        """Spec 2.1-2.3 written out directly, with the BEiT3ForGrounding attribute names."""

        def __init__(self):
            super().__init__()
            self.vision_head = tnn.Linear(d, d, bias=False)
            self.language_head = tnn.Linear(d, d, bias=False)
            self.logit_scale = tnn.Parameter(torch.ones([]) * np.log(1 / 0.07))
            self.visu_proj = tnn.Linear(d, d)
            self.text_proj = tnn.Linear(d, d)
            self.bbox_embed = MLP()
            if seg:
                for k in (1, 2, 3):
                    setattr(self, f"seg_conv{k}", tnn.ConvTranspose2d(d, d, 2, 2, bias=False))
                    setattr(self, f"bn{k}", tnn.BatchNorm2d(d))

        def forward(self, out, nv):
            v, tf = out[:, :nv], out[:, nv:]
            vc = F.normalize(self.vision_head(v), p=2, dim=-1)
            tc = F.normalize(self.language_head(tf), p=2, dim=-1)
            v_cls, v_i, t_cls = vc[:, 0], vc[:, 1:], tc[:, 0]
            sim = torch.bmm(v_i, t_cls.unsqueeze(-1)).squeeze(-1)
            src = self.visu_proj(v)[:, 1:]
            pooled = (sim.softmax(-1).unsqueeze(-1) * src).sum(1)
            res = {
                "box": self.bbox_embed(pooled).sigmoid(),
                "sim": sim,
                "v_cls": v_cls,
                "t_cls": t_cls,
            }
            if seg:
                b, p, _ = v_i.shape
                g = int(math.isqrt(p))
                x = v[:, 1:].transpose(1, 2).reshape(b, d, g, g)
                x = F.relu(self.bn1(self.seg_conv1(x)))
                x = F.relu(self.bn2(self.seg_conv2(x)))
                x = F.normalize(self.bn3(self.seg_conv3(x)), p=2, dim=1)
                res["seg_logits"] = torch.einsum("bd,bdhw->bhw", t_cls, x)
            return res

    return Heads()


def _to_torch_state(torch, variables) -> dict:
    """The converter key map, inverted (Flax -> PyTorch), for a strict load_state_dict."""
    p, bs = variables["params"], variables.get("batch_stats", {})
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    sd = {"logit_scale": t(p["logit_scale"])}
    for name in ("vision_head", "language_head", "visu_proj", "text_proj"):
        sd[f"{name}.weight"] = t(p[name]["kernel"]).T.contiguous()
        if "bias" in p[name]:
            sd[f"{name}.bias"] = t(p[name]["bias"])
    for i in range(3):
        layer = p["bbox_embed"][f"layers_{i}"]
        sd[f"bbox_embed.layers.{i}.weight"] = t(layer["kernel"]).T.contiguous()
        sd[f"bbox_embed.layers.{i}.bias"] = t(layer["bias"])
    for k in (1, 2, 3):
        if f"seg_conv{k}" not in p:
            continue
        sd[f"seg_conv{k}.weight"] = t(p[f"seg_conv{k}"]["kernel"])  # (in, out, 2, 2) as is
        sd[f"bn{k}.weight"] = t(p[f"bn{k}"]["scale"])
        sd[f"bn{k}.bias"] = t(p[f"bn{k}"]["bias"])
        sd[f"bn{k}.running_mean"] = t(bs[f"bn{k}"]["mean"])
        sd[f"bn{k}.running_var"] = t(bs[f"bn{k}"]["var"])
        sd[f"bn{k}.num_batches_tracked"] = torch.tensor(0)
    return sd


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_heads_match_torch(train):
    torch = require_torch()
    d, vision_len, b = TINY_D, TINY_GRID**2 + 1, 3
    x = jax.random.normal(jax.random.key(3), (b, vision_len + TEXT_LEN, d))
    model = OneRefHeads(d, True)
    abstract = jax.eval_shape(lambda a: model.init(jax.random.key(0), a, vision_len), x)
    variables = _random_variables(abstract, seed=7)

    ref = _torch_heads(torch, d, seg=True)
    ref.load_state_dict(_to_torch_state(torch, variables), strict=True)
    ref.train(train)
    with torch.no_grad():
        want = ref(torch.from_numpy(np.array(x)), vision_len)

    if train:
        train_apply = lambda v, a: model.apply(
            v, a, vision_len, deterministic=False, mutable=["batch_stats"]
        )
        (got, _), new_state = jax.jit(train_apply)(variables, x)
        for k in (1, 2, 3):
            bn = getattr(ref, f"bn{k}")
            np.testing.assert_allclose(
                new_state["batch_stats"][f"bn{k}"]["mean"],
                bn.running_mean.numpy(),
                atol=1e-6,
                rtol=1e-6,
            )
            np.testing.assert_allclose(
                new_state["batch_stats"][f"bn{k}"]["var"],
                bn.running_var.numpy(),
                atol=1e-6,
                rtol=1e-6,
            )
    else:
        got, _ = jax.jit(lambda v, a: model.apply(v, a, vision_len))(variables, x)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(
            np.asarray(got[k]), want[k].numpy(), atol=1e-6, rtol=1e-5, err_msg=k
        )


def test_conv_transpose_matches_torch():
    torch = require_torch()
    cin, cout = 5, 7
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, cin))
    m = ConvTranspose2x2(cout)
    v = _random_variables(jax.eval_shape(m.init, jax.random.key(1), x))
    conv = torch.nn.ConvTranspose2d(cin, cout, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.array(v["params"]["kernel"])))
        want = conv(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = jax.jit(m.apply)(v, x)
    assert got.shape == (2, 6, 8, cout)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6, rtol=1e-6)


def test_batchnorm_matches_torch_over_two_train_steps():
    torch = require_torch()
    c = 6
    bn_ref = torch.nn.BatchNorm2d(c)  # momentum 0.1, eps 1e-5
    m_train, m_eval = BatchNorm(use_running_average=False), BatchNorm()
    v = nn.unbox(jax.jit(m_train.init)(jax.random.key(0), jnp.zeros((1, 2, 2, c))))
    train_step = jax.jit(lambda v, x: m_train.apply(v, x, mutable=["batch_stats"]))
    for step in range(2):
        x = 2 + 3 * jax.random.normal(jax.random.key(step), (3, 4, 5, c))
        y, upd = train_step(v, x)
        v = {**v, "batch_stats": upd["batch_stats"]}
        bn_ref.train()
        with torch.no_grad():
            want = bn_ref(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
        np.testing.assert_allclose(y, want.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(v["batch_stats"]["mean"], bn_ref.running_mean, rtol=1e-6)
        np.testing.assert_allclose(v["batch_stats"]["var"], bn_ref.running_var, rtol=1e-6)
    bn_ref.eval()
    x = jax.random.normal(jax.random.key(9), (2, 3, 3, c))
    with torch.no_grad():
        want = bn_ref(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(jax.jit(m_eval.apply)(v, x), want.numpy(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape,size", [((2, 12, 12), (24, 24)), ((3, 5, 7), (10, 14))])
def test_bilinear_upsample_matches_torch(shape, size):
    torch = require_torch()
    x = 3 * jax.random.normal(jax.random.key(0), shape)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(x))[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0]
    np.testing.assert_allclose(upsample_seg_logits(x, size), want.numpy(), atol=1e-6, rtol=1e-6)


def test_oneref_composes_beit3_and_heads():
    from refjax.models.beit3 import BEiT3, beit3_config

    cfg = beit3_config("tiny", depth=1)
    b, grid = 2, cfg.img_size // cfg.patch_size
    image = jax.random.normal(jax.random.key(0), (b, cfg.img_size, cfg.img_size, 3))
    ids = jax.random.randint(jax.random.key(1), (b, TEXT_LEN), 3, cfg.vocab_size)
    pad = jnp.zeros((b, TEXT_LEN), bool).at[0, 4:].set(True)
    model = OneRef(cfg, use_seg_head=True)
    variables = _random_variables(
        jax.eval_shape(lambda: model.init(jax.random.key(2), ids, pad, image))
    )
    assert set(variables["params"]) == {
        "beit3",
        "vision_head",
        "language_head",
        "visu_proj",
        "text_proj",
        "bbox_embed",
        "logit_scale",
        "seg_conv1",
        "seg_conv2",
        "seg_conv3",
        "bn1",
        "bn2",
        "bn3",
    }
    capture = lambda mdl, method: isinstance(mdl, BEiT3) and method == "__call__"
    (got, aux), inter = jax.jit(
        lambda v: model.apply(
            v, ids, pad, image, capture_intermediates=capture, mutable=["intermediates"]
        )
    )(variables)
    assert aux["vision_len"] == grid * grid + 1
    assert got["seg_logits"].shape == (b, 8 * grid, 8 * grid)

    ((enc, _),) = inter["intermediates"]["beit3"]["__call__"]
    head_vars = {
        "params": {k: v for k, v in variables["params"].items() if k != "beit3"},
        "batch_stats": variables["batch_stats"],
    }
    want, _ = jax.jit(OneRefHeads(cfg.dim, True).apply, static_argnums=2)(
        head_vars, enc, grid * grid + 1
    )
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=1e-6, err_msg=k)


def test_sim_scale_scales_logits_and_sharpens_pooling():
    """sim_scale=1 is OneRef; s>1 multiplies sim and seg logits by s (same parameters)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from refjax.models.oneref import OneRefHeads

    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.standard_normal((2, 17 + 5, 32)), jnp.float32)
    base = OneRefHeads(32, use_seg_head=True)
    variables = base.init(jax.random.key(0), enc, 17)
    out1, _ = base.apply(variables, enc, 17)
    out4, _ = OneRefHeads(32, use_seg_head=True, sim_scale=4.0).apply(variables, enc, 17)
    np.testing.assert_allclose(np.asarray(out4["sim"]), 4.0 * np.asarray(out1["sim"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out4["seg_logits"]),
                               4.0 * np.asarray(out1["seg_logits"]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out4["box"]) - np.asarray(out1["box"])).max() > 1e-6


def test_seg_dim_narrows_the_mask_head_and_keeps_the_rest():
    """seg_dim=None is OneRef (no seg_text_proj); a narrower width changes only the RES head:
    convs/BN at seg_dim channels, t_cls projected to seg_dim, cosine logits in [-1, 1]."""
    rng = np.random.default_rng(0)
    enc = jnp.asarray(rng.standard_normal((2, 17 + 5, 32)), jnp.float32)
    full = OneRefHeads(32, use_seg_head=True).init(jax.random.key(0), enc, 17)
    assert "seg_text_proj" not in full["params"]
    narrow_mod = OneRefHeads(32, use_seg_head=True, seg_dim=8)
    narrow = narrow_mod.init(jax.random.key(0), enc, 17)
    p = nn.unbox(narrow["params"])
    assert p["seg_conv1"]["kernel"].shape == (32, 8, 2, 2)
    assert p["seg_conv3"]["kernel"].shape == (8, 8, 2, 2)
    assert p["seg_text_proj"]["kernel"].shape == (32, 8)
    assert nn.unbox(narrow["batch_stats"])["bn3"]["mean"].shape == (8,)
    out_n, _ = narrow_mod.apply(narrow, enc, 17)
    out_f, _ = OneRefHeads(32, use_seg_head=True).apply(full, enc, 17)
    assert out_n["seg_logits"].shape == out_f["seg_logits"].shape == (2, 32, 32)
    assert float(jnp.abs(out_n["seg_logits"]).max()) <= 1.0 + 1e-5
    np.testing.assert_allclose(np.asarray(out_n["box"]), np.asarray(out_f["box"]), rtol=1e-6)
    with pytest.raises(ValueError, match="seg_dim"):
        OneRefHeads(32, use_seg_head=True, seg_dim=-4).init(jax.random.key(0), enc, 17)


def test_seg_convs_sets_the_mask_resolution():
    """seg_convs=3 (OneRef) gives 8x the patch grid; 2 gives 4x (H/2 for 8-pixel patches)."""
    enc = jnp.asarray(np.random.default_rng(1).standard_normal((2, 17 + 5, 32)), jnp.float32)
    mod = OneRefHeads(32, use_seg_head=True, seg_dim=8, seg_convs=2)
    variables = mod.init(jax.random.key(0), enc, 17)
    assert sorted(k for k in variables["params"] if k.startswith("seg_conv")) == [
        "seg_conv1", "seg_conv2"]
    out, _ = mod.apply(variables, enc, 17)
    assert out["seg_logits"].shape == (2, 16, 16)
    with pytest.raises(ValueError, match="seg_convs"):
        OneRefHeads(32, use_seg_head=True, seg_convs=0).init(jax.random.key(0), enc, 17)
