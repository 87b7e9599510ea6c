"""RAS configs (spec/ras.md 6-7): the three stages share :func:`make_config`.

``get_config("<variant>[,key=value...]")`` of ``stage1.py`` / ``stage2.py`` / ``stage3.py``;
variants ``tiny`` (RefShapes on a CPU) and ``13b`` (RAS-13B, spec 6-7). Keys, all optional::

    decoding=nar|ar          RAS's one-pass selection, or the AR [SEG] baseline (5.6) [nar]
    encoders=clip|all|all+pe mask features: CLIP only, the 4-tower ensemble, + 2D PE [all+pe]
    data=default|tiny        the RefShapes builder config (tiny variant)             [default]
    dataset=NAME             override the dataset (default: RefShapes for tiny; see below)
    task=ores|res|gres       stage 3: which fine-tuning (and which expressions)      [ores]
    llm=frozen|trained       stage 1: the LLM frozen (13b) or trained (tiny)
    lora=off|on              stages 2-3: LoRA on the LLM instead of full fine-tuning  [off]

Stages (``model.objective``, trainable parts, data):

1. ``caption``: mask-projector pretraining; the candidates only (no global visual tokens),
   the ``plain`` template, next-token loss on the scene caption. Trainable: the mask projector
   and the two prefixes (13b: ``model.freeze`` = LLM and head); tiny trains its LLM too,
   because it starts from scratch (a frozen random LLM has nothing to align to). 13b data:
   LCS-558K captions with SAM candidate pools (``python -m refjax build-data lcs558k_sam
   --manual-dir RAW``; ``refjax.data.builders.lcs558k_sam`` gives the layout).
2. ``select``: mask-group instruction tuning; LLM + projectors + head trained, towers frozen;
   weighted BCE (NAR) or the AR loss. 13b data: MaskGroups-2M has no builder (public status
   unknown); MaskGroups-HQ stands in (``dataset=`` to change).
3. ``select``: task fine-tuning on ORES (MaskGroups-HQ), RES (RefCOCO, single-target
   expressions, argmax fallback at eval) or GRES (gRefCOCO, no reference masks).

Initialisation (``init``): 13b stage 1 from ``python -m refjax convert ras --llm LLAVA_DIR
--clip ...`` (``model.preset="init"`` reads the model config saved there, or keep
``ras_13b``); stage 2 from the stage-1 workdir with ``model.fill_from`` = the converted
checkpoint (supplies the image projector stage 1 did not have); stage 3 from the stage-2
workdir. tiny: every part from scratch (random towers, frozen; a random LLaMA), stage n+1 from
stage n's workdir (``--set init=runs/ras_s1``).

LoRA (``lora=on``, stages 2-3; spec 6's compute-saving variant): adapters on every LLaMA
projection (13b: r 128, alpha 256, lr 2e-4 with the projectors at 2e-5; tiny: r 8, alpha 16),
the decoder layers' own weights frozen with no optimizer slots (``optim.frozen``); an init
without adapters (stage 1, a converted checkpoint) gets fresh ones (B = 0: a no-op), and
``export-hf`` / ``refjax.convert.llama.to_hf`` merge them into the kernels.

Frozen-encoder features: ``python -m refjax ras-features --config <this config> --out DIR``
once, then train with ``--set data.features_dir=DIR`` (``refjax.data.ras_features``).
"""

from __future__ import annotations

import ml_collections

from configs.common import (
    default_data_dir,
    mesh_section,
    optim_section,
    parse_arg,
    train_section,
)

VARIANTS = ("tiny", "13b")
TOWERS = ("clip", "siglip", "dinov2", "convnext")
ENCODER_SETS = {"clip": (("clip",), False), "all": (TOWERS, False), "all+pe": (TOWERS, True)}
ARG_KEYS = {"decoding": ("nar", "ar"), "encoders": tuple(ENCODER_SETS),
            "data": ("default", "tiny"), "dataset": None, "task": ("ores", "res", "gres"),
            "llm": ("frozen", "trained"), "lora": ("off", "on")}
ARG_DEFAULTS = {"decoding": "nar", "encoders": "all+pe", "data": "default", "dataset": "",
                "task": "ores", "llm": "", "lora": "off"}
