"""The task seam: a task defined entirely in this file (its own model, loss, data fields, frozen
variables, metric) trains through the real trainer, evaluates, resumes and restores, with no
edit to any file outside this test. That is the proof that new systems are additions."""

from __future__ import annotations

import os
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.common import mesh_section, optim_section, train_section
from refjax.data.spec import DataTask
from refjax.evaluate.metrics import allreduce_sums
from refjax.tasks import Task, get_task, register_task
from refjax.train import trainer
from tests.data_fixtures import data_config, refshapes_tiny_dir  # noqa: F401

SIZE, LEN = 32, 12


class ToyData(DataTask):
    """OneRef-like rows plus a field of its own: the canvas image's mean colour."""

    def eligible(self, ex: dict) -> bool:
        return ex["num_targets"] > 0 and len(ex["ref_masks"]) == 0

    def blank(self) -> dict[str, np.ndarray]:
        return {**super().blank(), "mean_rgb": np.zeros(3, np.float32)}

    def row(self, ex: dict) -> dict[str, np.ndarray]:
        row = super().row(ex)
        row["mean_rgb"] = ex["image"].reshape(-1, 3).mean(0).astype(np.float32)
        return row


class ToyModel(nn.Module):
    """Box from pooled patches and the mean colour; ``encoder`` is a frozen random projection."""

    @nn.compact
    def __call__(self, image, mean_rgb, *, deterministic=True):
        b = image.shape[0]
        patches = image.reshape(b, SIZE // 8, 8, SIZE // 8, 8, 3).mean((2, 4)).reshape(b, -1)
        feats = nn.Dense(16, name="encoder")(patches)
        h = nn.relu(nn.Dense(32, name="head_hidden")(jnp.concatenate([feats, mean_rgb], -1)))
        box = jax.nn.sigmoid(nn.Dense(4, name="head_out")(h))
        return {"box": box}, {"feats": feats}


class ToyAccumulator:
    def __init__(self, sums=None):
        self.sums = sums or {"abs_err": 0.0, "count": 0.0}

    def update(self, rows: Mapping[str, np.ndarray]) -> None:
        valid = np.asarray(rows["valid"]) > 0
        self.sums["abs_err"] += float(np.asarray(rows["abs_err"])[valid].sum())
        self.sums["count"] += float(valid.sum())

    def allreduce(self) -> ToyAccumulator:
        return ToyAccumulator({k: float(v) for k, v in allreduce_sums(self.sums).items()})

    def result(self) -> dict[str, float]:
        n = self.sums["count"]
        return {"count": n, "l1": self.sums["abs_err"] / max(n, 1.0)}


class ToyTask(Task):
    name = "toy"

    def build_model(self, config):
        return ToyModel()

    def data_task(self, config):
        return ToyData(config.data.image_size, config.data.max_text_len, config.data.num_scales)

    def model_inputs(self, batch, config):
        return {"image": batch["image"], "mean_rgb": batch["mean_rgb"]}

    def frozen_subtrees(self, config):
        return ("encoder",)

    def loss(self, outputs, aux, batch, config):
        valid = batch["valid"].astype(jnp.float32)
        err = jnp.abs(outputs["box"] - batch["box"]).sum(-1)
        loss = config.loss.weight * jnp.sum(err * valid) / jnp.maximum(valid.sum(), 1.0)
        return loss, {"loss": loss}

    def eval_outputs(self, outputs, aux, batch, config):
        return {"abs_err": jnp.abs(outputs["box"] - batch["box"]).sum(-1),
                "valid": batch["valid"]}

    def make_accumulator(self, config):
        return ToyAccumulator()

    def make_predictor(self, model, variables, config):
        return lambda image, rgb: model.apply(variables, image, rgb)[0]["box"]


register_task("toy", ToyTask, replace=True)


def toy_config(data_dir: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "toy"
    c.model = {"unused": 0}
    c.data = data_config(data_dir, image_size=SIZE, max_text_len=LEN, batch_size=8,
                         eval_batch_size=8)
    c.optim = optim_section(lr=3e-3, schedule="constant")
    c.loss = {"weight": 1.0}
    c.train = train_section(total_steps=6, log_every=2, eval_every=3, ckpt_every=3,
                            best_metric="l1", best_mode="min", progress=False)
    c.mesh = mesh_section()
    c.layout = "dp"
    c.init = None
    c.eval = {"splits": ("val",)}
    c.lock()
    return c


def test_a_task_defined_in_a_test_trains_evaluates_and_restores(refshapes_tiny_dir, tmp_path):  # noqa: F811
    assert isinstance(get_task("toy"), ToyTask)
    config = toy_config(refshapes_tiny_dir)
    workdir = str(tmp_path / "toy")
    result = trainer.train(config, workdir)
    assert result["step"] == 6 and result["splits"]["val"]["count"] > 0
    assert np.isfinite(result["splits"]["val"]["l1"]) and result["train"]["loss"] > 0
    curve = trainer.read_curve(workdir, "train")
    assert [r["step"] for r in curve] == [2, 4, 6]
    assert [r["step"] for r in trainer.read_curve(workdir, "val")] == [3, 6]

    # Frozen variables: saved with the run, never trained, kept out of the optimizer.
    task, model, variables, _ = trainer.load_for_inference(workdir, step=6)
    assert set(variables["frozen"]) == {"encoder"} and "encoder" not in variables["params"]
    _, _, first, _ = trainer.load_for_inference(workdir, step=3)
    for a, b in zip(jax.tree.leaves(first["frozen"]), jax.tree.leaves(variables["frozen"])):
        np.testing.assert_array_equal(a, b)
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(first["params"]), jax.tree.leaves(variables["params"]))]
    assert all(moved)
    state, _, _ = trainer.restore_train_state(config, workdir, step=6)
    opt_leaves = jax.tree.leaves(state.opt_state)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in opt_leaves if x.ndim) == 2 * n_params  # Adam slots: params only

    # Evaluation from the workdir's config reproduces the final metrics; prediction works.
    ev = trainer.evaluate(None, workdir, splits=["val"], step=6)
    assert ev["splits"]["val"] == pytest.approx(result["splits"]["val"])
    from refjax.predict import Predictor

    predict = Predictor.from_workdir(workdir)
    box = predict(np.zeros((2, SIZE, SIZE, 3), np.float32), np.zeros((2, 3), np.float32))
    assert box.shape == (2, 4)

    # A parameters-only export evaluates to the same metrics and has no optimizer state.
    shipped = trainer.export_params(workdir, str(tmp_path / "shipped"), step=6)
    assert os.listdir(os.path.join(shipped, "checkpoints", "6")).count("train") == 0
    ev2 = trainer.evaluate(None, shipped, splits=["val"])
    assert ev2["step"] == 6 and ev2["splits"]["val"] == pytest.approx(ev["splits"]["val"])
    with pytest.raises(FileExistsError):
        trainer.export_params(workdir, shipped)
    # The training machine's data settings can be reset in what is written (a GPU run's 14
    # workers and carried tokenizer); an unknown key fails before anything is written.
    portable = trainer.export_params(
        workdir, str(tmp_path / "portable"), step=6,
        sets=["data.num_workers=0", "data.batch_size=5", "data.tokenizer_path=/x/beit3.spm"])
    written = trainer.load_config_json(portable)
    assert (written.data.num_workers, written.data.batch_size) == (0, 5)
    assert written.data.tokenizer_path == "/x/beit3.spm"
    assert written.model.to_dict() == config.model.to_dict()
    from refjax.train.config import apply_overrides

    apply_overrides(written, ["data.tokenizer_path=None"])
    assert written.data.tokenizer_path is None
    with pytest.raises(KeyError, match="data.nope"):
        trainer.export_params(workdir, str(tmp_path / "bad"), step=6, sets=["data.nope=1"])
    assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "bad.tmp")

    # A finished run with the same config resumes without training; a different config is
    # refused naming the keys unless the caller asks to resume or to overwrite.
    again = trainer.train(config, workdir)
    assert again["step"] == 6 and again["train"]["loss"] == result["train"]["loss"]
    other = toy_config(refshapes_tiny_dir)
    with other.unlocked():
        other.optim.lr = 1e-2
    with open(os.path.join(workdir, "config.json")) as f:
        saved = f.read()
    with pytest.raises(trainer.ConfigMismatchError, match=r"\['optim.lr'\]"):
        trainer.train(other, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == saved  # never rewritten
    fresh = trainer.train(other, workdir, overwrite=True)
    assert fresh["step"] == 6
    assert trainer.load_config_json(workdir).optim.lr == 1e-2
