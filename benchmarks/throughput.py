"""Model-only throughput of the f16-16384 VQGAN: ours (Flax/XLA) against taming's PyTorch modules.

One run on whatever backend JAX has (CPU or GPU), random weights shared by both models (taming's
initialisation, converted with `vqgan_datasets.models.taming.taming_to_flax`; the codebook re-drawn at the
scale of the encoder's latents so that tokens spread over it), synthetic photo-like 256x256 images:

- ours: encode (pixels -> latents + codes, quantizer included) and decode (latents -> pixels),
  images/s over a batch sweep, per compute dtype; on GPU float32 at precision "highest" (true
  fp32) and at JAX's default (TF32 convs) are separate rows;
- taming's PyTorch reference on the same device: eager fp32 (TF32 off); on GPU also TF32, bf16
  autocast and torch.compile bf16 channels_last; ratios ours / reference measured in this run;
- nominal TFLOP/s and MFU from the FLOPs of taming's network per 256x256 image (encode 140.6 G
  with the quantizer, decode 252.7 G; our decoder does ~10% fewer, see BENCHMARKS.md);
- token agreement (each row against ours float32 and against taming fp32) and decoder max |diff|;
- memory: XLA's compile-time memory analysis per (dtype, op, batch), host RSS, torch's CUDA peak,
  and with `--max-batch-probe N` the largest batch whose compiled program fits the device.

Timings are medians over `--repeats` calls after one warm-up call. On CPU the variants are timed
round-robin (one call each, in turn), so that a busy machine slows them alike; compare ratios
from the same run. Inputs and outputs stay on the device; transfers are not timed.

This is the long, thorough run: it compiles every variant and, with --max-batch-probe, probes
batch sizes before it prints a table (over 4 minutes on an H200). For the short GPU check that
prints each row as soon as it is measured, use benchmarks/gpu_check.py.

    python benchmarks/throughput.py                        # CPU defaults: batches 1,2; repeats 2
    python benchmarks/throughput.py --batches 32,64,128,256 --max-batch-probe 2048 --json gpu.json
    python benchmarks/throughput.py --skip-torch --dtypes bfloat16 --only encode
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# Let torch and JAX share one GPU: JAX would otherwise take 75% of its memory at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vqgan_datasets.models.config import VQGANConfig, f16_16384  # noqa: E402
from vqgan_datasets.models.modeling import VQGAN, init_params, module_from_config  # noqa: E402
from vqgan_datasets.models.taming import taming_to_flax  # noqa: E402

# FLOPs per 256x256 image of taming's f16-16384 network (DESIGN.md, "Reference facts").
FLOPS_PER_IMAGE = {"encode": 140.6e9, "decode": 252.7e9}
DEFAULT_PEAK_TFLOPS = 798.0  # one H100, measured dense bf16 matmul peak
TORCH_MODES_CPU = ("fp32",)
TORCH_MODES_GPU = ("fp32", "tf32", "bf16", "compile-bf16-cl")
TORCH_MODE_NAMES = {
    "fp32": "taming fp32 eager",
    "fp32-cl": "taming fp32 eager channels_last",
    "tf32": "taming tf32 eager",
    "bf16": "taming bf16 autocast",
    "bf16-cl": "taming bf16 autocast channels_last",
    "compile-bf16-cl": "taming bf16 compile channels_last",
}
DECODE_KEEP = 8  # decoded images kept per row for the pixel comparison


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Inputs and weights


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear interpolation weights [n_out, n_in] (corners aligned)."""
    positions = np.linspace(0, n_in - 1, n_out)
    low = np.floor(positions).astype(int).clip(0, n_in - 2)
    frac = positions - low
    out = np.zeros((n_out, n_in))
    out[np.arange(n_out), low] = 1 - frac
    out[np.arange(n_out), low + 1] = frac
    return out


def synthetic_images(count: int, size: int, seed: int) -> np.ndarray:
    """Photo-like uint8 [count,size,size,3]: smooth colour fields, stripes, an edge, sensor noise."""
    rng = np.random.default_rng(seed)
    grid = _interp_matrix(6, size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        coarse = rng.uniform(0, 255, (6, 6, 3))
        image = np.einsum("yi,ijc,xj->yxc", grid, coarse, grid)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 40)
        stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        image += rng.uniform(0, 40) * stripes[..., None]
        edge = (xx * rng.normal() + yy * rng.normal()) > rng.normal(0, 0.5)
        image += edge[..., None] * rng.uniform(-60, 60, 3)
        image += rng.normal(0, 6, image.shape)
        out[i] = image.clip(0, 255).round().astype(np.uint8)
    return out


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 -> [-1, 1] float32, taming's range (f16-16384 was trained on it)."""
    return images.astype(np.float32) / 127.5 - 1.0


