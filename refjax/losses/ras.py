"""RAS losses (spec/ras.md 5.4, 5.6, 7): pure functions of (outputs, batch, config.loss).

``outputs`` is the dict the RAS task hands over (``refjax.tasks.ras.RASTask.loss``):

- NAR selection: ``logits`` (B, P) float32, one per candidate;
- AR baseline: ``scores`` (B, K, P) (``[SEG]`` k against candidate i; padded candidates hold
  ``refjax.models.ras.MASKED_SCORE``) and ``decision`` (B, K + 1, 2) (the ``[SEG]`` and EOS
  logits at the K + 1 decision positions);
- captioning (stage 1): ``lm_logits`` (B, L, V).

Batch fields read: ``valid`` (B,), ``pool_valid`` / ``pool_labels`` (B, P) (label 1 positive, 0
negative, -1 ignored: inside the optional IoA ignore band), AR ``seg_valid`` (B, K) and
``ar_valid`` (B, K + 1), captioning ``labels`` (B, L) (-100: no target). Every reduction is in
float32; metrics are the per-term values (and ``loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from refjax.models.ras import IGNORE_INDEX, hungarian_match

Array = jax.Array
Metrics = dict[str, Array]


def _f32(x: Any) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def candidate_mask(batch: Mapping[str, Any]) -> tuple[Array, Array]:
    """``(labels (B, P) float32 in {0, 1}, weight-able mask (B, P) float32)``: valid rows'
    valid candidates whose label is not ignored (-1)."""
    labels = jnp.asarray(batch["pool_labels"])
    mask = (_f32(batch["pool_valid"]) * _f32(batch["valid"])[:, None]
            * (labels >= 0).astype(jnp.float32))
    return (labels > 0).astype(jnp.float32), mask


def weighted_bce(logits: Array, labels: Array, mask: Array, pos_weight: float) -> Array:
    """``sum_i m_i w_i BCE(s_i, y_i) / max(sum_i m_i, 1)`` (spec 5.4) in float32, on logits:
    ``BCE = -[y log sigma(s) + (1 - y) log sigma(-s)]`` via ``log_sigmoid``; ``w_i =
    pos_weight`` for positives, 1 otherwise; normalised by the number of counted (valid)
    candidates of the whole batch, not by the weights."""
    s = _f32(logits)
    y = _f32(labels)
    m = _f32(mask)
    bce = -(y * jax.nn.log_sigmoid(s) + (1.0 - y) * jax.nn.log_sigmoid(-s))
    w = jnp.where(y > 0, jnp.float32(pos_weight), jnp.float32(1.0))
    return jnp.sum(m * w * bce) / jnp.maximum(jnp.sum(m), 1.0)


def nar_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any],
             cfg: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """The NAR selection loss: weighted BCE over the candidates (spec 5.4)."""
    logits = _f32(outputs["logits"])
    labels, mask = candidate_mask(batch)
    loss = weighted_bce(logits, labels, mask, float(cfg["pos_weight"]))
    n = jnp.maximum(jnp.sum(mask), 1.0)
    correct = ((logits > 0).astype(jnp.float32) == labels).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "bce": loss,
        "cand_acc": jnp.sum(correct * mask) / n,
        "pos_frac": jnp.sum(labels * mask) / n,
    }
    return loss, metrics


def _match_one(cost: Array, seg_valid: Array, target: Array):
    return hungarian_match(cost, seg_valid, target)


def ar_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any],
            cfg: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """The AR baseline's loss (spec 5.6).

    Per row, the K ``[SEG]`` predictions (``seg_valid``) and the target set (valid positive
    candidates) are matched by ``refjax.models.ras.hungarian_match`` on the cost ``-log
    softmax(scores_k)[i]`` (no gradient through the matching); ``match`` = the mean CE over
    candidates of the matched ``[SEG]`` s (over all matched pairs of the batch). ``stop`` =
    the mean two-way CE of the [SEG]-vs-EOS decision at each of the K + 1 positions
    (``[SEG]`` before the K [SEG] tokens, EOS after them; the restriction to these two tokens
    is the decoding rule of ``refjax.models.ras.ar_generate``). ``loss = ar_match * match +
    ar_stop * stop``.
    """
    scores = _f32(outputs["scores"])
    decision = _f32(outputs["decision"])
    row = _f32(batch["valid"])
    labels, mask = candidate_mask(batch)
    target = (labels * mask) > 0
    seg_valid = (jnp.asarray(batch["seg_valid"]) > 0) & (row[:, None] > 0)
    logp = jax.nn.log_softmax(scores, axis=-1)  # (B, K, P)
    rows, cols, ok = jax.vmap(_match_one)(jax.lax.stop_gradient(-logp), seg_valid, target)
    lp_rows = jnp.take_along_axis(logp, rows[:, :, None], axis=1)  # (B, M, P)
    picked = jnp.take_along_axis(lp_rows, cols[:, :, None], axis=2)[..., 0]  # (B, M)
    okf = ok.astype(jnp.float32)
    n_match = jnp.sum(okf)
    match = -jnp.sum(picked * okf) / jnp.maximum(n_match, 1.0)

    ar_valid = _f32(batch["ar_valid"]) * row[:, None]
    seg_ext = jnp.concatenate([seg_valid, jnp.zeros((seg_valid.shape[0], 1), bool)], axis=1)
    target_eos = (~seg_ext).astype(jnp.int32)  # 0: [SEG], 1: EOS
    logq = jax.nn.log_softmax(decision, axis=-1)
    ce = -jnp.take_along_axis(logq, target_eos[..., None], axis=-1)[..., 0]
    n_dec = jnp.maximum(jnp.sum(ar_valid), 1.0)
    stop = jnp.sum(ce * ar_valid) / n_dec
    correct = (jnp.argmax(decision, -1) == target_eos).astype(jnp.float32)
    loss = float(cfg["ar_match"]) * match + float(cfg["ar_stop"]) * stop
    metrics = {
        "loss": loss,
        "ar_match": match,
        "ar_stop": stop,
        "stop_acc": jnp.sum(correct * ar_valid) / n_dec,
        "matched": n_match,
    }
    return loss, metrics


def lm_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any],
            cfg: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """Stage-1 captioning: the mean next-token CE over the caption tokens of the batch
    (``labels`` at the input positions, HF convention: position t predicts ``labels[t + 1]``),
    times ``lm``."""
    logits = _f32(outputs["lm_logits"])[:, :-1]
    labels = jnp.asarray(batch["labels"])[:, 1:]
    mask = (labels != IGNORE_INDEX).astype(jnp.float32) * _f32(batch["valid"])[:, None]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    n = jnp.maximum(jnp.sum(mask), 1.0)
    ce = jnp.sum(nll * mask) / n
    acc = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask) / n
    loss = float(cfg["lm"]) * ce
    return loss, {"loss": loss, "lm": ce, "token_acc": acc}


def lm_sums(lm_logits: Array, labels: Array) -> dict[str, Array]:
    """Per-row ``lm_nll`` (sum of caption-token CE), ``lm_tokens``, ``lm_correct`` (B,):
    the captioning eval terms (summed over the split by the task's accumulator)."""
    logits = _f32(lm_logits)[:, :-1]
    lab = jnp.asarray(labels)[:, 1:]
    mask = (lab != IGNORE_INDEX).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(lab, 0)[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, -1) == lab).astype(jnp.float32)
    return {"lm_nll": jnp.sum(nll * mask, -1), "lm_tokens": jnp.sum(mask, -1),
            "lm_correct": jnp.sum(correct * mask, -1)}


def ras_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any],
             cfg: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """Dispatch on the outputs present: ``lm_logits`` (captioning), ``scores`` (AR),
    ``logits`` (NAR)."""
    if "lm_logits" in outputs:
        return lm_loss(outputs, batch, cfg)
    if "scores" in outputs:
        return ar_loss(outputs, batch, cfg)
    return nar_loss(outputs, batch, cfg)


__all__ = ["ar_loss", "candidate_mask", "lm_loss", "lm_sums", "nar_loss", "ras_loss",
           "weighted_bce"]
