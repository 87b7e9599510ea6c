"""OneRef REC / RES transfer (spec/oneref.md 4.3): ``get_config("tiny|base|large[,key=value...]")``.

The first item picks the model size; the others, all optional::

    task=rec|res            box (Acc@0.5) or mask (mIoU) transfer                  [rec]
    dataset=refshapes|...   refjax dataset name (refcoco, refcoco+, refcocog, ...) [refshapes]
    stage=frozen|full       (a) frozen-backbone warm-up or (b) full fine-tune      [full]

``tiny`` trains on RefShapes on a 2-core CPU (128 px, an 8x8 patch grid, 32 text tokens, the
RefShapes tokenizer's vocabulary); ``base``/``large`` follow the released scripts (384 px,
64 tokens; stage (a): 10 epochs, bs 512, lr 2.5e-4; stage (b): 20 epochs, lr 3e-5, bs 256 base /
64 large; AdamW wd 1e-4, per-epoch cosine, no warm-up, no clipping). The config is locked:
setting an unknown key is an error.
"""

from __future__ import annotations

import os

import ml_collections

VARIANTS = ("tiny", "base", "large")
ARG_KEYS = {"task": ("rec", "res"), "stage": ("frozen", "full"), "dataset": None}
EVAL_SPLITS = {
    "refshapes": ("val", "testA", "testB"),
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
}


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"base,task=res"`` -> ``{"variant": "base", "task": "res", ...}`` with defaults filled."""
    out = {"variant": "tiny", "task": "rec", "stage": "full", "dataset": "refshapes"}
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    if items and "=" not in items[0]:
        out["variant"] = items.pop(0)
    if out["variant"] not in VARIANTS:
        raise ValueError(f"unknown variant {out['variant']!r}; one of {VARIANTS}")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ARG_KEYS:
            raise ValueError(f"bad config arg item {item!r}; expected key=value, key in "
                             f"{sorted(ARG_KEYS)}")
        allowed = ARG_KEYS[key]
        if allowed is not None and value not in allowed:
            raise ValueError(f"{key}={value!r}: expected one of {allowed}")
        out[key] = value
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg)
    variant, task, stage, dataset = a["variant"], a["task"], a["stage"], a["dataset"]
    tiny = variant == "tiny"
    res = task == "res"
    c = ml_collections.ConfigDict()
    c.arg = arg or ""

    # Model: None fields take the BEiT-3 variant's value (vocab_size: the tokenizer's size for
    # tiny, resolved at train start and saved with the config).
    c.model = dict(
        variant=variant,
        dim=192 if tiny else None,
        depth=4 if tiny else None,
        heads=6 if tiny else None,
        mlp_dim=768 if tiny else None,
        vocab_size=None,
        img_size=128 if tiny else 384,
        patch_size=16,
        dtype="float32" if tiny else "bfloat16",
        scan=True,
        remat_policy="none" if tiny else "dots_with_no_batch_dims_saveable",
        drop_path_rate=0.0 if tiny else 0.1,
        attention_impl=None,
        use_seg_head=res,
        sim_scale=1.0,  # 1.0 = OneRef; >1 sharpens the cosine pooling (from-scratch training)
        seg_dim=None,  # RES head width; None = dim (OneRef), smaller = a cheaper mask head
        seg_convs=3,  # RES head 2x upsampling stages: 3 = OneRef (H/2 with 16 px patches)
    )

    # Data: the fields refjax.data.pipeline.make_pipeline reads (batch sizes are global).
    c.data = dict(
        task=task,
        dataset=dataset,
        dataset_config="default" if dataset == "refshapes" else None,
        data_dir=os.environ.get("REFJAX_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")),
        image_size=0,  # linked to model.img_size below
        max_text_len=32 if tiny else 64,
        patch_size=0,  # linked to model.patch_size below
        batch_size=32 if tiny else 512 if stage == "frozen" else 256 if variant == "base" else 64,
        eval_batch_size=64 if tiny else 128,
        num_workers=0 if tiny else 8,
        read_threads=2 if tiny else 16,
        prefetch_buffer=16 if tiny else 128,
        skip_bad_records=False,
        truncate_text=True,
        tokenizer_path=None,
        num_scales=None,
        image_mean=None,
        image_std=None,
        next_timeout_s=600.0,  # a batch slower than this is an error (stuck pipeline), not a hang
    )

    c.data.image_size = c.model.get_ref("img_size")
    c.data.patch_size = c.model.get_ref("patch_size")

    # Optimizer: the keys refjax.train.optim.make_optimizer reads. frozen is one regex.
    if tiny:
        c.optim = dict(lr=5e-4, schedule="warmup_cosine", warmup_steps=100, min_lr_ratio=0.01)
    else:
        c.optim = dict(lr=2.5e-4 if stage == "frozen" else 3e-5, schedule="epoch_cosine",
                       warmup_steps=0, min_lr_ratio=0.0)
    c.optim.update(
        weight_decay=1e-4,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        wd_mask=None,
        frozen="^beit3/" if stage == "frozen" else "",
        grad_clip_norm=0.0,
        accum_steps=1,
    )

    # Loss (refjax.losses.oneref): REC stage (a) L1+GIoU, (b) + box-mask focal/dice; RES seg.
    c.loss = dict(
        use_box_loss=not res,
        use_box_mask_constraint=(not res) and stage == "full",
        use_seg_loss=res,
        l1=1.0,
        giou=1.0,
        box_mask_focal=20.0,
        box_mask_dice=2.0,
        seg_focal=20.0,
        seg_dice=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
    )

    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.layout = "dp" if tiny else "fsdp"

    c.train = dict(
        total_steps=None,  # None: epochs x steps per epoch
        epochs=(10 if stage == "frozen" else 20) if not tiny else 0.0,
        log_every=10 if tiny else 50,
        eval_every=500 if tiny else 2000,
        ckpt_every=500 if tiny else 2000,
        keep=2,
        best_metric="miou" if res else "acc@0.5",
        seed=13,
        eval_max_batches=0,  # 0: whole split during training evals
        async_checkpoint=True,
        stop_after=0,  # >0: stop once step N's checkpoint is committed (see stop_hang)
        stop_hang=False,  # with stop_after: block instead of returning (to be killed in tests)
        progress=True,
    )
    if tiny:
        c.train.total_steps = 3000

    # init: a converted BEiT-3 checkpoint (refjax convert), a OneRef params checkpoint, or a
    # refjax train workdir (its best checkpoint; stage (b) from stage (a)).
    c.init = None
    c.eval = dict(splits=EVAL_SPLITS.get(dataset, ("val", "test")))
    c.lock()
    return c