def _ddconfig(config: VQGANConfig) -> dict:
    return dict(
        ch=config.ch, out_ch=config.out_ch, in_channels=config.in_channels,
        ch_mult=list(config.ch_mult), num_res_blocks=config.num_res_blocks,
        attn_resolutions=list(config.attn_resolutions), resolution=config.resolution,
        z_channels=config.z_channels, double_z=config.double_z, dropout=config.dropout,
        resamp_with_conv=config.resamp_with_conv, give_pre_end=config.give_pre_end,
    )


def build_reference(config: VQGANConfig, seed: int):
    """taming's VQModel modules and forward (taming.models.vqgan needs Lightning; these don't)."""
    import torch
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    class TamingVQGAN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.encoder = Encoder(**_ddconfig(config))
            self.decoder = Decoder(**_ddconfig(config))
            self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25)
            self.quant_conv = torch.nn.Conv2d(config.z_channels, config.embed_dim, 1)
            self.post_quant_conv = torch.nn.Conv2d(config.embed_dim, config.z_channels, 1)
            self.eval()

        def latents(self, pixels_nchw):
            return self.quant_conv(self.encoder(pixels_nchw))

        def encode(self, pixels_nchw):
            quant, _, (_, _, indices) = self.quantize(self.latents(pixels_nchw))
            return quant, indices.reshape(pixels_nchw.shape[0], -1)

        def decode(self, quant_nchw):
            return self.decoder(self.post_quant_conv(quant_nchw))

    return TamingVQGAN()


def shared_weights(config: VQGANConfig, calibration: np.ndarray, seed: int, with_torch: bool):
    """(reference module or None, our params): the same random weights in both.

    The codebook is re-drawn from N(mean, std) of the encoder's latents on `calibration`
    (random init puts it at +-1/n_embed, where every latent maps to a handful of codes).
    """
    rng = np.random.default_rng(seed + 1)
    if with_torch:
        import torch

        ref = build_reference(config, seed)
        with torch.no_grad():
            latents = ref.latents(torch.from_numpy(calibration.transpose(0, 3, 1, 2).copy()))
            mean, std = float(latents.mean()), float(latents.std())
            codebook = rng.normal(mean, std, ref.quantize.embedding.weight.shape)
            ref.quantize.embedding.weight.copy_(torch.from_numpy(codebook.astype(np.float32)))
        state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        return ref, taming_to_flax(state, config, "taming reference (random weights)")
    params = init_params(config, seed)
    module = module_from_config(config)
    latents = np.asarray(module.apply({"params": params}, calibration, method=VQGAN.encode_latents))
    codebook = params["quantize"]["embedding"]["embedding"]
    params["quantize"]["embedding"]["embedding"] = rng.normal(
        latents.mean(), latents.std(), codebook.shape
    ).astype(np.float32)
    return None, params


# ---------------------------------------------------------------------------------------------
# Variants: something that, given (op, batch), returns a zero-argument call producing outputs


@dataclasses.dataclass
class Prepared:
    call: Callable[[], Any]
    sync: Callable[[Any], Any]
    to_numpy: Callable[[Any], tuple[np.ndarray, ...]]
    info: dict


class JaxVariant:
    def __init__(self, name, config, params, dtype, precision, inputs, latents):
        self.name, self.family = name, "ours"
        self.dtype, self.precision = jnp.dtype(dtype), precision
        self.module = module_from_config(config, self.dtype)
        self.params, self.inputs, self.latents = params, inputs, latents
        self.config = config

    def function(self, op: str):
        method = VQGAN.encode if op == "encode" else VQGAN.decode
        return lambda p, x: self.module.apply({"params": p}, x, method=method)

    def compile(self, op: str, batch: int):
        shape = self.input_shape(op, batch)
        spec = jax.ShapeDtypeStruct(shape, jnp.float32)
        start = time.perf_counter()
        with jax.default_matmul_precision(self.precision):
            compiled = jax.jit(self.function(op)).lower(self.params, spec).compile()
        return compiled, time.perf_counter() - start

    def input_shape(self, op: str, batch: int) -> tuple[int, ...]:
        if op == "encode":
            return (batch, *self.inputs.shape[1:])
        return (batch, *self.latents(batch).shape[1:])

    def prepare(self, op: str, batch: int) -> Prepared:
        compiled, seconds = self.compile(op, batch)
        x = jax.device_put(self.inputs[:batch] if op == "encode" else self.latents(batch))
        info = {"compile_s": seconds, "xla_memory": memory_analysis(compiled)}
        if op == "encode":
            to_numpy = lambda out: (np.asarray(out[1]),)  # noqa: E731
        else:
            to_numpy = lambda out: (np.asarray(out[:DECODE_KEEP]),)  # noqa: E731
        return Prepared(lambda: compiled(self.params, x), jax.block_until_ready, to_numpy, info)

    def finish(self) -> None:
        pass


