"""`python -m refjax convert beit3 IN OUT` writes an Orbax checkpoint the library restores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from refjax.__main__ import main
from refjax.convert import beit3 as conv
from refjax.convert.common import load_params, save_safetensors
from refjax.models.beit3 import BEiT3, BEiT3Config, beit3_config


def test_convert_beit3_cli_roundtrip(tmp_path, capsys):
    src_cfg = beit3_config("tiny", img_size=32)  # 2x2 grid in the "official" checkpoint
    v = nn.unbox(BEiT3(src_cfg).init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), None,
                                     jnp.zeros((1, 32, 32, 3))))
    sd = {"beit3." + k: val for k, val in conv.to_torch(v["params"], src_cfg).items()}
    inp = str(tmp_path / "beit3_tiny.safetensors")
    save_safetensors(inp, sd)
    out = str(tmp_path / "ckpt")
    assert main(["convert", "beit3", inp, out, "--img-size", "64", "--heads", "4"]) == 0
    assert "tensors converted" in capsys.readouterr().out

    params, meta = load_params(out)
    cfg = BEiT3Config(**meta["config"])
    assert (cfg.img_size, cfg.dim, cfg.depth, cfg.heads) == (64, 64, 2, 4)
    assert params["embed_positions"]["A"].shape == (3 + 16, 64)
    np.testing.assert_array_equal(params["text_embed"]["embedding"],
                                  v["params"]["text_embed"]["embedding"])
    outp, aux = BEiT3(cfg).apply({"params": params}, jnp.ones((1, 5), jnp.int32), None,
                                 jnp.zeros((1, 64, 64, 3)))
    assert outp.shape == (1, 17 + 5, 64) and np.isfinite(np.asarray(outp)).all()

    assert main(["convert", "beit3", inp, out]) == 2  # never overwrites: a one-line error
    with pytest.raises(FileExistsError):
        main(["--debug", "convert", "beit3", inp, out])


def test_convert_vqkd_cli_from_official_layout(tmp_path):
    """``python -m refjax convert vqkd`` on the golden official-layout checkpoint: the written
    tokenizer gives the official ids."""
    from refjax.convert.vqkd import load_converted
    from refjax.models.vqkd import VQKD
    from tests.test_vqkd import GOLDEN_ST, _golden

    out = str(tmp_path / "vqkd")
    assert main(["convert", "vqkd", GOLDEN_ST, out, "--variant", "tiny"]) == 0
    params, cfg = load_converted(out)
    data, images, _ = _golden()
    ids, _ = VQKD(cfg).apply({"params": params}, jnp.asarray(images["x224"]))
    np.testing.assert_array_equal(np.asarray(ids), data["ids_x224"])
    assert main(["convert", "nosuch", GOLDEN_ST, str(tmp_path / "x")]) == 2
