"""Helpers to build the PyTorch references (torchscale BEiT3) on random weights."""

from __future__ import annotations

import numpy as np

from tests.torch_util import require_torch


def torchscale_beit3(cfg, seed: int = 0):
    """A torchscale BEiT3 in eval mode matching refjax ``cfg``, every tensor randomised
    (LayerNorm scales around 1, the rest small normal noise) so parity is a real check."""
    torch = require_torch()
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as TorchBEiT3

    ecfg = EncoderConfig(
        img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size,
        multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
        encoder_embed_dim=cfg.dim, encoder_attention_heads=cfg.heads,
        encoder_ffn_embed_dim=cfg.mlp_dim, encoder_layers=cfg.depth,
        max_source_positions=cfg.max_source_positions, drop_path_rate=0.0,
    )
    torch.manual_seed(seed)
    model = TorchBEiT3(ecfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layer_norm" in name or "ln" in name.split(".")[-2]:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