class TorchVariant:
    def __init__(self, mode, reference, device, inputs, latents):
        import torch

        self.torch, self.mode, self.device = torch, mode, device
        self.name, self.family = TORCH_MODE_NAMES[mode], "taming"
        self.model = reference.to(device)
        self.channels_last = mode.endswith("-cl")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.inputs, self.latents = inputs, latents
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.compiled: dict[str, Callable] = {}

    def _precision(self) -> None:
        torch = self.torch
        if not self.cuda:
            return
        fp32 = "tf32" if self.mode != "fp32" else "ieee"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = fp32
            torch.backends.cudnn.conv.fp32_precision = fp32
        else:
            torch.backends.cuda.matmul.allow_tf32 = fp32 == "tf32"
            torch.backends.cudnn.allow_tf32 = fp32 == "tf32"

    def _fn(self, op: str) -> Callable:
        torch = self.torch
        base = self.model.encode if op == "encode" else self.model.decode
        if self.mode in ("bf16", "bf16-cl", "compile-bf16-cl"):
            def fn(x, base=base):
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    return base(x)
        else:
            fn = base
        if self.mode.startswith("compile"):
            if op not in self.compiled:
                self.compiled[op] = torch.compile(fn, dynamic=False)
            return self.compiled[op]
        return fn

    def prepare(self, op: str, batch: int) -> Prepared:
        torch = self.torch
        self._precision()
        host = self.inputs[:batch] if op == "encode" else self.latents(batch)
        x = torch.from_numpy(np.ascontiguousarray(host.transpose(0, 3, 1, 2))).to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        fn = self._fn(op)

        def call():
            with torch.inference_mode():
                return fn(x)

        def sync(out):
            if self.cuda:
                torch.cuda.synchronize(self.device)
            return out

        if op == "encode":
            to_numpy = lambda out: (out[1].cpu().numpy(),)  # noqa: E731
        else:
            to_numpy = lambda out: (  # noqa: E731
                out[:DECODE_KEEP].float().cpu().numpy().transpose(0, 2, 3, 1),
            )
        return Prepared(call, sync, to_numpy, {})

    def finish(self) -> None:
        if self.cuda:
            self.compiled.clear()
            self.torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Measurement


def memory_analysis(compiled) -> dict | None:
    """XLA's compile-time buffer sizes (bytes): what one call of the program holds at its peak."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if stats is None:
        return None
    out = {
        name: int(getattr(stats, f"{name}_size_in_bytes", 0))
        for name in ("argument", "output", "temp", "alias", "generated_code")
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(prepared: Prepared) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, outputs) of one synchronised call."""
    start, cpu = time.perf_counter(), time.process_time()
    out = prepared.sync(prepared.call())
    return time.perf_counter() - start, time.process_time() - cpu, out


@dataclasses.dataclass
class Row:
    variant: str
    family: str
    op: str
    batch: int
    times: list = dataclasses.field(default_factory=list)
    cpu_times: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    outputs: tuple = ()

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds


def measure_cell(variants, op: str, batch: int, repeats: int, device_memory) -> list[Row]:
    """All variants at one (op, batch), timed round-robin after one warm-up call each."""
    rows, prepared = [], []
    for variant in variants:
        log(f"  {op} batch {batch}: prepare {variant.name}")
        p = variant.prepare(op, batch)
        warm, _, _ = timed(p)
        p.info["warmup_s"] = warm
        prepared.append(p)
        rows.append(Row(variant.name, variant.family, op, batch, info=p.info))
    for _ in range(repeats):
        for p, row in zip(prepared, rows, strict=True):
            seconds, cpu, out = timed(p)
            row.times.append(seconds)
            row.cpu_times.append(cpu)
            row.outputs = p.to_numpy(out)
    for variant, row in zip(variants, rows, strict=True):
        row.info["rss_mib"] = rss_mib()
        row.info.update(device_memory(variant))
    return rows