# LoRA (spec 6: r 128, alpha 256, lr 2e-4, projectors 2e-5); tiny: r 8, alpha 16, lr unchanged.
LORA = {"13b": dict(lora_rank=128, lora_alpha=256.0), "tiny": dict(lora_rank=8, lora_alpha=16.0)}
# With LoRA the decoder layers' own weights are frozen (no optimizer slots); the adapters, the
# embeddings / LM head (AR's [SEG] row), the final norm, projectors and head train.
LORA_FROZEN = r"llm/layers(?!.*/lora_[ab]$)"
LORA_LR_SCALE = ("mask_projector/=0.1", "image_projector/=0.1")
EVAL_SPLITS = {
    "refshapes": ("val", "testA", "testB"),
    "refcoco": ("val", "testA", "testB"),
    "refcoco_plus": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
    "grefcoco": ("val", "testA", "testB"),
    "maskgroups_hq": ("validation",),
}
# 13b datasets per stage (stage 3 by task); tiny: RefShapes throughout.
DATASETS_13B = {1: "lcs558k_sam", 2: "maskgroups_hq",
                "ores": "maskgroups_hq", "res": "refcoco", "gres": "grefcoco"}
DATASET_CONFIGS = {"refcoco": "unc", "refcoco_plus": "unc", "refcocog": "umd",
                   "grefcoco": "unc"}
# tiny LLaMA (from scratch): 4 layers, d 128 (ras_tiny's towers at 64 px, 8x8 grids)
TINY_LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
TINY_SIZES = dict(clip=64, siglip=64, dinov2=64, convnext=64)


