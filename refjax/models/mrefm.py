"""MRefM pre-training model (spec/oneref.md 2.6 and 3): OneRef + the four MRefM heads + a frozen
MIM tokenizer.

The official pre-training script builds ``BEiT3ForGrounding`` with ``--enable_mrefm``: the BEiT-3
backbone (``beit3``), the OneRef heads at the top level, and four extra heads whose names this
module keeps so official MRefM checkpoints convert both ways (``refjax.convert.oneref``):

====================================  ==========================================  ==========
Flax path                             PyTorch key                                 transform
====================================  ==========================================  ==========
params/mim_head/{kernel,bias}         mim_head.{weight,bias}  (K, D) / (K,)        W.T / -
params/mim_vts_head/layers_{i}/...    mim_vts_head.layers.{i}.{weight,bias}       W.T / -
params/mlm_head/{kernel,bias}         mlm_head.{weight,bias}  (V, D) / (V,)        W.T / -
params/mlm_sts_head/layers_{i}/...    mlm_sts_head.layers.{i}.{weight,bias}       W.T / -
params/tokenizer/...                  (not in the .pth: the VQ-KD is a separate file)
====================================  ==========================================  ==========

Forward, exactly as ``OneRef_model.py`` computes it (``Tf`` raw text features after the final
LN, ``V`` raw vision features, ``v_i``/``Tc`` the l2-normalised ``vision_head``/``language_head``
token embeddings, ``t_cls = Tc[:, 0]``, ``v_cls`` the normalised vision cls)::

    Hv = t_cls ⊙ v_i   (B, P, D)   "visu_token_dot_product_matrix"
    Ht = v_cls ⊙ Tc    (B, L, D)   "text_token_dot_product_matrix"
    mim_logits = mim_head(l2n(Hv))             (referring MIM; MVLM: mim_head(V[:, 1:]))
    vts_pred   = mim_vts_head(Hv)              (B, P, 4), un-normalised Hv
    mlm_logits = mlm_head(Tf[masked])          (raw text features, ``use_vanilla_text_token``)
    sts_pred   = softmax_L(mlm_sts_head(Ht[:, 1:L-1]))   (B, L-2); the loss applies a second
                                                          log_softmax (official double softmax)

Note: spec 2.1 writes ``Hv = v_cls ⊙ v_i``; the official code multiplies the *text* BOS embedding
``language_cls`` with the patch embeddings (``torch.mul(language_cls..., vision_norm_token)``),
as spec 3.3 and Fig. 2 (``x_i ⊙ e_SEP``) say. This module follows the code.

Static shapes (jit): the MIM head runs on all P patches, ``mim_logits`` (B, P, K); the referring
masking masks up to ~84% of the grid, so a cap would save little (at base: 576 x 8192 logits per
example, 9.4 MB in bf16, 19 MB as float32 in the loss). The MLM head runs on a fixed number
``max_masked_text`` of gathered positions (the most the data masks: ``num_text_masked(L, p)``,
25 of 64 for p = 0.4), ``mlm_logits`` (B, K_t, V) instead of (B, 64, 64010): 60% less memory;
``mlm_positions`` / ``mlm_mask`` (B, K_t) say which tokens they are (masked ones first).

The tokenizer (``tokenizer`` subtree, frozen by the task) maps ``image_raw`` (the unnormalised
canvas, uint8 or [0, 1] floats) to ids ``mim_ids`` (B, P). ``run_tokenizer`` (a traced bool)
skips it on MLM steps through ``nn.cond`` (zeros instead), so an alternating step never runs the
tokenizer for nothing. ``model.tokenizer`` selects VQ-KD (``refjax.models.vqkd``) or the embedded
k-means patch tokenizer (``refjax.models.patch_tokenizer``); both are
``Tokenizer(cfg)(images01) -> (ids (B, grid*grid) int32, aux)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from refjax.models.beit3 import BEiT3, BEiT3Config
from refjax.models.layers import torch_uniform
from refjax.models.oneref import BBoxMLP, _heads_forward, _trunc_normal_02, l2n

Array = jax.Array
Dtype = Any

TOKENIZERS = ("vqkd", "kmeans")


# ----------------------------------------------------------------------------- tokenizer
def make_tokenizer(kind: str, config: Any, name: str = "tokenizer") -> nn.Module:
    """The tokenizer module ``Tokenizer(cfg)(images01) -> (ids, aux)``: ``"vqkd"`` with a
    ``VQKDConfig``, ``"kmeans"`` with a ``PatchKMeansConfig``."""
    if kind == "vqkd":
        from refjax.models.vqkd import VQKD

        return VQKD(config, name=name)
    if kind == "kmeans":
        from refjax.models.patch_tokenizer import PatchKMeansTokenizer

        return PatchKMeansTokenizer(config, name=name)
    raise ValueError(f"unknown MIM tokenizer {kind!r}; one of {TOKENIZERS}")


def codebook_size(config: Any) -> int:
    """Number of codes (the MIM head's width) of a tokenizer config."""
    return int(config.codebook_size)


def masked_positions(mask: Array, k: int) -> Array:
    """(B, k) int32 indices of the masked positions of ``mask`` (B, L), in ascending order,
    followed by unmasked ones when fewer than k are masked (static shape for jit)."""
    order = jnp.argsort(jnp.logical_not(mask.astype(bool)), axis=-1, stable=True)
    return order[:, :k].astype(jnp.int32)


def _head_dense(
    features: int, fan_in: int, *, name: str, out_axis: str | None, trunc: bool, dtype: Dtype,
    param_dtype: Dtype,
) -> nn.Dense:
    """A head Linear: torch default init, or (``trunc``) BEiT3Wrapper's trunc_normal(.02) with
    a zero bias; logical axes ('embed', out_axis) / (out_axis,)."""
    kinit = _trunc_normal_02 if trunc else torch_uniform(fan_in)
    binit = nn.initializers.zeros_init() if trunc else torch_uniform(fan_in)
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kinit, ("embed", out_axis)),
        bias_init=nn.with_logical_partitioning(binit, (out_axis,)),
        name=name,
    )