def run(variants, ops, batches, repeats, interleave, device_memory) -> list[Row]:
    rows: list[Row] = []
    if interleave:
        for op in ops:
            for batch in batches:
                rows += measure_cell(variants, op, batch, repeats, device_memory)
        for variant in variants:
            variant.finish()
        return rows
    for variant in variants:  # one at a time, so that torch and XLA never hold memory together
        for op in ops:
            for batch in batches:
                rows += measure_cell([variant], op, batch, repeats, device_memory)
        variant.finish()
    return rows


def probe_max_batch(variant: JaxVariant, op: str, start: int, limit_batch: int, budget: int):
    """Largest batch (doubling from `start`, then `limit_batch`) whose compiled program fits."""
    candidates, b = [], start
    while b < limit_batch:
        candidates.append(b)
        b *= 2
    candidates.append(limit_batch)
    best, tried = None, []
    for batch in candidates:
        compiled, _ = variant.compile(op, batch)
        memory = memory_analysis(compiled)
        del compiled
        if memory is None:
            return None, tried
        tried.append({"batch": batch, "bytes": memory["total"]})
        if memory["total"] > budget:
            break
        best = batch
    return best, tried


def memory_budget() -> tuple[int, str]:
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "device bytes_limit (XLA allocator)"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "host MemAvailable"
    return 0, "unknown"


# ---------------------------------------------------------------------------------------------
# Report


def agreement(rows: list[Row], op: str, reference: str) -> dict:
    """Per variant, at the largest batch both have: token equality or max |pixel diff|."""
    out = {}
    by_key = {(r.variant, r.batch): r for r in rows if r.op == op}
    for r in rows:
        if r.op != op or r.variant == reference or (reference, r.batch) not in by_key:
            continue
        other = by_key[(reference, r.batch)].outputs[0]
        mine = r.outputs[0]
        if op == "encode":
            value = float((mine == other).mean())
        else:
            value = float(np.abs(mine.astype(np.float32) - other).max())
        if r.variant not in out or r.batch > out[r.variant]["batch"]:
            out[r.variant] = {"batch": r.batch, "value": value}
    return out


