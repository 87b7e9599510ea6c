"""OneRef REC / RES transfer (spec/oneref.md 4.3): ``get_config("tiny|base|large[,key=value...]")``.

The first item picks the model size; the others, all optional::

    task=rec|res            box (Acc@0.5) or mask (mIoU) transfer                  [rec]
    dataset=refshapes|...   refjax dataset name (refcoco, refcoco+, refcocog, ...) [refshapes]
    stage=frozen|full       (a) frozen-backbone warm-up or (b) full fine-tune      [full]
    data=default|tiny       the RefShapes builder config (tiny: a few dozen scenes) [default]

``tiny`` trains on RefShapes on a 2-core CPU (128 px, an 8x8 patch grid, 32 text tokens, the
RefShapes tokenizer's vocabulary); ``base``/``large`` follow the released scripts (384 px,
64 tokens; stage (a): 10 epochs, bs 512, lr 2.5e-4; stage (b): 20 epochs, lr 3e-5, bs 256 base /
64 large; AdamW wd 1e-4, per-epoch cosine, no warm-up, no clipping). The config is locked:
setting an unknown key is an error.
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

ARG_KEYS = {"task": ("rec", "res"), "stage": ("frozen", "full"), "dataset": None,
            "data": ("default", "tiny")}
ARG_DEFAULTS = {"task": "rec", "stage": "full", "dataset": "refshapes", "data": "default"}
# Every variant tests/test_config_compile.py lowers at full size on the fake 8-device mesh.
COMPILE_ARGS = tuple(
    f"{v},task={t},stage={s}" for v in ("tiny", "base", "large") for t in ("rec", "res")
    for s in ("frozen", "full")
)
EVAL_SPLITS = {
    "refshapes": ("val", "testA", "testB"),
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, ARG_KEYS, ARG_DEFAULTS)
    variant, task, stage, dataset = a["variant"], a["task"], a["stage"], a["dataset"]
    tiny = variant == "tiny"
    res = task == "res"
    c = ml_collections.ConfigDict()
    c.arg = arg or ""
    c.task = task  # the refjax.tasks registry name: rec | res

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

    # Data: the keys refjax.data.pipeline.make_pipeline reads (batch sizes are global).
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
        tokenizer_path=None,  # None: the dataset's own tokenizer file
        num_scales=7,  # OneRef's RandomResize long sides {384, 352, ..., 192}
        image_mean=(0.485, 0.456, 0.406),  # ImageNet, as OneRef (not BEiT-3's 0.5)
        image_std=(0.229, 0.224, 0.225),
        next_timeout_s=600.0,  # a batch slower than this is an error (stuck pipeline), not a hang
    )
    c.data.image_size = c.model.get_ref("img_size")

    # Optimizer: the keys refjax.train.optim.make_optimizer reads. frozen is one regex.
    if tiny:
        optim = dict(lr=5e-4, schedule="warmup_cosine", warmup_steps=100, min_lr_ratio=0.01)
    else:
        optim = dict(lr=2.5e-4 if stage == "frozen" else 3e-5, schedule="epoch_cosine")
    c.optim = optim_section(**optim, frozen="^beit3/" if stage == "frozen" else "")

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

    c.mesh = mesh_section()
    c.layout = "dp" if tiny else "fsdp"

    c.train = train_section(
        total_steps=3000 if tiny else None,
        epochs=(10 if stage == "frozen" else 20) if not tiny else 0.0,
        log_every=10 if tiny else 50,
        eval_every=500 if tiny else 2000,
        ckpt_every=500 if tiny else 2000,
        best_metric="miou" if res else "acc@0.5",
    )

    # init: a converted BEiT-3 checkpoint (refjax convert), a OneRef params checkpoint, or a
    # refjax train workdir (its best checkpoint; stage (b) from stage (a), or transfer from an
    # MRefM pretraining run: the pretraining heads are dropped, the backbone kept).
    c.init = None
    c.eval = dict(splits=EVAL_SPLITS.get(dataset, ("val", "test")))
    c.lock()
    return c
