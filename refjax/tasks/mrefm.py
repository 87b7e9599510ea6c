"""MRefM pretraining (Mask Referring Modeling, spec/oneref.md 3), registered as ``mrefm``.

Data half: ``MRefMData`` adds to the OneRef rows the unnormalised canvas image (the MIM
tokenizer's input), the referring-aware image mask and the subject/object-first text mask
(``refjax.masking``; with ``random_masking`` the MVLM baseline's patch-random image mask of the
same count and plain random text masking), the STS label, and uses the rasterised GT box as the
box-mask constraint's target, as the official loader does without ``--enable_seg_mask``.

STS labels (``sts_label``, (max_len,) float32, an input field): the paper derives them from CLIP
similarities (spec 3.6) that cannot be computed here. When an example brings per-word scores
(``sts_word_scores``, one float per word of the lower-cased text) they are copied onto the word's
tokens. Otherwise (RefShapes) the rule is: every token of a word inside the expression's
``subject_span`` or ``object_span`` (the relation object; [start, end) word indices) gets 1.0,
every other token (BOS, EOS, other words) 0.0; pads 0.0. Position p + 1 holds the p-th
SentencePiece piece (BOS at 0), as the model's text tokens.

Task half: ``MRefMTask`` builds ``refjax.models.mrefm.MRefM`` (OneRef + MRefM heads + the frozen
``tokenizer``), selects the step type from ``batch["step"]`` (``model_inputs``: even update step
-> image masked, text clean; odd -> text masked, image clean; ``loss.alternate=False``: both
masked), and evaluates MIM / MLM accuracy and the losses. Evaluation runs both step types in one
forward: the batch is doubled (first half the MIM view, second half the MLM view).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from refjax import masking
from refjax.data import stages as st
from refjax.data import transforms as tf
from refjax.losses import mrefm as L
from refjax.losses.oneref import dice, patch_targets, sigmoid_focal
from refjax.models.mrefm import TOKENIZERS, MRefM
from refjax.tasks.base import Variables
from refjax.tasks.oneref import OneRefData, _OneRefTask, backbone_config


def mask_token_id(tokenizer_path: str) -> int:
    """The ``<mask>`` id of a BEiT-3-layout tokenizer (the last id when it has none)."""
    from refjax.data.tokenizers import load_beit3_tokenizer

    tok = load_beit3_tokenizer(tokenizer_path)
    return int(tok.mask_token_id if tok.mask_token_id is not None else len(tok) - 1)


def sts_label(
    pieces: Sequence[str],
    n_tok: int,
    max_len: int,
    subject_span: Sequence[int],
    object_span: Sequence[int],
    word_scores: Sequence[float] | None = None,
) -> np.ndarray:
    """The (max_len,) float32 STS label of a tokenized text (module docstring for the rule).

    ``pieces``: the SentencePiece pieces of the text (only the first ``n_tok - 2`` are in the
    sequence); ``word_scores``: per-word scores that replace the span rule when given."""
    label = np.zeros(max_len, np.float32)
    words = tf.word_positions(list(pieces[: max(n_tok - 2, 0)]))
    for p, w in enumerate(words):
        if word_scores is not None:
            score = float(word_scores[w]) if 0 <= w < len(word_scores) else 0.0
        else:
            score = float(any(int(s) <= w < int(e) for s, e in (subject_span, object_span)))
        label[p + 1] = score
    return label


class MRefMData(OneRefData):
    """OneRef rows plus ``image_raw``, ``mim_mask`` (grid*grid bool), ``mlm_ids``, ``mlm_mask``
    and ``sts_label``."""

    def __init__(
        self,
        size: int,
        max_len: int,
        num_scales: int,
        patch: int,
        mask_ratio: float = 0.35,
        dynamic_ratio: float = 0.75,
        text_mask_prob: float = 0.4,
        random_masking: bool = False,
    ):
        super().__init__(size, max_len, num_scales, box_mask=True)
        self.patch = int(patch)
        self.mask_ratio, self.dynamic_ratio = float(mask_ratio), float(dynamic_ratio)
        self.text_mask_prob = float(text_mask_prob)
        self.random_masking = bool(random_masking)

    def tokenize(self, ex: dict, tokenizer: Any, truncate: bool) -> dict:
        out = super().tokenize(ex, tokenizer, truncate)
        pieces = tokenizer.tokenize(ex["text"].lower())
        out["sts_label"] = sts_label(pieces, out["n_tok"], self.max_len, ex["subject_span"],
                                     ex["object_span"], ex.get("sts_word_scores"))
        return out

    def extra_stages(self, train: bool, tokenizer_path: str) -> Sequence[Any]:
        return (st.MRefMMask(self.size, self.patch, mask_token_id(tokenizer_path),
                             self.mask_ratio, self.dynamic_ratio, self.text_mask_prob,
                             self.random_masking),)

    def blank(self) -> dict[str, np.ndarray]:
        row = super().blank()
        g, n = self.size // self.patch, self.max_len
        row.update(
            image_raw=np.zeros((self.size, self.size, 3), np.uint8),
            mim_mask=np.zeros(g * g, bool),
            mlm_ids=np.zeros(n, np.int32),
            mlm_mask=np.zeros(n, np.int32),
            sts_label=np.zeros(n, np.float32),
        )
        return row

    def row(self, ex: dict) -> dict[str, np.ndarray]:
        row = super().row(ex)
        row.update(image_raw=ex["image_raw"], mim_mask=ex["mim_mask"], mlm_ids=ex["mlm_ids"],
                   mlm_mask=ex["mlm_mask"], sts_label=ex["sts_label"])
        return row


# ----------------------------------------------------------------------------- model
def max_masked_text(config: Any) -> int | None:
    """The MLM head's gathered positions: the most tokens the data masks in a text of
    ``data.max_text_len`` (``model.mlm_gather``), else None (all positions)."""
    if not config.model.mlm_gather:
        return None
    return masking.num_text_masked(int(config.data.max_text_len),
                                   float(config.data.text_mask_prob))


def tokenizer_config(config: Any) -> Any:
    """The MIM tokenizer's config dataclass: ``model.tokenizer="vqkd"``: ``vqkd_config(
    **model.vqkd)`` (``variant`` plus the non-None fields); ``"kmeans"``: the
    ``PatchKMeansConfig`` of ``config.tokenizer`` (``refjax.tokenizer_fit.tokenizer_config``,
    the section ``train-tokenizer`` fits from)."""
    kind = str(config.model.tokenizer)
    if kind == "vqkd":
        from refjax.models.vqkd import vqkd_config

        opts = {k: v for k, v in dict(config.model.vqkd).items() if v is not None}
        return vqkd_config(opts.pop("variant"), **opts)
    if kind == "kmeans":
        from refjax.tokenizer_fit import tokenizer_config as kmeans_config

        return kmeans_config(config)
    raise ValueError(f"model.tokenizer={kind!r}: one of {TOKENIZERS}")


def build_mrefm(config: Any) -> MRefM:
    """``MRefM`` from the config (``model``, ``tokenizer``, ``loss.use_vts/use_sts``,
    ``data``)."""
    m = config.model
    return MRefM(
        backbone_config(m),
        tokenizer_kind=str(m.tokenizer),
        tokenizer_config=tokenizer_config(config),
        referring_mim=bool(m.referring_mim),
        use_vts=bool(config.loss.use_vts),
        use_sts=bool(config.loss.use_sts),
        max_masked_text=max_masked_text(config),
        use_seg_head=bool(m.use_seg_head),
        sim_scale=float(m.sim_scale),
        seg_dim=m.seg_dim or None,
        seg_convs=int(m.seg_convs),
    )


def update_step(step: Any, config: Any) -> Any:
    """The optimizer-update step of a micro-step (``optim.accum_steps`` micro-batches per
    update share one step type, as the official ``data_iter_step // update_freq``)."""
    return step // int(config.optim.accum_steps)


# ----------------------------------------------------------------------------- metrics
_SUMS = ("count", "mim_ce", "mim_correct", "mim_count", "mlm_kl", "mlm_correct", "mlm_count",
         "focal", "dice", "vts", "sts")


class MRefMAccumulator:
    """Sums of the per-sample eval rows; ``result`` gives ``mim_acc``, ``mlm_acc`` (over
    masked patches / tokens), ``loss_mim``, ``loss_mlm`` (no drop-worst), the constraint
    terms, VTS/STS when on, ``loss`` (their weighted sum: one MIM step plus one MLM step, the
    constraint counted once) and ``count``."""

    def __init__(self, loss_cfg: Mapping[str, Any], sums: Mapping[str, float] | None = None):
        self.cfg = loss_cfg
        self.sums = dict.fromkeys(_SUMS, 0.0) if sums is None else dict(sums)

    def update(self, rows: Mapping[str, np.ndarray]) -> None:
        valid = np.asarray(rows["valid"], np.float64)
        self.sums["count"] += float(valid.sum())
        for k in _SUMS[1:]:
            if k in rows:
                self.sums[k] += float(np.sum(np.asarray(rows[k], np.float64) * valid))

    def allreduce(self) -> MRefMAccumulator:
        from refjax.evaluate.metrics import allreduce_sums

        reduced = allreduce_sums({k: np.float64(v) for k, v in self.sums.items()})
        return MRefMAccumulator(self.cfg, {k: float(v) for k, v in reduced.items()})

    def result(self) -> dict[str, float]:
        s, c = self.sums, self.cfg
        out = {"count": s["count"]}
        if s["count"] <= 0:
            return out
        n = s["count"]
        out["mim_acc"] = s["mim_correct"] / max(s["mim_count"], 1.0)
        out["loss_mim"] = s["mim_ce"] / max(s["mim_count"], 1.0)
        out["mlm_acc"] = s["mlm_correct"] / max(s["mlm_count"], 1.0)
        out["loss_mlm"] = s["mlm_kl"] / max(s["mlm_count"], 1.0)
        total = c["mim"] * out["loss_mim"] + c["mlm"] * out["loss_mlm"]
        if c["use_box_mask_constraint"]:
            out["loss_box_mask_focal"] = s["focal"] / n
            out["loss_box_mask_dice"] = s["dice"] / n
            total += c["box_mask_focal"] * out["loss_box_mask_focal"]
            total += c["box_mask_dice"] * out["loss_box_mask_dice"]
        if c["use_vts"]:
            out["loss_mim_vts"] = s["vts"] / n
            total += c["vts"] * out["loss_mim_vts"]
        if c["use_sts"]:
            out["loss_mlm_sts"] = s["sts"] / n
            total += c["sts"] * out["loss_mlm_sts"]
        out["loss"] = total
        return out


# ----------------------------------------------------------------------------- task
class MRefMTask(_OneRefTask):
    """Mask Referring Modeling pretraining (module docstring). Frozen subtree: ``tokenizer``."""

    name = "mrefm"
    box_mask = True

    def build_model(self, config: Any) -> MRefM:
        return build_mrefm(config)

    def data_task(self, config: Any) -> MRefMData:
        d = config.data
        return MRefMData(d.image_size, d.max_text_len, d.num_scales, config.model.patch_size,
                         d.mim_mask_ratio, d.dynamic_mask_ratio, d.text_mask_prob,
                         d.random_masking)

    def model_inputs(self, batch: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """Training (``batch["step"]`` set): one view selected by the update step's parity
        (``jnp.where``; the tokenizer runs on MIM steps only). Evaluation and init (no step):
        both views stacked along the batch (MIM view first)."""
        text, pad, image = batch["text_ids"], batch["text_padding"], batch["image"]
        mim_mask = batch["mim_mask"].astype(bool)
        mlm_mask = batch["mlm_mask"]
        step = batch.get("step")
        if step is None:
            cat = lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)], axis=0)  # noqa: E731
            return {
                "text_ids": cat(text, batch["mlm_ids"]),
                "text_padding": cat(pad, pad),
                "image": cat(image, image),
                "image_raw": batch["image_raw"],
                "vision_mask": cat(mim_mask, jnp.zeros_like(mim_mask)),
                "mlm_mask": cat(jnp.zeros_like(mlm_mask), mlm_mask),
            }
        if config.loss.alternate:
            is_mim = update_step(step, config) % 2 == 0
            vision_mask = mim_mask & is_mim
            text_in = jnp.where(is_mim, text, batch["mlm_ids"])
        else:
            is_mim, vision_mask, text_in = jnp.asarray(True), mim_mask, batch["mlm_ids"]
        return {"text_ids": text_in, "text_padding": pad, "image": image,
                "image_raw": batch["image_raw"], "vision_mask": vision_mask,
                "mlm_mask": mlm_mask, "run_tokenizer": is_mim}

    def frozen_subtrees(self, config: Any) -> tuple[str, ...]:
        return ("tokenizer",)

    def frozen_init(self, config: Any) -> dict[str, str]:
        path = config.model.tokenizer_init
        return {"tokenizer": str(path)} if path else {}

    def loss(self, outputs: Any, aux: Any, batch: Any, config: Any):
        batch = {**batch, "step": update_step(batch["step"], config)}
        return L.mrefm_loss(outputs, batch, config.loss)

    def eval_outputs(self, outputs: Any, aux: Any, batch: Any, config: Any):
        """Per-sample sums of the doubled eval forward (``model_inputs`` without a step)."""
        c = config.loss
        b = batch["valid"].shape[0]
        first = {k: v[:b] for k, v in outputs.items() if k != "mim_ids"}
        second = {k: v[b:] for k, v in outputs.items() if k != "mim_ids"}
        mim = L.mim_per_sample(first["mim_logits"], outputs["mim_ids"], batch["mim_mask"])
        tok = L.mlm_per_token(second, batch["text_ids"], float(c.label_smoothing))
        rows = {
            "valid": batch["valid"],
            "mim_ce": mim["ce"], "mim_correct": mim["correct"], "mim_count": mim["count"],
            "mlm_kl": jnp.sum(tok["kl"] * tok["mask"], -1),
            "mlm_correct": jnp.sum(tok["correct"] * tok["mask"], -1),
            "mlm_count": jnp.sum(tok["mask"], -1),
        }
        target = patch_targets(batch["mask"], first["sim"].shape[1])
        alpha, gamma = float(c.focal_alpha), float(c.focal_gamma)
        rows["focal"] = 0.5 * (sigmoid_focal(first["sim"], target, alpha, gamma)
                               + sigmoid_focal(second["sim"], target, alpha, gamma))
        rows["dice"] = 0.5 * (dice(first["sim"], target) + dice(second["sim"], target))
        if c.use_vts:
            rows["vts"] = L.vts_per_sample(first["vts_pred"], batch["box"])
        if c.use_sts:
            pred = second["sts_pred"]
            rows["sts"] = L.sts_per_sample(pred, L.sts_target(batch, pred.shape[1] + 2))
        return {k: jnp.asarray(v) for k, v in rows.items()}

    def make_accumulator(self, config: Any) -> MRefMAccumulator:
        keys = ("mim", "mlm", "vts", "sts", "use_vts", "use_sts", "use_box_mask_constraint",
                "box_mask_focal", "box_mask_dice")
        return MRefMAccumulator({k: config.loss[k] for k in keys})

    def map_init(self, loaded: Variables, meta: Mapping[str, Any], model: Variables) -> Variables:
        """A converted BEiT-3 checkpoint fills ``beit3``; a OneRef / MRefM checkpoint (converted
        official ``.pth``) or a train workdir (an MRefM stage-1 run, a REC/RES run) every
        subtree the model has, by name; a workdir's frozen ``tokenizer`` comes along (the task's
        ``tokenizer_init``, when set, is loaded after it)."""
        params = dict(loaded.get("params") or {})
        for k, v in (loaded.get("frozen") or {}).items():
            params.setdefault(k, v)
        return super().map_init({**loaded, "params": params}, meta, model)

    def make_predictor(self, model: Any, variables: Variables, config: Any):
        raise NotImplementedError(
            "MRefM is a pretraining task without a predictor: transfer it first (train "
            "configs/oneref/rec_res.py with --set init=<this workdir>) and predict with that run"
        )
