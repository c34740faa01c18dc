"""Each tokenizer family on CPU: our encode and decode against the family's PyTorch reference,
per core, in the same run.

For each family: its published architecture (optionally narrowed with --ch), random weights made
by the reference's own modules and converted with the family's `to_flax` (both run the same
weights; the codebook redrawn at the scale of the encoder's latents so that tokens spread),
synthetic photo-like images. Both run on the same pinned cores (the last --cores=N, one by
default) with torch at as many threads; the two are timed in turn, one call each per round, so
that a busy machine slows them alike. The figure is process CPU time (close to the work done even
when other processes share the core); the ratio is the median over rounds of reference CPU
seconds / ours (> 1: ours faster). Token agreement with the reference (float32, same images) is
printed as a sanity check.

    bash benchmarks/fetch_references.sh     # once: the reference code, into third_party/
    python benchmarks/families.py --families taming,llamagen,ibq,maskgit,open_magvit2 \
        --size 256 --rounds 5

The published architectures: taming's default VQGAN, LlamaGen VQ-16, IBQ-16384, MaskGIT's
VQGAN (maskgit-vqgan-imagenet-f16-256.bin) and Open-MAGVIT2 (imagenet_lfqgan_256_L.yaml).
taming's reference is the `taming-transformers` package; the others run from third_party/.

A family is a `Bench` in `BENCHES`: its config and a function building its PyTorch reference
(`Reference`); `compare(bench, args)` measures one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _pin(cores: int) -> None:
    """Run on the last `cores` CPUs (as `taskset` would), torch with as many threads."""
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[-cores:])
    os.environ.setdefault("OMP_NUM_THREADS", str(cores))


if __name__ == "__main__":  # as a script (gpu_check.py imports BENCHES without this)
    _pin(next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--cores=")), 1))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from throughput import synthetic_images  # noqa: E402

from vqgan_datasets.models import families  # noqa: E402
from vqgan_datasets.models.config import VQGANConfig  # noqa: E402
from vqgan_datasets.models.modeling import module_from_config  # noqa: E402


@dataclasses.dataclass
class Reference:
    """A family's PyTorch model: `encode(pixels NCHW) -> (quantized NCHW, indices [B,N])`,
    `decode(quantized NCHW) -> pixels NCHW`, `latents(pixels) -> pre-quantization NCHW`,
    and its weights under the names its published files use (`state`)."""

    encode: Callable[[Any], tuple[Any, Any]]
    decode: Callable[[Any], Any]
    latents: Callable[[Any], Any]
    state: Callable[[], dict[str, np.ndarray]]
    set_codebook: Callable[[np.ndarray], None]


@dataclasses.dataclass
class Bench:
    family: str
    config: Callable[[argparse.Namespace], VQGANConfig]  # the published architecture
    reference: Callable[[VQGANConfig, int], Reference]
    value_range: tuple[float, float] = (-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# References


def taming_reference(config: VQGANConfig, seed: int) -> Reference:
    """taming-transformers' modules (the `taming-transformers` package)."""
    from throughput import build_reference

    ref = build_reference(config, seed)
    return Reference(
        encode=ref.encode, decode=ref.decode, latents=ref.latents,
        state=lambda: {k: v.detach().numpy() for k, v in ref.state_dict().items()},
        set_codebook=lambda c: _copy(ref.quantize.embedding.weight, c),
    )


