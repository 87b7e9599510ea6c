"""MRefM pretraining (spec/oneref.md 3): ``get_config("tiny|base|large[,key=value...]")``.

The first item picks the model size; the others, all optional::

    stage=frozen|full         released stage 1 (frozen backbone) or stage 2 (full)       [full]
    recipe=paper|released     released scripts: VTS/STS losses off; paper: on            [released]
    objective=mrefm|mvlm      Mask Referring Modeling, or the MVLM baseline              [mrefm]
    tokenizer=vqkd|kmeans     MIM target: BEiT v2 VQ-KD, or the embedded k-means
                              patch tokenizer (refjax train-tokenizer)    [vqkd; tiny: kmeans]
    dataset=refshapes|...     refjax dataset name                                        [refshapes]
    data=default|tiny         the RefShapes builder config                               [default]

Released stages (spec 3.7; 8 GPUs, global batch): stage 1 ``stage=frozen``: 10 epochs, bs 512,
lr 2.5e-4, every ``beit3/`` parameter frozen (drop path still on), ``init`` = the BEiT-3
indomain 224 checkpoint converted at 384 (``python -m refjax convert beit3 IN OUT --img-size
384``); stage 2 ``stage=full``: 100 epochs, lr 5e-5 / bs 256 (base), 3e-5 / bs 64 (large),
``init`` = the stage-1 workdir. Both: AdamW (0.9, 0.999, eps 1e-8) with weight decay 1e-4 on
every parameter, per-epoch cosine, no warm-up, no clipping; MIM and MLM alternate on even / odd
update steps (``loss.alternate``); the box-mask constraint (focal x20 + dice x2) on every step;
6 train scales. ``model.tokenizer_init`` (= ``tokenizer.checkpoint``) is the frozen tokenizer
checkpoint (a VQ-KD converted with ``python -m refjax convert vqkd``, or a k-means tokenizer
from ``python -m refjax train-tokenizer``, whose hyper-parameters are the ``tokenizer``
section); unset, the tokenizer keeps its random init (tests only).

``objective=mvlm``: random image masking with the referring masking's count, random text
masking, no VTS/STS, the MIM head on the plain patch features (``model.referring_mim=False``).

``tiny`` is the RefShapes-size model of ``rec_res.py:tiny`` (128 px, dim 192, depth 4, 32 text
tokens) with the k-means tokenizer. Transfer: ``configs/oneref/rec_res.py`` with ``--set
init=<this workdir>`` (the MRefM heads and the tokenizer are dropped by name). Train records are
single steps, so ``train.log_every`` is odd: consecutive records alternate MIM and MLM steps.
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
from refjax.tokenizer_fit import tokenizer_section

ARG_KEYS = {"stage": ("frozen", "full"), "recipe": ("paper", "released"),
            "objective": ("mrefm", "mvlm"), "tokenizer": ("vqkd", "kmeans"), "dataset": None,
            "data": ("default", "tiny")}
ARG_DEFAULTS = {"stage": "full", "recipe": "released", "objective": "mrefm", "tokenizer": "",
                "dataset": "refshapes", "data": "default"}


def vqkd_options(tiny: bool) -> dict:
    """``model.vqkd``: the VQ-KD (``refjax.models.vqkd.vqkd_config``) variant and fields."""
    # BEiT v2 vqkd_encoder_base_decoder_3x768x12_clip in float32 (as the official run);
    # tiny: a small random VQ-KD at the canvas size (tests, smoke runs).
    return dict(variant="tiny" if tiny else "base", img_size=128 if tiny else None,
                dtype="float32", scan=True, remat_policy="none", attention_impl=None)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, ARG_KEYS, ARG_DEFAULTS)
    variant, stage, dataset = a["variant"], a["stage"], a["dataset"]
    tiny = variant == "tiny"
    paper, mvlm = a["recipe"] == "paper", a["objective"] == "mvlm"
    tok = a["tokenizer"] or ("kmeans" if tiny else "vqkd")
    c = ml_collections.ConfigDict()
    c.arg = arg or ""
    c.task = "mrefm"

    c.model = dict(
        variant=variant,
        dim=192 if tiny else None,
        depth=4 if tiny else None,
        heads=6 if tiny else None,
        mlp_dim=768 if tiny else None,
        vocab_size=None,  # tiny: the dataset tokenizer's size (resolved at train start)
        img_size=128 if tiny else 384,
        patch_size=16,
        dtype="float32" if tiny else "bfloat16",
        scan=True,
        remat_policy="none" if tiny else "dots_with_no_batch_dims_saveable",
        drop_path_rate=0.0 if tiny else 0.1,
        attention_impl=None,
        use_seg_head=False,  # the released MRefM runs have no RES head
        sim_scale=1.0,
        seg_dim=None,
        seg_convs=3,
        tokenizer=tok,  # vqkd | kmeans: the frozen MIM target tokenizer (subtree `tokenizer`)
        tokenizer_init=None,  # its checkpoint (frozen); None keeps the random init
        vqkd=vqkd_options(tiny),  # model.tokenizer=vqkd; kmeans reads the `tokenizer` section
        referring_mim=not mvlm,  # MIM head on l2n(t_cls * v_i); MVLM: on the patch features
        mlm_gather=True,  # MLM head on num_text_masked(max_len) gathered positions, not all
    )

    c.data = dict(
        dataset=dataset,
        dataset_config=a["data"] if dataset == "refshapes" else None,
        data_dir=default_data_dir(),
        image_size=0,  # linked to model.img_size below
        max_text_len=32 if tiny else 64,
        batch_size=32 if tiny else 512 if stage == "frozen" else 256 if variant == "base" else 64,
        eval_batch_size=64 if tiny else 128,
        num_workers=0 if tiny else 8,
        read_threads=2 if tiny else 16,
        prefetch_buffer=16 if tiny else 128,
        skip_bad_records=False,
        truncate_text=True,
        tokenizer_path=None,
        num_scales=6,  # MRefM's DataAugmentationForMIM: 6 scales (384 ... 224)
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
        next_timeout_s=600.0,
        mim_mask_ratio=0.35,  # beta: whole-grid random masking
        dynamic_mask_ratio=0.75,  # gamma: inside the box region (+1 patch margin)
        text_mask_prob=0.4,
        random_masking=mvlm,  # MVLM: patch-random image masking, no subject/object priority
    )
    c.data.image_size = c.model.get_ref("img_size")

    # The k-means tokenizer (model.tokenizer=kmeans): its hyper-parameters and the fit that
    # `python -m refjax train-tokenizer --config configs/oneref/mrefm.py:tiny` runs
    # (refjax.tokenizer_fit). `checkpoint` is the same value as model.tokenizer_init.
    c.tokenizer = tokenizer_section(kind="patch_kmeans" if tok == "kmeans" else "vqkd",
                                    codebook_size=1024 if tiny else 8192)
    c.tokenizer.patch_size = c.model.get_ref("patch_size")
    checkpoint = ml_collections.FieldReference(None, field_type=str)
    c.tokenizer.checkpoint = checkpoint
    c.model.tokenizer_init = checkpoint

    if tiny:
        optim = dict(lr=5e-4, schedule="warmup_cosine", warmup_steps=100, min_lr_ratio=0.01)
    else:
        lr = 2.5e-4 if stage == "frozen" else 5e-5 if variant == "base" else 3e-5
        optim = dict(lr=lr, schedule="epoch_cosine")
    c.optim = optim_section(**optim, frozen="^beit3/" if stage == "frozen" else "")

    c.loss = dict(
        # refjax.losses.oneref terms: the box-mask constraint on every step (enable_dynamic_mim)
        use_box_loss=False,
        use_box_mask_constraint=True,
        use_seg_loss=False,
        l1=1.0,
        giou=1.0,
        box_mask_focal=20.0,
        box_mask_dice=2.0,
        seg_focal=20.0,
        seg_dice=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
        # refjax.losses.mrefm terms
        alternate=True,  # even update step: MIM (+VTS); odd: MLM (+STS); False: joint step
        mim=1.0,
        mlm=1.0,
        vts=1.0,
        sts=1.0,
        use_vts=paper and not mvlm,
        use_sts=paper and not mvlm,
        label_smoothing=0.1,
        drop_worst_ratio=0.2,
        drop_worst_after=12000,
    )

    c.mesh = mesh_section()
    c.layout = "dp" if tiny else "fsdp"
    c.train = train_section(
        total_steps=3000 if tiny else None,
        epochs=0.0 if tiny else (10 if stage == "frozen" else 100),
        log_every=25 if tiny else 51,
        eval_every=500 if tiny else 2000,
        ckpt_every=500 if tiny else 2000,
        best_metric="loss",
        best_mode="min",
    )
    c.init = None
    c.eval = dict(splits=("val",))
    c.lock()
    return c
