"""MRefM model, task and converter (spec/oneref.md 2.6, 3): parity of the heads with a torch
re-implementation of the official forward on torchscale BEiT-3, official-layout checkpoint
conversion both ways, the step-type selection inside the real train step, the doubled eval, the
frozen tokenizer, and an overfit that drives the MIM and MLM losses down."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import oneref as conv
from refjax.convert.common import ConversionError, load_state_dict, load_variables, save_params
from refjax.models.beit3 import beit3_config
from refjax.models.mrefm import MRefM
from refjax.tasks import get_task
from refjax.train import setup
from refjax.train.config import apply_overrides, from_json, load_config, to_json
from refjax.train.state import load_initial
from refjax.train.trainer import resolve_config
from tests.test_convert_oneref import _save
from tests.test_oneref_heads import _torch_heads
from tests.torch_ref import torchscale_beit3
from tests.torch_util import require_torch

TOL = 1e-5
CFG = beit3_config("tiny", img_size=64, vocab_size=100, max_source_positions=64)
CODES = 24
MREFM_KEYS = ("mim_head", "mim_vts_head", "mlm_head", "mlm_sts_head")


# ----------------------------------------------------------------------------- torch reference
def _torch_mrefm(torch, seed: int = 0):
    """``BEiT3ForGrounding(--enable_mrefm)``-shaped torch module with random weights, and the
    official MRefM forward (``OneRef_model.py``) written out."""
    tnn, F = torch.nn, torch.nn.functional
    d = CFG.dim

    class MLP(tnn.Module):  # OneRef's MLP: ReLU between layers, keys layers.{0,1,2}
        def __init__(self, out):
            super().__init__()
            self.layers = tnn.ModuleList([tnn.Linear(d, d), tnn.Linear(d, d), tnn.Linear(d, out)])

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x) if i == 2 else F.relu(layer(x))
            return x

    model = _torch_heads(torch, d, seg=False)
    model.beit3 = torchscale_beit3(CFG, seed=seed)
    model.mim_head = tnn.Linear(d, CODES)
    model.mim_vts_head = MLP(4)
    model.mlm_head = tnn.Linear(d, CFG.vocab_size)
    model.mlm_sts_head = MLP(1)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("beit3."):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _torch_forward(torch, model, ids, pad, img, mim_pos, lang_pos) -> dict:
    F = torch.nn.functional
    with torch.no_grad():
        enc = model.beit3(textual_tokens=torch.from_numpy(ids), visual_tokens=torch.from_numpy(img),
                          text_padding_position=torch.from_numpy(pad),
                          vision_masked_position=torch.from_numpy(mim_pos))["encoder_out"]
        nv = CFG.grid**2 + 1
        vision_feat, language_feat = enc[:, :nv], enc[:, nv:]
        vc = F.normalize(model.vision_head(vision_feat), dim=-1)
        vision_cls, vision_norm_token = vc[:, 0], vc[:, 1:]
        lc = F.normalize(model.language_head(language_feat), dim=-1)
        language_cls = lc[:, 0]
        visu = language_cls.unsqueeze(1).repeat(1, nv - 1, 1) * vision_norm_token
        text_dp = vision_cls.unsqueeze(1).repeat(1, ids.shape[1], 1) * lc
        lp = torch.from_numpy(lang_pos).bool()
        out = model(enc, nv)
        out.update(
            mim_pred=model.mim_head(F.normalize(visu, dim=-1)[torch.from_numpy(mim_pos)]),
            mim_vts_pred=model.mim_vts_head(visu),
            mlm_logits=model.mlm_head(language_feat[lp]),
            mlm_sts_pred=model.mlm_sts_head(text_dp[:, 1 : ids.shape[1] - 1]).squeeze(-1)
            .softmax(dim=-1),
        )
    return {k: v.numpy() for k, v in out.items()}


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    b, lt = 2, 9
    ids = rng.integers(3, CFG.vocab_size, (b, lt)).astype(np.int64)
    pad = np.zeros((b, lt), bool)
    pad[0, 6:] = True
    img = rng.standard_normal((b, 3, CFG.img_size, CFG.img_size)).astype(np.float32)
    mim_pos = rng.random((b, CFG.grid**2)) < 0.4
    lang_pos = np.zeros((b, lt), np.int64)
    lang_pos[0, [1, 3]] = 1
    lang_pos[1, [2, 5, 8]] = 1
    return ids, pad, img, mim_pos, lang_pos


@functools.cache
def _official():
    torch = require_torch()
    return torch, _torch_mrefm(torch)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch, model = _official()
    path = tmp_path_factory.mktemp("mrefm") / "rec_mrefm_pretrain_tiny.pth"
    _save(torch, path, model.state_dict(), {"layer_norm.weight": (CFG.dim,)})
    sd = load_state_dict(str(path))
    variables, report = conv.from_torch_mrefm(sd, CFG)
    return torch, model, sd, variables, report, str(path)


def test_conversion_report(converted):
    _, model, sd, variables, report, _ = converted
    assert not report.unexpected and not report.missing
    assert report.ignored == ["layer_norm.weight"]
    assert len(report.converted) == len(model.state_dict())
    assert set(MREFM_KEYS) <= set(variables["params"]) and "tokenizer" not in variables["params"]
    assert variables["params"]["mim_head"]["kernel"].shape == (CFG.dim, CODES)
    # The OneRef converter keeps reporting the MRefM heads as ignored.
    _, oneref_report = conv.from_torch(sd, CFG)
    assert {k.split(".")[0] for k in oneref_report.ignored} == set(MREFM_KEYS) | {"layer_norm"}
    with pytest.raises(ConversionError, match="mim_head.weight"):
        conv.from_torch_mrefm({k: v for k, v in sd.items() if not k.startswith("mim_")}, CFG)
    bad = dict(sd)
    bad["mlm_sts_head.layers.1.bias"] = np.zeros(CFG.dim + 1, np.float32)
    with pytest.raises(ConversionError, match=r"mlm_sts_head\.layers\.1\.bias"):
        conv.from_torch_mrefm(bad, CFG)


def test_heads_match_official_forward(converted):
    torch, model, _, variables, _, _ = converted
    ids, pad, img, mim_pos, lang_pos = _inputs()
    want = _torch_forward(torch, model, ids, pad, img, mim_pos, lang_pos)
    mrefm = MRefM(CFG, tokenizer_kind="vqkd", tokenizer_config=conv._Codebook(CODES),
                  max_masked_text=3)
    got, _ = jax.jit(mrefm.apply)(variables, ids.astype(np.int32), pad,
                                  img.transpose(0, 2, 3, 1), vision_mask=mim_pos,
                                  mlm_mask=lang_pos)
    got = jax.device_get(got)
    mlm_sel = got["mlm_logits"][got["mlm_mask"].astype(bool)]  # masked first, in order
    pairs = {
        "box": (got["box"], want["box"]),
        "sim": (got["sim"], want["sim"]),
        "mim_pred": (got["mim_logits"][mim_pos], want["mim_pred"]),
        "mim_vts_pred": (got["vts_pred"], want["mim_vts_pred"]),
        "mlm_logits": (mlm_sel, want["mlm_logits"]),
        "mlm_sts_pred": (got["sts_pred"], want["mlm_sts_pred"]),
    }
    for name, (a, b) in pairs.items():
        assert a.shape == b.shape, (name, a.shape, b.shape)
        err = float(np.abs(a - b).max())
        print(f"{name}: max |diff| {err:.2e}")
        assert err <= TOL, f"{name}: max |diff| {err:.3g} > {TOL}"
    assert got["mlm_logits"].shape == (2, 3, CFG.vocab_size)


def test_export_roundtrip_is_exact(converted, tmp_path):
    torch, model, sd, variables, _, path = converted
    back = conv.to_torch_mrefm(variables, CFG)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(back) == set(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()},
                          strict=True)
    with pytest.raises(ConversionError, match="not MRefM"):
        conv.to_torch_mrefm({"params": {k: v for k, v in variables["params"].items()
                                        if k != "mlm_head"}}, CFG)
    # The refjax checkpoint: MRefM init keeps the heads, a REC transfer drops them by name.
    out = str(tmp_path / "mrefm_ckpt")
    print(conv.convert_mrefm_cli(path, out, heads=CFG.heads))
    loaded, meta = load_variables(out)
    assert meta["model"] == "mrefm" and meta["codebook_size"] == CODES
    assert meta["config"]["img_size"] == CFG.img_size and meta["config"]["heads"] == CFG.heads
    np.testing.assert_array_equal(loaded["params"]["mlm_head"]["kernel"],
                                  variables["params"]["mlm_head"]["kernel"])
    model_trees = {"params": {**{k: None for k in variables["params"]}, "tokenizer": None},
                   "batch_stats": {}}
    mapped = get_task("mrefm").map_init(loaded, meta, model_trees)
    assert set(mapped["params"]) == set(variables["params"])
    rec_trees = {"params": {k: None for k in variables["params"] if k not in MREFM_KEYS},
                 "batch_stats": {}}
    mapped = get_task("rec").map_init(loaded, meta, rec_trees)
    assert set(mapped["params"]) == set(rec_trees["params"])


# ----------------------------------------------------------------------------- task and steps
B, LT, MASK_ID, VOCAB = 4, 12, 99, 100


def _config(*sets: str):
    config = load_config("configs/oneref/mrefm.py:tiny,recipe=paper")
    apply_overrides(config, [
        "model.dim=32", "model.depth=2", "model.heads=2", "model.mlp_dim=64", "model.img_size=64",
        f"model.vocab_size={VOCAB}", f"data.max_text_len={LT}", f"data.batch_size={B}",
        "tokenizer.codebook_size=32", "optim.schedule=constant", "optim.lr=1e-2",
        "optim.warmup_steps=0", "optim.b1=0.0", "optim.weight_decay=0.0", *sets,
    ])
    return resolve_config(config)


def _batch(task, config) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    b = task.dummy_batch(config, B)
    g = config.model.img_size // 16
    b["text_ids"] = rng.integers(3, MASK_ID, (B, LT)).astype(np.int32)
    lengths = np.array([LT, 9, 7, 10])
    b["text_padding"] = (np.arange(LT)[None] >= lengths[:, None]).astype(np.int32)
    b["text_ids"][:, 0] = 0
    b["text_ids"][np.arange(B), lengths - 1] = 2
    b["text_ids"] = np.where(b["text_padding"] == 1, 1, b["text_ids"]).astype(np.int32)
    b["mlm_mask"] = np.zeros((B, LT), np.int32)
    for i, n in enumerate(lengths):
        b["mlm_mask"][i, rng.choice(np.arange(1, n), 3, replace=False)] = 1
    b["mlm_ids"] = np.where(b["mlm_mask"] == 1, MASK_ID, b["text_ids"]).astype(np.int32)
    b["mim_mask"] = rng.random((B, g * g)) < 0.45
    b["image"] = rng.standard_normal(b["image"].shape).astype(np.float32)
    b["image_raw"] = rng.integers(0, 256, b["image_raw"].shape).astype(np.uint8)
    b["box"] = np.tile(np.array([[0.5, 0.4, 0.5, 0.4]], np.float32), (B, 1))
    b["mask"][:, 16:40, 16:48] = 1
    b["sts_label"] = ((np.arange(LT)[None] >= 2) & (np.arange(LT)[None] < 4)).astype(np.float32)
    b["sts_label"] = np.repeat(b["sts_label"], B, 0)
    b["valid"][:] = 1
    return b


@pytest.fixture(scope="module")
def trained():
    """One setup (tiny MRefM, paper recipe, k-means tokenizer), a fixed batch, the first two
    states and metrics, then an overfit run on the same batch."""
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        config = _config()
        s = setup.build(config, total_steps=100, devices=jax.devices()[:1], seed=0)
        batch = _batch(s.task, config)
        # Host copies of the first states (the jitted step donates its input state).
        states, metrics, evals = [jax.device_get(s.state)], [], []
        with s.activate():
            gb = s.global_batch(batch)
            state = s.state
            for _ in range(40):
                if len(evals) < 2:
                    evals.append(jax.device_get(s.eval_step(state.variables(), gb)))
                state, m = s.train_step(state, gb)
                metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
                if len(states) < 3:
                    states.append(jax.device_get(state))
        yield dict(config=config, setup=s, batch=batch, states=states, metrics=metrics,
                   evals=evals)
    finally:
        jax.config.update("jax_disable_most_optimizations", False)


def test_model_inputs_select_the_step_type():
    config = _config("optim.accum_steps=2")
    task = get_task("mrefm")
    batch = _batch(task, config)
    for step, is_mim in ((0, True), (1, True), (2, False), (3, False), (4, True)):
        inp = task.model_inputs({**batch, "step": jnp.int32(step)}, config)
        np.testing.assert_array_equal(inp["vision_mask"], batch["mim_mask"] & is_mim)
        np.testing.assert_array_equal(inp["text_ids"],
                                      batch["text_ids"] if is_mim else batch["mlm_ids"])
        assert bool(inp["run_tokenizer"]) == is_mim
    joint = _config("loss.alternate=False")
    inp = task.model_inputs({**batch, "step": jnp.int32(1)}, joint)
    np.testing.assert_array_equal(inp["vision_mask"], batch["mim_mask"])
    np.testing.assert_array_equal(inp["text_ids"], batch["mlm_ids"])
    ev = task.model_inputs(batch, config)  # eval: both views stacked
    assert ev["text_ids"].shape == (2 * B, LT) and ev["image_raw"].shape[0] == B
    np.testing.assert_array_equal(ev["vision_mask"][:B], batch["mim_mask"])
    assert not np.asarray(ev["vision_mask"][B:]).any()


def test_alternation_in_the_real_train_step(trained):
    states, metrics = trained["states"], trained["metrics"]
    p0, p1, p2 = (s.params for s in states)
    # Step 0 (even, MIM): image masked, text clean. Only MIM/VTS + constraint terms.
    m0, m1 = metrics[0], metrics[1]
    assert m0["mim_step"] == 1.0 and m0["loss_mim"] > 0 and m0["loss_mim_vts"] > 0
    assert m0["loss_mlm"] == 0.0 and m0["loss_mlm_sts"] == 0.0
    want0 = (m0["loss_mim"] + m0["loss_mim_vts"] + 20 * m0["loss_box_mask_focal"]
             + 2 * m0["loss_box_mask_dice"])
    assert m0["loss"] == pytest.approx(want0, rel=1e-5)
    # Step 1 (odd, MLM): text masked, image clean. Only MLM/STS + constraint terms.
    assert m1["mim_step"] == 0.0 and m1["loss_mlm"] > 0 and m1["loss_mlm_sts"] > 0
    assert m1["loss_mim"] == 0.0 and m1["loss_mim_vts"] == 0.0
    want1 = (m1["loss_mlm"] + m1["loss_mlm_sts"] + 20 * m1["loss_box_mask_focal"]
             + 2 * m1["loss_box_mask_dice"])
    assert m1["loss"] == pytest.approx(want1, rel=1e-5)
    # The inputs really differ (Adam with b1=0, no decay: a zero gradient moves nothing):
    # the MIM mask token gets a gradient on step 0 only, the <mask> text embedding on step 1.
    mask_tok = [p["beit3"]["vision_embed"]["mask_token"] for p in (p0, p1, p2)]
    text_row = [p["beit3"]["text_embed"]["embedding"][MASK_ID] for p in (p0, p1, p2)]
    assert not np.array_equal(mask_tok[0], mask_tok[1])
    np.testing.assert_array_equal(mask_tok[1], mask_tok[2])
    np.testing.assert_array_equal(text_row[0], text_row[1])
    assert not np.array_equal(text_row[1], text_row[2])
    # The tokenizer is frozen.
    f0, f2 = (s.frozen for s in (states[0], states[2]))
    np.testing.assert_array_equal(f0["tokenizer"]["codebook"], f2["tokenizer"]["codebook"])
    assert "tokenizer" not in p0


def test_eval_runs_both_views(trained):
    """The doubled eval equals the train step's terms with the same parameters."""
    evals, metrics, batch = trained["evals"], trained["metrics"], trained["batch"]
    task, config = trained["setup"].task, trained["config"]
    rows0, rows1 = evals
    np.testing.assert_array_equal(rows0["mim_count"], batch["mim_mask"].sum(1))
    np.testing.assert_array_equal(rows0["mlm_count"], batch["mlm_mask"].sum(1))
    acc = task.make_accumulator(config)
    acc.update(rows0)
    r0 = acc.allreduce().result()
    acc = task.make_accumulator(config)
    acc.update(rows1)
    r1 = acc.allreduce().result()
    assert r0["count"] == B and 0 <= r0["mim_acc"] <= 1 and 0 <= r0["mlm_acc"] <= 1
    assert r0["loss_mim"] == pytest.approx(metrics[0]["loss_mim"], rel=1e-4)
    assert r0["loss_mim_vts"] == pytest.approx(metrics[0]["loss_mim_vts"], rel=1e-4)
    assert r1["loss_mlm"] == pytest.approx(metrics[1]["loss_mlm"], rel=1e-4)
    assert r1["loss_mlm_sts"] == pytest.approx(metrics[1]["loss_mlm_sts"], rel=1e-4)
    for key in ("loss", "loss_box_mask_focal", "loss_box_mask_dice"):
        assert np.isfinite(r0[key])