def make_config(stage: int, arg: str | None) -> ml_collections.ConfigDict:
    """The config of RAS ``stage`` (1, 2, 3) for ``arg`` (module docstring)."""
    a = parse_arg(arg, ARG_KEYS, ARG_DEFAULTS, variants=VARIANTS)
    tiny = a["variant"] == "tiny"
    caption = stage == 1
    select = "ores" if stage != 3 else a["task"]
    encoders, pe2d = ENCODER_SETS[a["encoders"]]
    if a["dataset"]:
        dataset = a["dataset"]
    elif tiny:
        dataset = "refshapes"
    else:
        dataset = DATASETS_13B[stage if stage in (1, 2) else select]
    llm_mode = a["llm"] or ("trained" if tiny else "frozen")
    if caption and a["decoding"] == "ar":
        raise ValueError("stage 1 (captioning) has no decoding choice; drop decoding=ar")
    lora = a["lora"] == "on"
    if lora and caption:
        raise ValueError("lora=on is for stages 2-3 (stage 1 trains the mask projector only)")

    c = ml_collections.ConfigDict()
    c.arg = arg or ""
    c.task = "ras"
    c.model = dict(
        preset="ras_tiny" if tiny else "ras_13b",  # or "init": the config of config.init
        objective="caption" if caption else "select",
        decoding=a["decoding"],
        encoders=encoders,
        use_pe2d=pe2d,
        pe2d_grid=16 if tiny else None,  # None: the preset's (64)
        image_tokens=not caption,  # global visual tokens: absent in stage 1 (spec 7)
        image_sizes=dict(TINY_SIZES) if tiny else {},  # tower input sides (else the preset's)
        llm={**(TINY_LLM if tiny else {}), **(LORA[a["variant"]] if lora else {})},
        # ^ LlamaConfig overrides (lora=on: LoRA adapters, spec 6)
        vocab_size=None if tiny else 32000,  # text vocabulary; tiny: the dataset tokenizer's
        eos_token_id=2,
        dtype="float32" if tiny else "bfloat16",
        remat_policy="none" if tiny else "dots_with_no_batch_dims_saveable",
        scan=True,
        head="linear",
        head_prior=0.05,
        # extra frozen subtrees besides the towers (stage 1: everything but the mask tokens)
        freeze=(("head", "seg_proj", "image_projector") + (("llm",) if llm_mode == "frozen"
                                                           else ())) if caption else (),
        fill_from=None,  # a converted checkpoint supplying subtrees `init` lacks
    )

    c.data = dict(
        dataset=dataset,
        dataset_config=(a["data"] if dataset == "refshapes"
                        else DATASET_CONFIGS.get(dataset)),
        data_dir=default_data_dir(),
        image_size=64 if tiny else 336,  # the mask canvas S (expand2square, then resize)
        max_text_len=(128 if caption else 224) if tiny else 2048,  # the LLM sequence length
        batch_size=(32 if tiny else 256) if caption else (16 if tiny else 128 if stage == 2
                                                           else 64),
        eval_batch_size=32 if tiny else 64,
        num_workers=0 if tiny else 8,
        read_threads=2 if tiny else 16,
        prefetch_buffer=16 if tiny else 64,
        skip_bad_records=False,
        truncate_text=False,  # RAS never truncates: a too long sequence is a bad record
        tokenizer_path=None,  # None: the dataset's tokenizer.model (13b: Vicuna's)
        num_scales=7,  # unused (no train augmentation)
        image_mean=(0.48145466, 0.4578275, 0.40821073),  # unused by RAS (per-tower stats)
        image_std=(0.26862954, 0.26130258, 0.27577711),
        next_timeout_s=600.0,
        pool_max=24 if tiny else 100,  # candidates per example (N_max; more: first kept)
        refs_max=2 if tiny else 4,
        seg_max=12 if tiny else 16,  # AR: [SEG]s in training, decoding steps in eval
        atoms_max=64 if tiny else 4096,  # exact scoring terms at original size (RefShapes: <=35)
        positive_ioa=0.5,  # label rule of spec 8.4
        ignore_ioa=None,  # e.g. 0.1: candidates with 0.1 < IoA < 0.5 are left out of the loss
        select=select,  # ores: every expression; res: single-target; gres: no references
        template="plain" if caption else "v1",
        system="" if tiny else None,  # None: Vicuna's system prompt; tiny: none
        lowercase=tiny,  # the RefShapes tokenizer is lower-case
        features_dir=None,  # a `ras-features` cache: rows carry features instead of pixels
        features_dtype="float32" if tiny else "bfloat16",
    )

    if tiny:
        lr = {1: 1e-3, 2: 5e-4, 3: 2e-4}[stage]
        optim = dict(lr=lr, schedule="warmup_cosine", warmup_steps=100, min_lr_ratio=0.05,
                     weight_decay=0.0, grad_clip_norm=1.0)
    else:
        # LLaVA-1.5 recipes (spec 6-7): warm-up 3% of the estimated epoch steps
        lr = {1: 1e-3, 2: 2e-5, 3: 2e-5}[stage]
        warm = {1: 65, 2: 470, 3: 90}[stage]
        optim = dict(lr=lr, schedule="warmup_cosine", warmup_steps=warm, weight_decay=0.0)
        if lora:
            optim.update(lr=2e-4, lr_scale=LORA_LR_SCALE)
    if lora:
        optim["frozen"] = LORA_FROZEN
    c.optim = optim_section(**optim)

    c.loss = dict(
        pos_weight=5.0,  # BCE positive weight w+ (spec 5.4; sweep 2/5/10)
        ar_match=1.0,  # AR: CE of the Hungarian-matched [SEG]s over the candidates
        ar_stop=1.0,  # AR: the [SEG]-vs-EOS decision CE
        lm=1.0,  # stage 1: caption next-token CE
    )

    c.mesh = mesh_section() if tiny else dict(mesh_section(), data=1, fsdp=-1)
    c.layout = "dp" if tiny else "fsdp"
    c.train = train_section(
        total_steps={1: 1500, 2: 3000, 3: 2000}[stage] if tiny else None,
        epochs=0.0 if tiny else {1: 1.0, 2: 1.0, 3: 2.0}[stage],
        log_every=25 if tiny else 50,
        eval_every=500 if tiny else 2000,
        ckpt_every=500 if tiny else 2000,
        best_metric="loss" if caption else "ciou",
        best_mode="min" if caption else "max",
    )
    c.init = None
    c.eval = dict(
        splits=("val",) if caption else EVAL_SPLITS.get(dataset, ("val",)),
        threshold=0.5,  # select sigmoid(logit) > threshold (spec 5.5)
        argmax_fallback=select == "res",  # RES: the best candidate when none passes
    )
    c.lock()
    return c


def compile_args(stage: int) -> tuple[str, ...]:
    """The variants tests/test_config_compile.py lowers at full size (kept lean)."""
    if stage == 1:
        return ("tiny", "13b")
    extra = ",task=gres" if stage == 3 else ""
    lora = ("13b,decoding=nar,lora=on",) if stage == 2 else ()  # the frozen-decoder step
    return tuple(f"{v},decoding={d}{extra}" for v in VARIANTS for d in ("nar", "ar")) + lora