def llamagen_reference(config: VQGANConfig, seed: int) -> Reference:
    """LlamaGen's vq_model.py, exported to third_party/llamagen (tests/fixtures/llamagen/)."""
    import torch

    sys.path.insert(0, str(ROOT / "third_party" / "llamagen"))
    import vq_model

    torch.manual_seed(seed)
    mult = list(config.ch_mult)
    model = vq_model.VQModel(vq_model.ModelArgs(
        codebook_size=config.n_embed, codebook_embed_dim=config.embed_dim, encoder_ch_mult=mult,
        decoder_ch_mult=mult, z_channels=config.z_channels))
    network = dict(ch=config.ch, num_res_blocks=config.num_res_blocks, z_channels=config.z_channels)
    model.encoder = vq_model.Encoder(ch_mult=mult, **network)
    model.decoder = vq_model.Decoder(ch_mult=mult, **network)
    model.eval()

    def encode(pixels):
        quant, _, (_, _, indices) = model.encode(pixels)
        return quant, indices.reshape(pixels.shape[0], -1)

    return Reference(
        encode=encode, decode=model.decode,
        latents=lambda x: model.quant_conv(model.encoder(x)),
        state=lambda: {k: v.detach().numpy() for k, v in model.state_dict().items()},
        set_codebook=lambda c: _copy(model.quantize.embedding.weight, c),
    )


def _seed_voken(folder: str, *modules: str) -> list[Any]:
    """SEED-Voken's modules exported to third_party/<folder> (benchmarks/fetch_references.sh).
    IBQ and Open-MAGVIT2 both import as the package `src`, so a cached one is dropped first."""
    import importlib

    for name in [n for n in sys.modules if n == "src" or n.startswith("src.")]:
        del sys.modules[name]
    sys.path.insert(0, str(ROOT / "third_party" / folder))
    try:
        return [importlib.import_module(name) for name in modules]
    finally:
        sys.path.remove(str(ROOT / "third_party" / folder))


def _ddconfig(config: VQGANConfig) -> dict[str, Any]:
    """SEED-Voken's `ddconfig` for a config (its yaml's model.init_args.ddconfig)."""
    return dict(double_z=False, z_channels=config.z_channels, resolution=config.resolution,
                in_channels=config.in_channels, out_ch=config.out_ch, ch=config.ch,
                ch_mult=list(config.ch_mult), num_res_blocks=config.num_res_blocks)


def ibq_reference(config: VQGANConfig, seed: int) -> Reference:
    """SEED-Voken's IBQ (src/IBQ/models/ibqgan.py's modules): taming's Encoder/Decoder and its
    index-propagation quantizer, entropy loss on as in configs/IBQ/gpu/imagenet_ibqgan_*.yaml
    (its encode computes it at inference too)."""
    import torch

    model_py, quantize_py = _seed_voken(
        "ibq", "src.IBQ.modules.diffusionmodules.model", "src.IBQ.modules.vqvae.quantize")
    torch.manual_seed(seed)
    ddconfig = dict(_ddconfig(config), attn_resolutions=list(config.attn_resolutions),
                    dropout=0.0)
    model = torch.nn.Module()
    model.encoder = model_py.Encoder(**ddconfig)
    model.decoder = model_py.Decoder(**ddconfig)
    model.quantize = quantize_py.IndexPropagationQuantize(
        config.n_embed, config.embed_dim, beta=0.25, use_entropy_loss=True)
    model.quant_conv = torch.nn.Conv2d(config.z_channels, config.embed_dim, 1)
    model.post_quant_conv = torch.nn.Conv2d(config.embed_dim, config.z_channels, 1)
    model.eval()
    latents = lambda x: model.quant_conv(model.encoder(x))  # noqa: E731

    def encode(pixels):
        quant, _, (_, _, indices) = model.quantize(latents(pixels))
        return quant, indices.reshape(pixels.shape[0], -1)

    return Reference(
        encode=encode, decode=lambda q: model.decoder(model.post_quant_conv(q)), latents=latents,
        state=lambda: {k: v.detach().numpy() for k, v in model.state_dict().items()},
        set_codebook=lambda c: _copy(model.quantize.embedding.weight, c),
    )