def test_overfit_drives_mim_and_mlm_down(trained):
    m = trained["metrics"]
    mim = [x["loss_mim"] for x in m[0::2]]
    mlm = [x["loss_mlm"] for x in m[1::2]]
    mim_acc = [x["mim_acc"] for x in m[0::2]]
    print(f"MIM loss {mim[0]:.3f} -> {mim[-1]:.3f} (acc {mim_acc[-1]:.2f}); "
          f"MLM loss {mlm[0]:.3f} -> {mlm[-1]:.3f}")
    assert np.all(np.isfinite([x["loss"] for x in m]))
    assert mim[-1] < 0.5 * mim[0], mim
    assert mlm[-1] < 0.5 * mlm[0], mlm


def test_frozen_tokenizer_checkpoint_is_loaded(trained, tmp_path):
    s, config = trained["setup"], trained["config"]
    k, d = trained["states"][0].frozen["tokenizer"]["codebook"].shape
    codebook = np.random.default_rng(5).standard_normal((k, d)).astype(np.float32)
    path = str(tmp_path / "kmeans")
    save_params(path, {"codebook": codebook}, {"model": "patch_kmeans"})
    config = from_json(to_json(config))  # a copy: the fixture's config stays as it is
    with config.unlocked():
        config.model.tokenizer_init = path
    assert s.task.frozen_init(config) == {"tokenizer": path}
    state = load_initial(trained["states"][0], s.shardings, s.task, config)
    np.testing.assert_array_equal(np.asarray(state.frozen["tokenizer"]["codebook"]), codebook)
    # The MRefM workdir layout: a frozen tokenizer travels with map_init.
    mapped = s.task.map_init({"params": {"beit3": {}}, "frozen": {"tokenizer": {"x": 1}}}, {},
                             {"params": {"beit3": None, "tokenizer": None}, "batch_stats": {}})
    assert mapped["params"]["tokenizer"] == {"x": 1}


