"""OneRef .pth converter: parity against torchscale BEiT3 + a torch re-implementation of the heads
(spec/oneref.md 2), exact export round trip, and errors that name the key."""

import functools

import numpy as np
import pytest

from refjax.convert import oneref as conv
from refjax.convert.common import ConversionError, load_state_dict
from refjax.models.beit3 import beit3_config
from refjax.models.oneref import OneRef
from tests.test_oneref_heads import _torch_heads
from tests.torch_ref import torchscale_beit3
from tests.torch_util import require_torch

TOL = 1e-5
CFG = beit3_config("tiny", img_size=32, vocab_size=100, max_source_positions=64)
MREFM = {  # MRefM pre-training heads present in the official checkpoints (spec 2.6)
    "mim_head.weight": (16, CFG.dim),
    "mim_head.bias": (16,),
    "mlm_head.weight": (CFG.vocab_size, CFG.dim),
    "mlm_sts_head.layers.2.bias": (1,),
}


def _wrapper(torch, seg: bool, seed: int = 0):
    """``BEiT3ForGrounding``-shaped torch module: torchscale BEiT3 as ``beit3`` + the heads,
    every head tensor random and the BN running statistics non-trivial."""
    model = _torch_heads(torch, CFG.dim, seg)
    model.beit3 = torchscale_beit3(CFG, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("beit3."):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen) + (1.0 if "bn" in name else 0))
        if seg:
            for k in (1, 2, 3):
                bn = getattr(model, f"bn{k}")
                bn.running_mean.copy_(0.3 * torch.randn(CFG.dim, generator=gen))
                bn.running_var.copy_(0.5 + torch.rand(CFG.dim, generator=gen))
    return model.eval()


def _save(torch, path, sd: dict, extra: dict | None = None) -> str:
    model_sd = dict(sd)
    for k, shape in (extra or {}).items():
        model_sd[k] = torch.randn(shape)
    torch.save({"model": model_sd, "optimizer": {"state": {}}, "epoch": 3}, path)
    return str(path)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    b, lt = 2, 7
    ids = rng.integers(3, CFG.vocab_size, (b, lt)).astype(np.int64)
    pad = np.zeros((b, lt), bool)
    pad[0, 5:] = True
    img = rng.standard_normal((b, 3, CFG.img_size, CFG.img_size)).astype(np.float32)
    return ids, pad, img


def _torch_forward(torch, model, ids, pad, img) -> dict:
    with torch.no_grad():
        enc = model.beit3(
            textual_tokens=torch.from_numpy(ids),
            visual_tokens=torch.from_numpy(img),
            text_padding_position=torch.from_numpy(pad),
        )["encoder_out"]
        out = model(enc, CFG.grid**2 + 1)
    return {k: v.numpy() for k, v in out.items()}


@functools.cache
def _model(seg: bool):
    torch = require_torch()
    return torch, _wrapper(torch, seg)


@pytest.fixture(scope="module", params=[True, False], ids=["res", "rec"])
def converted(request, tmp_path_factory):
    seg = request.param
    torch, model = _model(seg)
    path = tmp_path_factory.mktemp("ckpt") / "oneref.pth"
    _save(torch, path, model.state_dict(), MREFM)
    sd = load_state_dict(str(path))
    variables, report = conv.from_torch(sd, CFG)
    return torch, seg, model, variables, report


def test_report_and_seg_detection(converted):
    _, seg, model, variables, report = converted
    assert ("batch_stats" in variables) == seg
    assert ("seg_conv1" in variables["params"]) == seg
    assert not report.unexpected and not report.missing
    ignored = set(MREFM) | ({f"bn{k}.num_batches_tracked" for k in (1, 2, 3)} if seg else set())
    assert set(report.ignored) == ignored
    n_float = sum(1 for v in model.state_dict().values() if v.is_floating_point())
    assert len(report.converted) == n_float


