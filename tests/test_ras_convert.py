"""RAS assembly (refjax.convert.ras) from tiny Hugging Face directories written by refjax's own
exporters (their parity with transformers is tested in the per-model tests): plain Vicuna,
original LLaVA-1.5 (``model.mm_projector.*``, ``model.vision_tower.vision_tower.*``) and
llava-hf layouts; SigLIP's pooling head dropped; ConvNeXt from HF and timm/open_clip layouts;
prefixes at the mean embedding; AR vocabulary growth; the Orbax checkpoint round trip."""

import os

import jax
import numpy as np
import pytest
from flax import linen as nn

from refjax.convert import convnext as convnext_conv
from refjax.convert import hf
from refjax.convert import llama as llama_conv
from refjax.convert import ras as conv
from refjax.convert import vit as vit_conv
from refjax.convert.common import ConversionError, save_safetensors
from refjax.models import convnext, llama, vit
from refjax.models.ras import abstract_variables
from tests.ras_util import random_variables

LLM = llama.llama_config("tiny")  # d 64
TOWER_KW = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=8)
CLIP = vit.ViTConfig(family="clip", image_size=32, **TOWER_KW)
SIGLIP = vit.ViTConfig(family="siglip", image_size=40, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, use_head=True, **TOWER_KW)
DINO = vit.ViTConfig(family="dinov2", image_size=36, hidden_act="gelu", layer_norm_eps=1e-6,
                     **TOWER_KW)
CONVNEXT = convnext.convnext_config("tiny_test")


def _rand(tree, seed):
    return random_variables(tree, seed)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {"root": str(root)}
    p = {
        "llm": _rand(llama.param_template(LLM), 0),
        "clip": _rand(vit.abstract_params(CLIP), 1),
        "clip_llava": _rand(vit.abstract_params(CLIP), 2),
        "siglip": _rand(vit.abstract_params(SIGLIP), 3),
        "dinov2": _rand(vit.abstract_params(DINO), 4),
        "convnext": _rand(convnext.param_template(CONVNEXT), 5),
    }
    rng = np.random.default_rng(6)
    proj = {"0.weight": rng.standard_normal((64, 32)), "0.bias": rng.standard_normal(64),
            "2.weight": rng.standard_normal((64, 64)), "2.bias": rng.standard_normal(64)}
    proj = {k: v.astype(np.float32) for k, v in proj.items()}
    out["params"], out["proj"] = p, proj
    llama_conv.export_hf(p["llm"], LLM, str(root / "vicuna"))
    vit_conv.save_hf(str(root / "clip"), p["clip"], CLIP)
    vit_conv.save_hf(str(root / "siglip"), p["siglip"], SIGLIP)
    vit_conv.save_hf(str(root / "dinov2"), p["dinov2"], DINO)
    convnext_conv.to_hf(p["convnext"], CONVNEXT, str(root / "convnext"))
    os.makedirs(root / "open_clip")
    save_safetensors(str(root / "open_clip" / "open_clip_model.safetensors"),
                     convnext_conv.to_timm(p["convnext"], CONVNEXT, prefix="visual.trunk."))
    # original LLaVA-1.5: LLaMA keys + mm_projector + the CLIP tower under vision_tower
    llm_cfg, llm_sd = llama_conv.to_hf(p["llm"], LLM)
    _, clip_sd = vit_conv.to_hf(p["clip_llava"], CLIP)
    sd = dict(llm_sd)
    sd.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    sd.update({f"model.vision_tower.vision_tower.vision_model.{k}": v
               for k, v in clip_sd.items()})
    hf.write_checkpoint(str(root / "llava"), {**llm_cfg, "model_type": "llava_llama",
                                              "mm_projector_type": "mlp2x_gelu",
                                              "mm_hidden_size": 32}, sd)
    # llava-hf (LlavaForConditionalGeneration as saved by transformers)
    sd = {("language_model." + k if k.startswith("model.") else "language_model." + k): v
          for k, v in llm_sd.items()}
    sd.update({f"multi_modal_projector.linear_{1 if k[0] == '0' else 2}.{k[2:]}": v
               for k, v in proj.items()})
    sd.update({f"vision_tower.vision_model.{k}": v for k, v in clip_sd.items()})
    hf.write_checkpoint(str(root / "llava_hf"), {
        "model_type": "llava", "text_config": {**llm_cfg, "eos_token_id": 7},
        "vision_config": CLIP.to_hf()}, sd)
    return out