def test_tokenizer_skipped_on_mlm_steps(trained):
    s, batch = trained["setup"], trained["batch"]
    variables = trained["states"][0].variables()
    params = {**variables["params"], **variables["frozen"]}
    inp = s.task.model_inputs({**batch, "step": jnp.int32(0)}, trained["config"])
    ids = jax.jit(lambda p, x, run: s.model.apply({"params": p}, **{**x, "run_tokenizer": run})[0]
                  ["mim_ids"])
    on, off = ids(params, inp, jnp.bool_(True)), ids(params, inp, jnp.bool_(False))
    assert np.asarray(on).any() and not np.asarray(off).any()
    assert on.shape == (B, (trained["config"].model.img_size // 16) ** 2)


def test_configs():
    for arg in ("tiny", "base,stage=frozen", "large,recipe=paper", "base,objective=mvlm",
                "tiny,tokenizer=vqkd"):
        c = load_config(f"configs/oneref/mrefm.py:{arg}")
        assert c.task == "mrefm" and c.train.log_every % 2 == 1
    base = load_config("configs/oneref/mrefm.py:base,stage=frozen")
    assert (base.optim.lr, base.data.batch_size, base.train.epochs) == (2.5e-4, 512, 10)
    assert base.optim.frozen == "^beit3/" and base.optim.weight_decay == 1e-4
    assert base.optim.schedule == "epoch_cosine" and base.optim.warmup_steps == 0
    assert base.optim.grad_clip_norm == 0 and base.model.tokenizer == "vqkd"
    assert not base.loss.use_vts and not base.loss.use_sts  # released recipe
    full = load_config("configs/oneref/mrefm.py:large")
    assert (full.optim.lr, full.data.batch_size, full.train.epochs) == (3e-5, 64, 100)
    assert load_config("configs/oneref/mrefm.py:base").optim.lr == 5e-5
    mvlm = load_config("configs/oneref/mrefm.py:base,objective=mvlm,recipe=paper")
    assert mvlm.data.random_masking and not mvlm.model.referring_mim
    assert not mvlm.loss.use_vts and not mvlm.loss.use_sts
    tiny = load_config("configs/oneref/mrefm.py:tiny")
    assert tiny.model.tokenizer == "kmeans" and tiny.model.img_size == 128
    assert tiny.data.num_scales == 6
    with pytest.raises(ValueError, match="objective"):
        load_config("configs/oneref/mrefm.py:tiny,objective=mae")
