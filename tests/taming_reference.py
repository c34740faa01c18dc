"""The reference implementation for parity tests: taming-transformers' own PyTorch modules.

Imports only `taming.modules.diffusionmodules.model` and `taming.modules.vqvae.quantize` (the rest
of the package needs pytorch_lightning). Weights are random, seeded; the codebook is re-drawn
at the scale of the encoder's latents so that the tokens are spread over the whole codebook.
"""

from __future__ import annotations

import numpy as np
import torch
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer2

from vqgan_datasets.models.config import VQGANConfig


def ddconfig(config: VQGANConfig) -> dict:
    return dict(
        ch=config.ch, out_ch=config.out_ch, in_channels=config.in_channels,
        ch_mult=list(config.ch_mult), num_res_blocks=config.num_res_blocks,
        attn_resolutions=list(config.attn_resolutions), resolution=config.resolution,
        z_channels=config.z_channels, double_z=config.double_z, dropout=config.dropout,
        resamp_with_conv=config.resamp_with_conv, give_pre_end=config.give_pre_end,
    )


class TamingVQGAN(torch.nn.Module):
    """taming.models.vqgan.VQModel's modules and forward, without Lightning."""

    def __init__(self, config: VQGANConfig, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = Encoder(**ddconfig(config))
        self.decoder = Decoder(**ddconfig(config))
        self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.eval()

    @torch.no_grad()
    def spread_codebook(self, pixels_nchw: torch.Tensor) -> None:
        """Re-draw the codebook at the latents' scale (random init puts it at ±1/n_embed)."""
        h = self.quant_conv(self.encoder(pixels_nchw))
        std = float(h.std())
        mean = float(h.mean())
        gen = torch.Generator().manual_seed(1)
        weight = self.quantize.embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=gen) * std + mean)

    @torch.no_grad()
    def encode(self, pixels_nchw: torch.Tensor):
        h = self.quant_conv(self.encoder(pixels_nchw))
        quant, _, (_, _, indices) = self.quantize(h)
        return quant, indices.reshape(pixels_nchw.shape[0], -1)

    @torch.no_grad()
    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def lightning_checkpoint(self) -> dict:
        """What a taming training run saves: state_dict with loss/discriminator weights, and more."""
        state = dict(self.state_dict())
        gen = torch.Generator().manual_seed(2)
        state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4, generator=gen)
        state["loss.logvar"] = torch.zeros(())
        return {
            "epoch": 3,
            "global_step": 1000,
            "pytorch-lightning_version": "1.0.8",
            "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}],
            "lr_schedulers": [],
        }


def nhwc_to_nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float()


def nchw_to_nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy().transpose(0, 2, 3, 1)
