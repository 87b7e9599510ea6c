"""A checkpoint whose vocabulary came from another build of the dataset's tokenizer fails with a
clear error before it is restored (RefShapes trains its tokenizers at build time, and another
sentencepiece version trains another vocabulary: every text id would be silently wrong)."""

from __future__ import annotations

import os

import pytest

from refjax.data.tokenizers import BEIT3_FILE, load_beit3_tokenizer
from refjax.tasks import get_task
from refjax.train.trainer import load_config_json, restore_variables
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "refshapes_oneref_tiny")


def _config(data_dir: str):
    config = load_config_json(SHIPPED)
    with config.unlocked():
        config.data.data_dir = data_dir
        config.data.dataset_config = "tiny"  # another corpus: another vocabulary
    return config


def test_restore_refuses_a_checkpoint_of_another_tokenizer(refshapes_tiny_dir):  # noqa: F811
    config = _config(refshapes_tiny_dir)
    path = os.path.join(refshapes_tiny_dir, "refshapes", "tiny")
    (version,) = os.listdir(path)
    n = len(load_beit3_tokenizer(os.path.join(path, version, BEIT3_FILE)))
    assert n != config.model.vocab_size
    with pytest.raises(ValueError, match=f"vocab_size is {config.model.vocab_size} but .* "
                                         f"has {n} pieces"):
        restore_variables(config, SHIPPED)
    # the same vocabulary passes; an explicit tokenizer is the user's choice
    with config.unlocked():
        config.model.vocab_size = n
    get_task(config.task).check_tokenizer(config)
    with config.unlocked():
        config.model.vocab_size = n + 1
        config.data.tokenizer_path = os.path.join(path, version, BEIT3_FILE)
    get_task(config.task).check_tokenizer(config)