def markdown(rows, ops, reference_name, peak_tflops, flops_scale, cpu_column) -> str:
    lines = []
    ref = {(r.op, r.batch): r for r in rows if r.variant == reference_name}
    show_mfu = peak_tflops is not None
    header = "| op | batch | implementation | images/s | x taming fp32 | TFLOP/s |"
    rule = "|---|---:|---|---:|---:|---:|"
    if show_mfu:
        header += " MFU |"
        rule += "---:|"
    if cpu_column:
        header += " CPU s/image |"
        rule += "---:|"
    header += " XLA memory GiB | host RSS MiB |"
    rule += "---:|---:|"
    lines += [header, rule]
    for op in ops:
        for r in sorted((r for r in rows if r.op == op), key=lambda r: (r.batch, r.family != "ours")):
            base = ref.get((op, r.batch))
            ratio = f"{r.images_per_s / base.images_per_s:.2f}" if base else "-"
            tflops = r.images_per_s * FLOPS_PER_IMAGE[op] * flops_scale / 1e12
            cells = [op, str(r.batch), r.variant, f"{r.images_per_s:.3g}", ratio, f"{tflops:.3g}"]
            if show_mfu:
                cells.append(f"{100 * tflops / peak_tflops:.1f}%")
            if cpu_column:
                cells.append(f"{statistics.median(r.cpu_times) / r.batch:.2f}")
            memory = r.info.get("xla_memory")
            cells.append(f"{memory['total'] / 2**30:.2f}" if memory else "-")
            cells.append(f"{r.info.get('rss_mib', 0):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_table(agree: dict, ops, ours_f32: str | None, reference_name: str | None) -> str:
    """One row per implementation: encode tokens equal (%) and decode max |diff| against ours
    float32 and against taming fp32 eager."""
    against = [name for name in (ours_f32, reference_name) if name]
    names = []
    for op in ops:
        for values in agree[op].values():
            names += [n for n in values if n not in names]
    if not names:
        return "(nothing to compare: one implementation only)"
    header, rule = ["implementation"], ["---"]
    for op in ops:
        what = "tokens equal to" if op == "encode" else "decode max abs diff to"
        for name in against:
            header.append(f"{what} {name}")
            rule.append("---:")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for name in names:
        cells = [name]
        for op in ops:
            for other in against:
                v = agree[op].get(f"vs {other}", {}).get(name)
                if v is None:
                    cells.append("-")
                elif op == "encode":
                    cells.append(f"{100 * v['value']:.2f}% (b{v['batch']})")
                else:
                    cells.append(f"{v['value']:.1e} (b{v['batch']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict:
    import flax
    import jaxlib

    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        env["cpu"] = platform.processor()
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", help="comma-separated batch sizes "
                        "(default: 1,2 on CPU; 32,64,128,256 on GPU)")
    parser.add_argument("--repeats", type=int,
                        help="timed calls per cell after one warm-up (default: 2 CPU, 3 GPU)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="compute dtypes of ours (default: float32,bfloat16)")
    parser.add_argument("--only", choices=("encode", "decode"), help="time one direction only")
    parser.add_argument("--skip-torch", action="store_true", help="no PyTorch reference")
    parser.add_argument("--torch-modes", help="comma-separated, from "
                        f"{','.join(TORCH_MODE_NAMES)} (default: fp32 on CPU; "
                        f"{','.join(TORCH_MODES_GPU)} on GPU)")
    parser.add_argument("--peak-tflops", type=float, help="peak for MFU (default on GPU: "
                        f"{DEFAULT_PEAK_TFLOPS:g}, H100 dense bf16; no MFU column on CPU)")
    parser.add_argument("--max-batch-probe", type=int, default=0, metavar="N",
                        help="find the largest batch <= N whose compiled program fits the "
                        "device (compile only, per dtype and op)")
    parser.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                        help="time variants round-robin (default on CPU; off on GPU, where "
                        "torch and XLA then never hold memory together)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="square input size (256 for the real workload; smaller for a "
                        "smoke test, FLOPs scaled by area)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write all results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = jax.default_backend()
    on_gpu = backend == "gpu"
    batches = [int(b) for b in (args.batches or ("32,64,128,256" if on_gpu else "1,2")).split(",")]
    repeats = args.repeats or (3 if on_gpu else 2)
    interleave = args.interleave if args.interleave is not None else not on_gpu
    ops = [args.only] if args.only else ["encode", "decode"]
    peak = args.peak_tflops if args.peak_tflops is not None else (
        DEFAULT_PEAK_TFLOPS if on_gpu else None)
    config = f16_16384()
    size = args.image_size
    flops_scale = (size / 256) ** 2
    env = environment()
    log(f"backend {backend} ({', '.join(env['devices'])}), batches {batches}, repeats {repeats}")

    images = synthetic_images(max(batches), size, args.seed)
    pixels = to_model_range(images)

    with_torch = not args.skip_torch
    if with_torch:
        try:
            import taming.modules.diffusionmodules.model  # noqa: F401
            import torch  # noqa: F401
        except ImportError as error:
            log(f"no PyTorch reference ({error}); pip install -e '.[bench]' taming-transformers-rom1504")
            with_torch = False
    start = time.perf_counter()
    reference, params = shared_weights(config, pixels[:1], args.seed, with_torch)
    log(f"weights ready in {time.perf_counter() - start:.1f}s")
    params = jax.device_put(params)

    # Decode inputs: the codebook rows of ours-float32's tokens for these images, made once, in
    # chunks (XLA's GPU allocator keeps what it grew to; torch may run next on the same GPU).
    latent_pool: list[np.ndarray] = []

    def latents(batch: int) -> np.ndarray:
        if not latent_pool:
            module = module_from_config(config)
            encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQGAN.encode))
            chunk = min(len(pixels), 32)
            padded = np.concatenate([pixels, pixels[: -len(pixels) % chunk]])
            parts = [np.asarray(encode(params, padded[i : i + chunk])[0])
                     for i in range(0, len(padded), chunk)]
            latent_pool.append(np.concatenate(parts)[: len(pixels)])
        return latent_pool[0][:batch]

    variants: list = []
    if with_torch:
        import torch

        device = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
        modes = (args.torch_modes.split(",") if args.torch_modes
                 else TORCH_MODES_GPU if device.type == "cuda" else TORCH_MODES_CPU)
        for mode in modes:
            if mode not in TORCH_MODE_NAMES:
                raise SystemExit(f"unknown torch mode {mode!r}; choose from {list(TORCH_MODE_NAMES)}")
            model = reference if mode == modes[-1] else build_copy(reference)
            variants.append(TorchVariant(mode, model, device, pixels, latents))
    ours = []
    for dtype in args.dtypes.split(","):
        dtype = jnp.dtype(dtype).name
        short = {"float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype)
        if dtype == "float32" and on_gpu:
            ours.append(JaxVariant("ours f32 highest", config, params, dtype, "highest", pixels, latents))
            ours.append(JaxVariant("ours f32 default (TF32)", config, params, dtype, "default",
                                   pixels, latents))
        else:
            ours.append(JaxVariant(f"ours {short}", config, params, dtype, "default", pixels, latents))
    variants = ours + variants if interleave else variants + ours  # torch first when sequential

    def device_memory(variant) -> dict:
        if isinstance(variant, TorchVariant) and variant.cuda:
            return {"torch_cuda_peak_mib": variant.torch.cuda.max_memory_allocated() / 2**20}
        if on_gpu and isinstance(variant, JaxVariant):
            stats = jax.devices()[0].memory_stats() or {}
            return {"xla_peak_bytes_in_use_mib": stats.get("peak_bytes_in_use", 0) / 2**20}
        return {}

    if "decode" in ops:
        latents(max(batches))  # before timing, so that no timed cell pays for it
    rows = run(variants, ops, batches, repeats, interleave, device_memory)

    reference_name = TORCH_MODE_NAMES["fp32"] if with_torch else None
    ours_f32 = next((v.name for v in ours if v.dtype == jnp.float32), None)
    agree = {}
    for op in ops:
        agree[op] = {}
        for name in filter(None, (ours_f32, reference_name)):
            agree[op][f"vs {name}"] = agreement(rows, op, name)

    probes = {}
    if args.max_batch_probe:
        budget, source = memory_budget()
        log(f"probing batch sizes up to {args.max_batch_probe} against {budget / 2**30:.1f} GiB "
            f"({source})")
        for variant in ours:
            for op in ops:
                best, tried = probe_max_batch(variant, op, max(batches),
                                              args.max_batch_probe, budget)
                probes[f"{variant.name} {op}"] = {"largest_fitting_batch": best, "tried": tried,
                                                  "budget_bytes": budget, "budget_source": source}

    env["load_avg_end"] = os.getloadavg()
    env["peak_rss_mib"] = peak_rss_mib()
    print(f"\n## VQGAN f16-16384 at {size}x{size}, {backend} ({', '.join(env['devices'])}), "
          f"{env['cpu_count']} CPUs: {env['cpu']}")
    print(f"jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, torch {env['torch']}, "
          f"numpy {env['numpy']}; {env['date']}; repeats {repeats} (median), "
          f"{'round-robin' if interleave else 'one variant at a time'}; "
          f"load average {env['load_avg_start'][0]:.1f} -> {env['load_avg_end'][0]:.1f}\n")
    print(markdown(rows, ops, reference_name, peak, flops_scale, cpu_column=not on_gpu))
    print("\nTFLOP/s and MFU use taming's nominal FLOPs (encode 140.6 G, decode 252.7 G per 256² image)"
          + (f"; MFU against {peak:g} TFLOP/s" if peak else "")
          + ("; CPU s/image is process CPU time (all threads, spin-waiting included)"
             if not on_gpu else ""))
    print("\n### Agreement (largest common batch)\n")
    print(agreement_table(agree, ops, ours_f32, reference_name))
    if probes:
        print("\n### Largest batch whose compiled program fits\n")
        for key, p in probes.items():
            print(f"- {key}: {p['largest_fitting_batch']} "
                  f"(budget {p['budget_bytes'] / 2**30:.1f} GiB, {p['budget_source']})")
    print(f"\nhost peak RSS {env['peak_rss_mib']:.0f} MiB")

    if args.json:
        result = {
            "environment": env,
            "args": vars(args),
            "batches": batches,
            "repeats": repeats,
            "flops_per_image": {op: FLOPS_PER_IMAGE[op] * flops_scale for op in ops},
            "peak_tflops": peak,
            "rows": [
                {"variant": r.variant, "family": r.family, "op": r.op, "batch": r.batch,
                 "times_s": r.times, "cpu_times_s": r.cpu_times, "median_s": r.seconds, "images_per_s": r.images_per_s,
                 **r.info}
                for r in rows
            ],
            "agreement": agree,
            "max_batch_probe": probes,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=float)
        log(f"wrote {args.json}")
    return 0


def build_copy(reference):
    """An independent copy of the reference (each torch mode may change layout or be compiled)."""
    import copy

    return copy.deepcopy(reference)


if __name__ == "__main__":
    sys.exit(main())