def maskgit_reference(config: VQGANConfig, seed: int) -> Reference:
    """The PyTorch port of MaskGIT's VQGAN (1d-tokenizer's modeling/modules/maskgit_vqgan.py, as
    its PretrainedTokenizer runs it: decode clamps to [0, 1]), in third_party/maskgit/torch_port."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT / "third_party" / "maskgit" / "torch_port"))
    import maskgit_vqgan

    torch.manual_seed(seed)
    conf = SimpleNamespace(
        channel_mult=list(config.ch_mult), num_resolutions=len(config.ch_mult), dropout=0.0,
        hidden_channels=config.ch, num_channels=config.in_channels,
        num_res_blocks=config.num_res_blocks, resolution=config.resolution,
        z_channels=config.z_channels)
    model = torch.nn.Module()
    model.encoder = maskgit_vqgan.Encoder(conf)
    model.decoder = maskgit_vqgan.Decoder(conf)
    model.quantize = maskgit_vqgan.VectorQuantizer(config.n_embed, config.z_channels, 0.25)
    model.eval()

    def encode(pixels):
        quant, indices, _ = model.quantize(model.encoder(pixels))
        return quant, indices.reshape(pixels.shape[0], -1)

    return Reference(
        encode=encode, decode=lambda q: torch.clamp(model.decoder(q), 0.0, 1.0),
        latents=model.encoder,
        state=lambda: {k: v.detach().numpy() for k, v in model.state_dict().items()},
        set_codebook=lambda c: _copy(model.quantize.embedding.weight, c),
    )


def open_magvit2_reference(config: VQGANConfig, seed: int) -> Reference:
    """SEED-Voken's Open-MAGVIT2 (src/Open_MAGVIT2/models/lfqgan.py's modules): the MAGVIT2
    Encoder/Decoder and the lookup-free quantizer, which has no codebook to set; its encode
    computes the training losses too, as lfqgan.VQModel.encode does."""
    import torch

    model_py, lfq_py = _seed_voken(
        "magvit2", "src.Open_MAGVIT2.modules.diffusionmodules.improved_model",
        "src.Open_MAGVIT2.modules.vqvae.lookup_free_quantize")
    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.encoder = model_py.Encoder(**_ddconfig(config))
    model.decoder = model_py.Decoder(**_ddconfig(config))
    model.quantize = lfq_py.LFQ(dim=config.embed_dim, codebook_size=config.n_embed,
                                sample_minimization_weight=1.0, batch_maximization_weight=1.0)
    model.eval()

    def encode(pixels):
        (quant, _, indices), _ = model.quantize(model.encoder(pixels), return_loss_breakdown=True)
        return quant, indices.reshape(pixels.shape[0], -1)

    return Reference(
        encode=encode, decode=model.decoder, latents=model.encoder,
        state=lambda: {k: v.detach().numpy() for k, v in model.state_dict().items()},
        set_codebook=lambda c: None,
    )


def _copy(parameter, values: np.ndarray) -> None:
    import torch

    with torch.no_grad():
        parameter.copy_(torch.from_numpy(values.astype(np.float32)))


def _narrowed(config: VQGANConfig, args: argparse.Namespace) -> VQGANConfig:
    return config.replace(ch=args.ch) if args.ch else config


BENCHES: dict[str, Bench] = {
    "taming": Bench("taming", lambda a: _narrowed(VQGANConfig(), a), taming_reference),
    "llamagen": Bench(  # VQ-16
        "llamagen",
        lambda a: _narrowed(VQGANConfig(embed_dim=8, n_embed=16384, family="llamagen"), a),
        llamagen_reference,
    ),
    "ibq": Bench(  # IBQ-16384 (configs/IBQ/gpu/imagenet_ibqgan_16384.yaml)
        "ibq",
        lambda a: _narrowed(VQGANConfig(num_res_blocks=4, n_embed=16384, family="ibq"), a),
        ibq_reference,
    ),
    "maskgit": Bench(  # maskgit-vqgan-imagenet-f16-256.bin
        "maskgit",
        lambda a: _narrowed(VQGANConfig(attn_resolutions=(), n_embed=1024, value_range=(0.0, 1.0),
                                        family="maskgit"), a),
        maskgit_reference, value_range=(0.0, 1.0),
    ),
    "open_magvit2": Bench(  # configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml
        "open_magvit2",
        lambda a: _narrowed(VQGANConfig(num_res_blocks=4, attn_resolutions=(), z_channels=18,
                                        embed_dim=18, n_embed=2**18, family="open_magvit2"), a),
        open_magvit2_reference,
    ),
}


# ---------------------------------------------------------------------------------------------
# Measuring


def compare(bench: Bench, args: argparse.Namespace) -> list[dict]:
    """Rows (family, op, seconds per image of ours and of the reference, median ratio,
    token agreement) for one family."""
    import torch

    config = bench.config(args)
    ref = bench.reference(config, args.seed)
    images = synthetic_images(args.batch, args.size, args.seed)
    low, high = bench.value_range
    pixels = images.astype(np.float32) / (255.0 / (high - low)) + low
    nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        latents = ref.latents(nchw).numpy()
    rng = np.random.default_rng(args.seed + 1)
    shape = (config.n_embed, config.embed_dim)
    ref.set_codebook(rng.normal(latents.mean(), latents.std(), shape))
    params = families.family_module(bench.family).to_flax(ref.state(), config)
    module = module_from_config(config)
    ours = {
        "encode": jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")),
        "decode": jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode")),
    }
    with torch.no_grad():
        quant, ref_codes = ref.encode(nchw)
    inputs = {"encode": (jnp.asarray(pixels), nchw),
              "decode": (jnp.asarray(quant.numpy().transpose(0, 2, 3, 1)), quant)}
    calls = {op: (lambda op=op: jax.block_until_ready(ours[op](params, inputs[op][0])),
                  lambda op=op: _torch_call(ref, op, inputs[op][1])) for op in ours}
    agree = float((np.asarray(calls["encode"][0]()[1]) == ref_codes.numpy()).mean())
    rows = []
    for op, (mine, theirs) in calls.items():
        mine(), theirs()  # compile, warm caches
        cpu: dict[str, list[float]] = {"ours": [], "reference": []}
        wall: dict[str, list[float]] = {"ours": [], "reference": []}
        for _ in range(args.rounds):
            for name, call in (("ours", mine), ("reference", theirs)):
                start, start_cpu = time.perf_counter(), time.process_time()
                call()
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
        ratios = [r / o for o, r in zip(cpu["ours"], cpu["reference"], strict=True)]
        rows.append(dict(family=bench.family, op=op,
                         ours=statistics.median(cpu["ours"]) / args.batch,
                         reference=statistics.median(cpu["reference"]) / args.batch,
                         wall_ours=statistics.median(wall["ours"]) / args.batch,
                         wall_reference=statistics.median(wall["reference"]) / args.batch,
                         ratio=statistics.median(ratios), tokens_equal=agree))
    return rows


def _torch_call(ref: Reference, op: str, x):
    import torch

    with torch.no_grad():
        return ref.encode(x) if op == "encode" else ref.decode(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(BENCHES),
                        help=f"comma-separated, of {sorted(BENCHES)}")
    parser.add_argument("--size", type=int, default=256, help="image side (pixels)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each, in turn")
    parser.add_argument("--ch", type=int, help="narrow the published base width (default: as published)")
    parser.add_argument("--cores", type=int, default=1, help="CPUs to pin to (set as --cores=N)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.cores)
    print(f"{args.size}x{args.size}, batch {args.batch}, {args.rounds} rounds, "
          f"{len(os.sched_getaffinity(0))} pinned core(s), jax {jax.__version__}, "
          f"torch {torch.__version__}\n")
    print("| family | op | ours CPU s/image | reference CPU s/image | reference/ours (median) "
          "| wall s/image, ours / reference | tokens equal |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.families.split(","):
        for row in compare(BENCHES[name], args):
            print(f"| {row['family']} | {row['op']} | {row['ours']:.3f} | {row['reference']:.3f} "
                  f"| {row['ratio']:.2f} | {row['wall_ours']:.3f} / {row['wall_reference']:.3f} "
                  f"| {100 * row['tokens_equal']:.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
