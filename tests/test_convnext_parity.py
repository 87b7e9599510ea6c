"""Parity of refjax ConvNeXt with transformers ``ConvNextModel`` on the same random weights
(fp32, CPU), converted through ``refjax.convert.convnext``; export back loads strictly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import convnext as conv
from refjax.models.convnext import ConvNeXt, convnext_config, param_count, param_template
from tests.torch_util import require_torch

TOL = 1e-5
# Blocks use HF's fixed 1e-6; a final eps far from it shows it is read from config.json.
HF_KW = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], layer_norm_eps=1e-3)


def _randomise(torch, model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if name.endswith("layer_scale_parameter"):
                p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=g))
            elif "layernorm" in name or "downsampling_layer.0" in name:
                p.copy_(1 + 0.1 * n if name.endswith("weight") else 0.05 * n)
            elif name.endswith("bias"):
                p.copy_(0.05 * n)
            else:  # conv / linear weights: He-normal, so the residual branches are not tiny
                p.copy_(n * (2.0 / (p[0].numel())) ** 0.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch = require_torch()
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    model = ConvNextModel(ConvNextConfig(**HF_KW)).eval()
    _randomise(torch, model, seed=1)
    d = str(tmp_path_factory.mktemp("convnext") / "hf")
    model.save_pretrained(d)
    params, cfg, report = conv.from_hf(d)
    assert not report.unexpected and not report.missing and not report.ignored
    assert cfg.eps == 1e-6 and cfg.final_eps == 1e-3 and cfg.scan
    return torch, model, cfg, params


@pytest.mark.parametrize("hw", [(64, 64), (70, 52)])
def test_outputs_match_hf(pair, hw):
    torch, model, cfg, params = pair
    rng = np.random.default_rng(hash(hw) % 1000)
    img = rng.standard_normal((2, 3, *hw)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(img), output_hidden_states=True)
    out, aux = jax.jit(lambda p, x: ConvNeXt(cfg).apply({"params": p}, x))(
        params, jnp.asarray(img.transpose(0, 2, 3, 1))
    )
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    pairs = {
        "pooler_output": (out, ref.pooler_output.numpy()),
        "last_hidden_state": (aux["features"], nhwc(ref.last_hidden_state)),
        "hidden_states[0] (stem)": (aux["stem"], nhwc(ref.hidden_states[0])),
    }
    assert len(ref.hidden_states) == 1 + len(aux["stages"])
    for i, s in enumerate(aux["stages"]):
        pairs[f"hidden_states[{i + 1}]"] = (s, nhwc(ref.hidden_states[i + 1]))
    errs = {}
    for name, (ours, theirs) in pairs.items():
        ours = np.asarray(ours)
        assert ours.shape == theirs.shape, name
        errs[name] = float(np.abs(ours - theirs).max())
    print(f"ConvNeXt parity {hw}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL, errs
    # a real check: stage 1's block branch is not negligible next to its input (the stem)
    h0, h1 = ref.hidden_states[0].numpy(), ref.hidden_states[1].numpy()
    assert (h1 - h0).std() > 0.2 * h0.std()


def test_export_roundtrip_loads_strictly_into_hf(pair, tmp_path):
    torch, model, cfg, params = pair
    from transformers import ConvNextModel

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    back = conv.to_hf(params, cfg, out_dir=str(tmp_path / "export"))
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    fresh = ConvNextModel(model.config).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    loaded, info = ConvNextModel.from_pretrained(str(tmp_path / "export"),
                                                 output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.config.layer_norm_eps == model.config.layer_norm_eps
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.eval()(x).pooler_output.numpy(),
                                      model(x).pooler_output.numpy())


def test_xxlarge_param_count_matches_hf_meta_model():
    torch = require_torch()
    from transformers import ConvNextConfig, ConvNextModel

    with torch.device("meta"):
        hf = ConvNextModel(ConvNextConfig(hidden_sizes=[384, 768, 1536, 3072],
                                          depths=[3, 4, 30, 3]))
    n_hf = sum(p.numel() for p in hf.parameters())
    n_ours = param_count(param_template(convnext_config("hf_convnext_xxlarge")))
    assert n_hf == n_ours == 843_398_016