# ----------------------------------------------------------------------------- model
class MRefM(nn.Module):
    """OneRef (``beit3`` + REC [+ RES] heads) plus the MRefM heads and the frozen tokenizer.

    Attributes:
      backbone_config: the BEiT-3 encoder.
      tokenizer_kind / tokenizer_config: ``"vqkd"`` | ``"kmeans"`` and its config dataclass.
      referring_mim: True = referring MIM head input ``l2n(t_cls ⊙ v_i)``; False = MVLM (the
        plain masked patch features ``V[:, 1:]``, the official commented-out line).
      use_vts / use_sts: compute ``vts_pred`` / ``sts_pred`` in apply (the parameters always
        exist, so checkpoints keep the official layout).
      max_masked_text: gathered MLM positions per example (None = all L tokens).
      use_seg_head, sim_scale, seg_dim, seg_convs, dtype, param_dtype: as ``OneRef``.
    """

    backbone_config: BEiT3Config
    tokenizer_kind: str
    tokenizer_config: Any
    referring_mim: bool = True
    use_vts: bool = True
    use_sts: bool = True
    max_masked_text: int | None = None
    use_seg_head: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    sim_scale: float = 1.0
    seg_dim: int | None = None
    seg_convs: int = 3

    @nn.compact
    def __call__(
        self,
        text_ids: Array,
        text_padding: Array,
        image: Array,
        image_raw: Array | None = None,
        vision_mask: Array | None = None,
        mlm_mask: Array | None = None,
        run_tokenizer: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        """Returns ``(outputs, aux)``.

        Inputs as ``OneRef`` plus ``image_raw`` (B_t, H, W, 3) the tokenizer's view (uint8, or
        floats in [0, 1]; B_t may differ from B: the task's eval doubles the other inputs),
        ``vision_mask`` (B, P) bool MIM mask, ``mlm_mask`` (B, L) 1 on MLM-masked tokens,
        ``run_tokenizer`` a scalar bool (None: always run it).

        ``outputs``: OneRef's ``box``, ``sim``, ``v_cls``, ``t_cls`` (+ ``seg_logits``), and
        ``mim_logits`` (B, P, K), ``vts_pred`` (B, P, 4) [use_vts], ``mlm_logits``
        (B, K_t, V), ``mlm_positions`` / ``mlm_mask`` (B, K_t), ``sts_pred`` (B, L-2)
        [use_sts] and, with ``image_raw``, ``mim_ids`` (B_t, P) int32 (zeros where the
        tokenizer was skipped).
        """
        init = self.is_initializing()
        cfg = self.backbone_config
        dt = self.dtype or cfg.compute_dtype
        kw = dict(dtype=dt, param_dtype=self.param_dtype)
        enc, aux = BEiT3(cfg, name="beit3")(
            text_ids=text_ids, text_padding=text_padding, image=image, vision_mask=vision_mask,
            deterministic=deterministic,
        )
        nv = aux["vision_len"]
        outputs, head_aux = _heads_forward(
            self, enc, nv, use_seg_head=self.use_seg_head, deterministic=deterministic,
            dtype=dt, param_dtype=self.param_dtype, sim_scale=self.sim_scale,
            seg_dim=self.seg_dim, seg_convs=self.seg_convs, features=True,
        )
        v_tok, t_tok = head_aux.pop("patch_tokens"), head_aux.pop("text_tokens")
        dim = enc.shape[-1]
        b, num_text = text_ids.shape
        num_patches = nv - 1
        t_cls, v_cls = outputs["t_cls"], outputs["v_cls"]

        # Referring MIM and the visual target-relation score.
        hv = t_cls[:, None, :] * v_tok  # (B, P, D) float32
        k = codebook_size(self.tokenizer_config)
        mim_in = l2n(hv) if self.referring_mim else enc[:, 1:nv]
        mim_head = _head_dense(k, dim, name="mim_head", out_axis="vocab", trunc=False, **kw)
        outputs["mim_logits"] = mim_head(mim_in)
        if self.use_vts or init:
            outputs["vts_pred"] = BBoxMLP(dim, 4, name="mim_vts_head", **kw)(hv).astype(
                jnp.float32
            )

        # Referring MLM on the raw text features, at a fixed number of gathered positions.
        tf = enc[:, nv:]
        if mlm_mask is None:
            mlm_mask = jnp.zeros((b, num_text), jnp.int32)
        kt = num_text if self.max_masked_text is None else min(self.max_masked_text, num_text)
        pos = masked_positions(mlm_mask, kt)
        tf_sel = jnp.take_along_axis(tf, pos[..., None], axis=1)
        vocab = cfg.vocab_size
        mlm_head = _head_dense(vocab, dim, name="mlm_head", out_axis="vocab", trunc=True, **kw)
        outputs["mlm_logits"] = mlm_head(tf_sel)
        outputs["mlm_positions"] = pos
        outputs["mlm_mask"] = jnp.take_along_axis(mlm_mask.astype(jnp.int32), pos, axis=1)
        if self.use_sts or init:
            ht = v_cls[:, None, :] * t_tok  # (B, L, D)
            score = BBoxMLP(dim, 1, name="mlm_sts_head", **kw)(ht[:, 1 : num_text - 1])
            outputs["sts_pred"] = jax.nn.softmax(score[..., 0].astype(jnp.float32), axis=-1)

        # The frozen tokenizer's targets.
        if image_raw is not None:
            tok = make_tokenizer(self.tokenizer_kind, self.tokenizer_config, name="tokenizer")
            x01 = image_raw.astype(jnp.float32)
            if jnp.issubdtype(image_raw.dtype, jnp.integer):
                x01 = x01 / 255.0
            want = (image_raw.shape[0], num_patches)

            def run(m: nn.Module, x: Array) -> Array:
                ids = m(x)[0]
                if ids.shape != want:
                    raise ValueError(f"the MIM tokenizer gives ids {ids.shape}; the backbone's "
                                     f"patch grid needs {want}")
                return ids.astype(jnp.int32)

            if run_tokenizer is None or init:
                ids = run(tok, x01)
            else:
                ids = nn.cond(jnp.asarray(run_tokenizer, bool), run,
                              lambda m, x: jnp.zeros(want, jnp.int32), tok, x01)
            outputs["mim_ids"] = jax.lax.stop_gradient(ids)
        return outputs, {**aux, **head_aux}