def _eq(a, b):
    la, lb = nn.unbox(a), nn.unbox(b)
    assert jax.tree.structure(la) == jax.tree.structure(lb)
    for x, y in zip(jax.tree.leaves(la), jax.tree.leaves(lb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_llava_layout_full_ensemble_and_checkpoint_round_trip(dirs, tmp_path):
    r = dirs["root"]
    out = str(tmp_path / "ras")
    params, cfg, report = conv.assemble(
        f"{r}/llava", f"{r}/clip", f"{r}/siglip", f"{r}/dinov2", f"{r}/convnext", "hf", out,
        convnext_size=64, pe2d_grid=8, pe2d_dim=16)
    p = dirs["params"]
    _eq(params["llm"], p["llm"])
    _eq(params["clip"], p["clip_llava"])  # the LLaVA file's tower wins over clip_dir's
    _eq(params["dinov2"], p["dinov2"])
    _eq(params["convnext"], p["convnext"])
    sig = dict(p["siglip"])
    sig.pop("head")
    _eq(params["siglip"], sig)
    assert any(k.startswith("head.") for k in report.parts["siglip"].ignored)
    assert not report.parts["siglip"].unexpected
    proj = dirs["proj"]
    np.testing.assert_array_equal(params["image_projector"]["fc1"]["kernel"], proj["0.weight"].T)
    np.testing.assert_array_equal(params["image_projector"]["fc2"]["bias"], proj["2.bias"])
    emb = np.asarray(p["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(params["mask_pool_pre"], emb.mean(0), rtol=1e-6)
    np.testing.assert_allclose(params["mask_ref_pre"], emb.mean(0), rtol=1e-6)
    assert set(report.initialised) == {"mask_projector", "head"}
    assert cfg.encoder_names == ("clip", "siglip", "dinov2", "convnext")
    assert cfg.grid("convnext") == (2, 2) and cfg.pooled_dim == 32 * 3 + 32 + 32
    assert not report.parts["llm"].unexpected and not report.parts["llm"].missing
    print(report.summary())
    loaded, cfg2 = conv.load_assembled(out)
    assert cfg2 == cfg
    _eq(loaded, params)
    # the tree is exactly the model's: same structure and shapes as RAS(cfg)'s eval_shape
    shapes = nn.unbox(abstract_variables(cfg2))["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(loaded)
    assert all(a.shape == np.shape(b) for a, b in zip(jax.tree.leaves(shapes),
                                                      jax.tree.leaves(loaded)))


def test_plain_vicuna_llava_hf_and_timm_convnext(dirs):
    r = dirs["root"]
    p = dirs["params"]
    params, cfg, report = conv.assemble(f"{r}/vicuna", f"{r}/clip", convnext_dir=f"{r}/open_clip",
                                        convnext_layout="timm", convnext_size=64)
    _eq(params["clip"], p["clip"])
    _eq(params["convnext"], p["convnext"])
    assert "image_projector" in report.initialised and cfg.encoder_names == ("clip", "convnext")
    assert cfg.encoder_configs["convnext"].eps == 1e-6  # inferred for a non-xxlarge shape
    params, cfg, report = conv.assemble(f"{r}/llava_hf", f"{r}/clip", decoding="ar")
    # AR: [SEG] appended as a new vocabulary row (mean init); eos from the text config
    assert cfg.seg_token_id == LLM.vocab_size and cfg.llm.vocab_size == LLM.vocab_size + 1
    assert cfg.eos_token_id == 7
    emb = params["llm"]["embed_tokens"]["embedding"]
    old = np.asarray(p["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(emb[:-1], old)
    np.testing.assert_allclose(emb[-1], old.mean(0), rtol=1e-6)
    assert params["llm"]["lm_head"]["kernel"].shape == (64, LLM.vocab_size + 1)
    _eq(params["clip"], p["clip_llava"])
    np.testing.assert_array_equal(params["image_projector"]["fc1"]["kernel"],
                                  dirs["proj"]["0.weight"].T)
    assert "seg_proj" in params and "head" not in params


def test_classify_keys_and_bad_projector(dirs, tmp_path):
    assert conv.classify_key("model.mm_projector.2.bias") == ("projector", "fc2.bias")
    assert conv.classify_key("model.layers.0.mlp.up_proj.weight")[0] == "llm"
    assert conv.classify_key("language_model.lm_head.weight") == ("llm", "lm_head.weight")
    assert conv.classify_key("model.vision_tower.vision_tower.vision_model.x") == (
        "clip", "vision_model.x")
    r = dirs["root"]
    config, sd = hf.read_checkpoint(f"{r}/llava")
    sd["model.mm_projector.0.weight"] = sd["model.mm_projector.0.weight"][:, :16]
    hf.write_checkpoint(str(tmp_path / "bad"), config, sd)
    with pytest.raises(ConversionError, match="fc1.weight"):
        conv.assemble(str(tmp_path / "bad"), f"{r}/clip")


def test_cli_convert_ras(dirs, tmp_path):
    """``python -m refjax convert ras --llm DIR --clip DIR OUT`` writes a loadable RAS."""
    from refjax.__main__ import main

    r, out = dirs["root"], str(tmp_path / "ras_cli")
    assert main(["convert", "ras", "--llm", f"{r}/llava", "--clip", f"{r}/clip", out]) == 0
    params, cfg = conv.load_assembled(out)
    assert cfg.encoder_names == ("clip",)
    _eq(params["llm"], dirs["params"]["llm"])
    assert main(["convert", "ras", "--llm", f"{r}/llava", out + "2"]) == 2  # --clip missing
    assert main(["convert", "ras", "--llm", f"{r}/nothere", "--clip", f"{r}/clip",
                 out + "3"]) == 2