def test_forward_matches_torch(converted):
    torch, seg, model, variables, _ = converted
    ids, pad, img = _inputs()
    want = _torch_forward(torch, model, ids, pad, img)
    got, _ = OneRef(CFG, use_seg_head=seg).apply(
        variables, ids.astype(np.int32), pad, img.transpose(0, 2, 3, 1)
    )
    keys = ("box", "sim", "seg_logits") if seg else ("box", "sim")
    assert set(keys) <= set(got)
    for k in keys:
        err = np.abs(np.asarray(got[k]) - want[k]).max()
        assert got[k].shape == want[k].shape, k
        assert err <= TOL, f"{k}: max |diff| {err:.3g} > {TOL}"


def test_export_roundtrip_is_exact(converted):
    torch, seg, model, variables, _ = converted
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    back = conv.to_torch(variables, CFG, use_seg_head=seg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    if seg:
        assert back["bn1.num_batches_tracked"].shape == ()
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in back.items()}, strict=True
    )


@pytest.mark.parametrize(
    "key", ["visu_proj.bias", "beit3.encoder.layers.1.ffn.B.fc1.weight", "bn2.running_var"]
)
def test_shape_mismatch_names_the_key(key):
    _, model = _model(True)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd[key] = np.zeros(sd[key].shape[:-1] + (sd[key].shape[-1] + 1,), np.float32)
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        conv.from_torch(sd, CFG)


def test_missing_and_unknown_keys_are_named(converted):
    _, seg, model, _, _ = converted
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["some_new_head.weight"] = np.zeros(3, np.float32)
    _, report = conv.from_torch(sd, CFG)
    assert report.unexpected == ["some_new_head.weight"]
    del sd["bbox_embed.layers.2.bias"]
    with pytest.raises(ConversionError, match=r"bbox_embed\.layers\.2\.bias"):
        conv.from_torch(sd, CFG)
    _, report = conv.from_torch(sd, CFG, strict=False)
    assert report.missing == ["bbox_embed.layers.2.bias"]


def test_not_a_oneref_checkpoint():
    with pytest.raises(ConversionError, match="beit3"):
        conv.from_torch({"visu_proj.bias": np.zeros(4, np.float32)}, CFG)


def test_cli_convert_oneref(tmp_path):
    from refjax.__main__ import main
    from refjax.convert.common import load_variables

    torch, model = _model(True)
    variables, _ = conv.from_torch({k: v.numpy() for k, v in model.state_dict().items()}, CFG)
    src = _save(torch, tmp_path / "in.pth", model.state_dict(), MREFM)
    out = tmp_path / "out"
    assert main(["convert", "oneref", src, str(out), "--variant", "tiny", "--no-scan"]) == 0
    restored, meta = load_variables(str(out))
    assert meta["model"] == "oneref" and meta["use_seg_head"] is True
    assert meta["config"]["heads"] == CFG.heads and meta["config"]["scan"] is False
    w = variables["params"]["visu_proj"]["kernel"]
    np.testing.assert_array_equal(restored["params"]["visu_proj"]["kernel"], w)
    np.testing.assert_array_equal(
        restored["batch_stats"]["bn3"]["var"], variables["batch_stats"]["bn3"]["var"]
    )
    layer0 = restored["params"]["beit3"]["encoder"]["layers_0"]["ffn"]["A"]["fc1"]["kernel"]
    np.testing.assert_array_equal(
        layer0, variables["params"]["beit3"]["encoder"]["layers"]["ffn"]["A"]["fc1"]["kernel"][0]
    )


@pytest.mark.parametrize("opts", [{"seg_dim": 8}, {"seg_convs": 2}])
def test_export_refuses_refjax_only_res_heads(opts):
    """A RES head built with seg_dim / seg_convs has no OneRef layout: exporting it is an error
    that names the option, not a state_dict that fails later in torch."""
    import jax

    model = OneRef(CFG, use_seg_head=True, **opts)
    ids, pad, img = _inputs()
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, pad, img.transpose(0, 2, 3, 1))
    with pytest.raises(ConversionError, match="seg_dim / seg_convs"):
        conv.to_torch(shapes, CFG, use_seg_head=True)
