"""Parity of the refjax ViT towers with transformers 5 (CLIPVisionModel, SiglipVisionModel,
Dinov2Model, Dinov2WithRegistersModel) on the same random weights, fp32, CPU.

Each reference is built from a small config, randomised, written with ``save_pretrained`` and
converted from that directory by ``refjax.convert.vit.from_hf``. Compared: last_hidden_state,
pooler_output, every hidden state and ``features``; DINOv2 also at non-square inputs whose sides
are not multiples of the patch (position resampling: bicubic vs antialiased bicubic). The export
loads back with ``load_state_dict(strict=True)`` and ``from_pretrained``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import vit as conv
from refjax.models import vit
from tests.torch_util import require_torch

TOL = 1e-5
SMALL = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)

# name -> (transformers config class, model class, config kwargs, extra input sizes (h, w))
CASES = {
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", dict(SMALL, intermediate_size=80),
             [(40, 52)]),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", dict(SMALL, intermediate_size=80),
               [(40, 52)]),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(SMALL, mlp_ratio=2),
               [(44, 61), (20, 27)]),
    "dinov2_swiglu": ("Dinov2Config", "Dinov2Model",
                      dict(SMALL, mlp_ratio=2, use_swiglu_ffn=True, qkv_bias=False), []),
    "dinov2_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                         dict(SMALL, mlp_ratio=2, num_register_tokens=3),
                         [(44, 61), (20, 27)]),
}
MEASURED: dict[str, float] = {}


def _randomise(torch, model, seed):
    """LayerNorm / LayerScale scales ~ 1 + 0.1 noise, token and position tables ~ N(0, 1)
    (so position resampling errors are not hidden under the patch embedding), the rest
    0.05 * noise."""
    gen = torch.Generator().manual_seed(seed)
    tables = ("class_embedding", "position_embedding", "cls_token", "mask_token",
              "register_tokens", "probe")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.split(".")
            is_norm = any(s in leaf[-2] for s in ("norm", "layrnorm")) if len(leaf) > 1 else False
            if (is_norm and leaf[-1] == "weight") or leaf[-1] == "lambda1":
                p.copy_(1.0 + 0.1 * noise)
            elif any(t in leaf[-1] or t in name for t in tables) and p.ndim != 4:
                p.copy_(noise)
            else:
                p.copy_(0.05 * noise)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    torch = require_torch()
    import transformers

    cfg_name, model_name, kw, sizes = CASES[request.param]
    hf_cfg = getattr(transformers, cfg_name)(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    tmodel = getattr(transformers, model_name)(hf_cfg).eval()
    _randomise(torch, tmodel, seed=sorted(CASES).index(request.param) + 1)
    directory = tmp_path_factory.mktemp(request.param)
    tmodel.save_pretrained(directory)
    params, cfg, report = conv.from_hf(str(directory))
    assert not report.unexpected and not report.missing, report.summary()
    return request.param, torch, tmodel, params, cfg, sizes


def _compare(name, key, ours, ref):
    ours, ref = np.asarray(ours), ref.detach().numpy()
    assert ours.shape == ref.shape, (key, ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    MEASURED[f"{name}/{key}"] = max(err, MEASURED.get(f"{name}/{key}", 0.0))
    assert err <= TOL, f"{name} {key}: max |diff| {err:.3g} > {TOL}"


def test_outputs_match_transformers(pair):
    """Native size, then the extra sizes (CLIP/SigLIP with ``interpolate_pos_encoding``;
    DINOv2 always resamples, non-square and not multiples of the patch). DINOv2 runs with a
    ``bool_masked_pos``: all False at the native size (== no mask in HF), random elsewhere."""
    name, torch, tmodel, params, cfg, sizes = pair
    model = vit.vision_tower(cfg)
    if cfg.is_dinov2:
        fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, output_hidden_states=True))
    else:
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))
    rng = np.random.default_rng(0)
    for n, (h, w) in enumerate([(cfg.image_size, cfg.image_size)] + sizes):
        img = rng.standard_normal((2, 3, h, w)).astype(np.float32)
        gh, gw = h // cfg.patch_size, w // cfg.patch_size
        x = jnp.asarray(img.transpose(0, 2, 3, 1))
        kw = {"output_hidden_states": True}
        if cfg.is_dinov2:
            masked = rng.random((2, gh * gw)) < 0.4 if n else np.zeros((2, gh * gw), bool)
            out, aux = fwd(params, x, jnp.asarray(masked))
            if n:
                kw["bool_masked_pos"] = torch.from_numpy(masked)
        else:
            out, aux = fwd(params, x)
            if n:
                kw["interpolate_pos_encoding"] = True
        with torch.no_grad():
            ref = tmodel(torch.from_numpy(img), **kw)
        tag = f"{name}@{h}x{w}"
        assert aux["grid"] == (gh, gw)
        _compare(tag, "last_hidden_state", out, ref.last_hidden_state)
        if ref.pooler_output is not None:
            _compare(tag, "pooler_output", aux["pooler_output"], ref.pooler_output)
        assert len(aux["hidden_states"]) == len(ref.hidden_states) == cfg.num_layers + 1
        for i, (a, b) in enumerate(zip(aux["hidden_states"], ref.hidden_states)):
            _compare(tag, f"hidden_states[{i}]", a, b)
        if cfg.family == "clip":
            want = ref.hidden_states[cfg.select_layer][:, 1:]
        else:
            want = ref.last_hidden_state[:, cfg.num_prefix_tokens:]
        want = want.reshape(2, gh, gw, cfg.hidden_size)
        _compare(tag, "features", aux["features"], want)
    print(name, {k: f"{v:.2e}" for k, v in MEASURED.items() if k.startswith(name)})


def test_export_loads_strictly(pair, tmp_path):
    name, torch, tmodel, params, cfg, _ = pair
    import transformers

    config_dict, sd = conv.to_hf(params, cfg)
    ref_sd = tmodel.state_dict()
    assert set(sd) == set(ref_sd)
    fresh = type(tmodel)(type(tmodel.config)(**{k: v for k, v in config_dict.items()
                                                if k not in ("model_type", "architectures")}))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    # and through a directory, as from_pretrained reads it
    conv.save_hf(str(tmp_path / "export"), params, cfg)
    auto = getattr(transformers, type(tmodel).__name__)
    loaded, info = auto.from_pretrained(str(tmp_path / "export"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_antialiased_bicubic_matches_torch():
    torch = require_torch()
    rng = np.random.default_rng(0)
    for n_in, n_out in [(4, 2), (4, 3), (5, 7), (37, 24), (3, 1), (6, 6), (2, 9)]:
        x = rng.standard_normal((1, 2, n_in, n_in))
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, n_out),
                                              mode="bicubic", align_corners=False,
                                              antialias=True).numpy()
        m = vit.bicubic_aa_matrix(n_in, n_out)
        ours = np.einsum("yh,nchw,xw->ncyx", m, x, m)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


REAL_COUNTS = {
    "clip-vit-large-patch14-336": 303_507_456,
    "siglip-so400m-patch14-384": 428_225_600,
    "dinov2-large": 304_368_640,
}


@pytest.mark.parametrize("preset", sorted(REAL_COUNTS))
def test_real_configs_count_like_transformers_on_meta(preset):
    torch = require_torch()
    import transformers

    cfg = vit.vit_config(preset)
    config_dict = cfg.to_hf()
    assert vit.ViTConfig.from_hf(config_dict, image_mean=cfg.image_mean,
                                 image_std=cfg.image_std) == cfg
    classes = {"clip": "CLIPVision", "siglip": "SiglipVision", "dinov2": "Dinov2"}
    prefix = classes[cfg.family]
    hf_cfg = getattr(transformers, prefix + "Config")(
        **{k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        model = getattr(transformers, prefix + "Model")(hf_cfg)
    n_hf = sum(p.numel() for p in model.parameters())
    assert n_hf == REAL_COUNTS[preset]
    assert vit.param_count(vit.abstract_params(cfg)) == n_hf
