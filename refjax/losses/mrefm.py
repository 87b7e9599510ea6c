"""MRefM pre-training losses (spec/oneref.md 3), pure ``(outputs, batch, config) -> (loss,
metrics)`` on the outputs of ``refjax.models.mrefm.MRefM``; ``config`` is ``config.loss``.

Terms, as ``utils/loss_utils.py::one_ref_loss`` and ``OneRef_model.py`` compute them:

- **Referring MIM**: cross-entropy of ``mim_logits`` against the tokenizer ids ``mim_ids``,
  mean over all masked patches of the batch (``nn.CrossEntropyLoss`` on ``logits[mask]``).
- **VTS** (visual target-relation score): labels from the box (``vts_labels``), L1 summed over the
  4 channels, mean over (B, P).
- **Referring MLM**: BEiT-3's ``BertCaptioningLoss`` on the gathered masked tokens: label
  smoothing eps -> target (1 - eps) on the true id and eps / (V - 1) elsewhere, per-token
  KL(target || softmax(logits)) summed over the vocabulary (computed in closed form, no dense
  target), then, once the (update) step > ``drop_worst_after``, only the
  ``int(n * (1 - drop_worst_ratio))`` smallest of the n token losses are kept; mean.
- **STS** (semantic target-relation score): ``KLDiv(batchmean)(log_softmax(sts_pred),
  softmax(label))`` where ``sts_pred`` is *already* a softmax over the L-2 positions: the
  official double softmax, reproduced on purpose. ``label`` = ``batch["sts_label"][:, 1:L-1]``
  (pads included, as the official 62 positions).
- **Box-mask constraint** (and, if enabled, the box L1/GIoU): ``refjax.losses.oneref`` on both
  step types (``use_box_mask_constraint``; focal x20 + dice x2 on ``sim``).

Alternation (spec 3.1): with ``alternate`` an even ``batch["step"]`` is a MIM step (MIM + VTS
terms), an odd one an MLM step (MLM + STS terms); the selection is a traced 0/1 weight, so one
compiled step serves both. ``alternate=False`` is a joint step (all terms). ``batch["step"]``
is the optimizer-update step (the task divides the micro-step by ``optim.accum_steps``).

Deviations (documented): the reference reduces per GPU (its ``nb``, its masked-token count and
its drop-worst ranking are per-GPU); here every reduction is over the global batch. Rows with
``valid == 0`` contribute nothing. With drop-worst active and ``int(n * (1 - r)) == 0`` the
reference's ``topk(k=0).mean()`` is NaN; here the term is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refjax.losses.oneref import oneref_loss

Array = jax.Array

KEYS = (
    "alternate", "mim", "mlm", "vts", "sts", "use_vts", "use_sts", "label_smoothing",
    "drop_worst_ratio", "drop_worst_after",
)


def _get(config: Mapping[str, Any], key: str) -> Any:
    try:
        return config[key]
    except (KeyError, AttributeError):
        raise KeyError(f"loss config lacks {key!r} (configs/oneref/mrefm.py defines: "
                       f"{KEYS} and refjax.losses.oneref.KEYS)") from None


def _valid(batch: Mapping[str, Array], b: int) -> Array:
    v = batch.get("valid")
    return jnp.ones((b,), jnp.float32) if v is None else v.astype(jnp.float32)[:b]


# ----------------------------------------------------------------------------- MIM
def mim_per_sample(logits: Array, ids: Array, mask: Array) -> dict[str, Array]:
    """Per-sample sums over masked patches: ``ce`` (cross-entropy), ``correct`` (argmax ==
    id) and ``count``; each (B,). ``logits`` (B, P, K), ``ids`` (B, P), ``mask`` (B, P)."""
    x = logits.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    logp = jax.nn.log_softmax(x, axis=-1)
    nll = -jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    correct = (jnp.argmax(x, axis=-1) == ids).astype(jnp.float32)
    return {"ce": jnp.sum(nll * m, -1), "correct": jnp.sum(correct * m, -1),
            "count": jnp.sum(m, -1)}


# ----------------------------------------------------------------------------- VTS
def vts_labels(box: Array, num_patches: int) -> Array:
    """Visual target-relation score labels (B, P, 4) of normalised cxcywh boxes (B, 4) on a
    G x G grid (official ``Visual_Target_Relation_Score_Generator`` with 24 -> G): for the patch
    at row j, column i (integer indices, the patch's top-left corner) ``((i - cx G) / G,
    (j - cy G) / G, 1 / max(w G, 1), 1 / max(h G, 1))``."""
    g = int(round(num_patches**0.5))
    if g * g != num_patches:
        raise ValueError(f"{num_patches} patches are not a square grid")
    bx = box.astype(jnp.float32) * g
    cx, cy = bx[:, 0], bx[:, 1]
    w, h = jnp.maximum(bx[:, 2], 1.0), jnp.maximum(bx[:, 3], 1.0)
    jj, ii = jnp.meshgrid(jnp.arange(g, dtype=jnp.float32), jnp.arange(g, dtype=jnp.float32),
                          indexing="ij")
    i, j = ii.reshape(-1)[None], jj.reshape(-1)[None]  # (1, P), row-major
    ones = jnp.ones_like(i)
    return jnp.stack([(i - cx[:, None]) / g, (j - cy[:, None]) / g,
                      ones / w[:, None], ones / h[:, None]], axis=-1)


def vts_per_sample(pred: Array, box: Array) -> Array:
    """(B,) mean over patches of the L1 summed over the 4 channels."""
    lab = vts_labels(box, pred.shape[1])
    return jnp.mean(jnp.sum(jnp.abs(pred.astype(jnp.float32) - lab), axis=-1), axis=-1)


# ----------------------------------------------------------------------------- MLM
def smoothed_kl(logits: Array, labels: Array, eps: float) -> Array:
    """Per-token ``KLDiv(log_softmax(logits), smoothed one-hot).sum(-1)`` (BertCaptioningLoss
    before reduction), (...,) float32, without building the dense target:
    ``sum_v q_v log q_v - (1 - eps - eps') log p_y - eps' sum_v log p_v`` with eps' =
    eps / (V - 1)."""
    x = logits.astype(jnp.float32)
    v = x.shape[-1]
    logp = jax.nn.log_softmax(x, axis=-1)
    lp_y = jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    eps = float(eps)
    off = eps / (v - 1)
    on = 1.0 - eps
    neg_entropy = float(on * np.log(on) if on > 0 else 0.0) + float(
        (v - 1) * off * np.log(off) if off > 0 else 0.0
    )
    cross = on * lp_y + off * (jnp.sum(logp, axis=-1) - lp_y)
    return neg_entropy - cross


def drop_worst_mean(per_token: Array, valid: Array, ratio: float, active: Array) -> Array:
    """Mean of the token losses where ``valid``; when ``active`` (traced bool) only the
    ``int(n * (1 - ratio))`` smallest of the n valid ones (static shapes: a sort over all
    slots with invalid ones last; ``int`` exactly as Python computes it, via a table)."""
    x = per_token.reshape(-1).astype(jnp.float32)
    m = valid.reshape(-1).astype(bool)
    n_slots = x.shape[0]
    n = jnp.sum(m.astype(jnp.int32))
    plain = jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)
    if ratio <= 0:
        return plain
    table = jnp.asarray([int(i * (1 - ratio)) for i in range(n_slots + 1)], jnp.int32)
    k = table[n]
    order = jnp.argsort(jnp.where(m, x, jnp.inf))
    rank = jnp.zeros((n_slots,), jnp.int32).at[order].set(jnp.arange(n_slots, dtype=jnp.int32))
    keep = m & (rank < k)
    dropped = jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(k, 1).astype(jnp.float32)
    return jnp.where(active, dropped, plain)


def mlm_labels(outputs: Mapping[str, Array], text_ids: Array) -> Array:
    """The clean token ids at the gathered MLM positions (B, K_t)."""
    return jnp.take_along_axis(text_ids.astype(jnp.int32), outputs["mlm_positions"], axis=1)


def mlm_per_token(outputs: Mapping[str, Array], text_ids: Array, eps: float) -> dict[str, Array]:
    """``kl`` (smoothed KL), ``correct`` (argmax == label), ``mask`` at the gathered MLM
    positions, each (B, K_t)."""
    labels = mlm_labels(outputs, text_ids)
    logits = outputs["mlm_logits"]
    return {
        "kl": smoothed_kl(logits, labels, eps),
        "correct": (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32),
        "mask": outputs["mlm_mask"].astype(jnp.float32),
    }


# ----------------------------------------------------------------------------- STS
def sts_per_sample(pred: Array, label: Array) -> Array:
    """(B,) ``sum_i softmax(label)_i (log softmax(label)_i - log_softmax(pred)_i)`` over the
    L-2 positions (``label`` = ``sts_label[:, 1:L-1]``); the batch mean is KLDiv batchmean."""
    target_log = jax.nn.log_softmax(label.astype(jnp.float32), axis=-1)
    pred_log = jax.nn.log_softmax(pred.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(target_log) * (target_log - pred_log), axis=-1)


def sts_target(batch: Mapping[str, Array], num_text: int) -> Array:
    return batch["sts_label"][:, 1 : num_text - 1]


# ----------------------------------------------------------------------------- total
def step_weights(step: Array | None, alternate: bool) -> tuple[Array, Array]:
    """(MIM weight, MLM weight) as float32 scalars: (1, 0) on even, (0, 1) on odd steps with
    ``alternate``; (1, 1) for a joint step."""
    if not alternate or step is None:
        return jnp.float32(1.0), jnp.float32(1.0)
    is_mim = (jnp.asarray(step) % 2 == 0).astype(jnp.float32)
    return is_mim, 1.0 - is_mim


def mrefm_loss(
    outputs: Mapping[str, Array], batch: Mapping[str, Array], config: Mapping[str, Any]
) -> tuple[Array, dict[str, Array]]:
    """The MRefM step loss (module docstring). ``batch`` needs ``step`` (update step),
    ``text_ids`` (clean), ``mim_mask``, ``box``, ``mask``, ``sts_label`` (with ``use_sts``),
    ``valid``;
    ``outputs`` those of ``MRefM`` with ``mim_ids``. Metrics: every term unweighted (times the
    step-type weight), ``mim_acc``, ``mlm_acc``, ``mim_step`` (1 on MIM steps) and ``loss``."""
    b = outputs["box"].shape[0]
    valid = _valid(batch, b)
    step = batch.get("step")
    w_mim, w_mlm = step_weights(step, bool(_get(config, "alternate")))

    base_total, base = oneref_loss(outputs, batch, config)
    metrics = {k: v for k, v in base.items() if k != "loss"}
    total = base_total

    mim = mim_per_sample(outputs["mim_logits"], outputs["mim_ids"], batch["mim_mask"])
    cnt = jnp.maximum(jnp.sum(mim["count"] * valid), 1.0)
    loss_mim = jnp.sum(mim["ce"] * valid) / cnt
    metrics["loss_mim"] = w_mim * loss_mim
    metrics["mim_acc"] = w_mim * jnp.sum(mim["correct"] * valid) / cnt
    total = total + w_mim * _get(config, "mim") * loss_mim
    if _get(config, "use_vts"):
        per = vts_per_sample(outputs["vts_pred"], batch["box"])
        loss_vts = jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        metrics["loss_mim_vts"] = w_mim * loss_vts
        total = total + w_mim * _get(config, "vts") * loss_vts

    eps = float(_get(config, "label_smoothing"))
    tok = mlm_per_token(outputs, batch["text_ids"], eps)
    tmask = tok["mask"] * valid[:, None]
    active = jnp.asarray(False)
    if step is not None:
        active = jnp.asarray(step) > int(_get(config, "drop_worst_after"))
    loss_mlm = drop_worst_mean(tok["kl"], tmask, float(_get(config, "drop_worst_ratio")), active)
    metrics["loss_mlm"] = w_mlm * loss_mlm
    metrics["mlm_acc"] = w_mlm * jnp.sum(tok["correct"] * tmask) / jnp.maximum(jnp.sum(tmask), 1)
    total = total + w_mlm * _get(config, "mlm") * loss_mlm
    if _get(config, "use_sts"):
        pred = outputs["sts_pred"]
        per = sts_per_sample(pred, sts_target(batch, pred.shape[1] + 2))
        loss_sts = jnp.sum(per * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        metrics["loss_mlm_sts"] = w_mlm * loss_sts
        total = total + w_mlm * _get(config, "sts") * loss_sts

    metrics["mim_step"] = w_mim if bool(_get(config, "alternate")) else jnp.float32(1.0)
    metrics["loss"] = total
    return total, metrics
