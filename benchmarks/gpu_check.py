"""The short GPU check (under 4 minutes on one H100/H200): ours against vqgan-jax and taming.

Rows are printed as soon as each is measured, most important first:

- model-only encode and decode, images/s and MFU, at batch 128 and 256: ours bf16 and float32
  (JAX's default precision: TF32 convs) against vqgan-jax's Flax modules under a plain `jax.jit`
  (imported from `--vqgan-jax DIR`, a git-ignored checkout; its transformers wrapper is never
  imported), and taming's PyTorch modules in bf16 autocast, eager, channels_last;
- token agreement on the batch-128 images: ours float32 "highest" against taming fp32 (TF32
  off), and every other row against ours "highest";
- with `--e2e`: JPEG bytes to tokens end to end (our Engine, exact and fast preprocessing; a
  `datasets` map; the flax-community/vqgan_f16_16384 model card's torch DataLoader + pmap
  script, rewritten here, with 4 and 15 workers).

Random weights (taming's initialisation when torch and taming import, else ours; one seed) are
shared by every implementation; the codebook is redrawn at the scale of the encoder's latents so
that tokens spread over it. Inputs stay on the device; each row is `--repeats` back-to-back calls
after `--warmup` calls. Rows past `--budget-s` are skipped, and say so.

    python benchmarks/gpu_check.py --vqgan-jax third_party/vqgan-jax [--e2e]
    python benchmarks/gpu_check.py --tiny --e2e     # a tiny config on CPU: proves the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import io
import os
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

# JAX takes this share of the GPU; torch (taming rows) uses the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
# throughput.py's helpers, and this checkout's package when it is not installed.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from throughput import (  # noqa: E402
    FLOPS_PER_IMAGE,
    TorchVariant,
    shared_weights,
    synthetic_images,
    to_model_range,
)

from vqgan_datasets.models.config import VQGANConfig, f16_16384  # noqa: E402
from vqgan_datasets.models.modeling import module_from_config  # noqa: E402

TINY = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                   z_channels=32, embed_dim=32, n_embed=1024)
START = time.perf_counter()
TAMING_NAMES = {"bf16-cl": "taming bf16 eager channels_last", "fp32": "taming fp32 eager (TF32 off)"}


def say(text: str = "") -> None:
    print(text, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


# ---------------------------------------------------------------------------------------------
# vqgan-jax's Flax modules, without transformers


@dataclasses.dataclass(frozen=True)
class SeedConfig:
    """The attributes vqgan-jax's modules read from their config (taming's field names)."""

    ch: int
    out_ch: int
    in_channels: int
    num_res_blocks: int
    resolution: int
    z_channels: int
    ch_mult: tuple
    attn_resolutions: tuple
    n_embed: int
    embed_dim: int
    dropout: float
    double_z: bool
    resamp_with_conv: bool
    give_pre_end: bool
    num_resolutions: int


def seed_config(config: VQGANConfig) -> SeedConfig:
    return SeedConfig(
        ch=config.ch, out_ch=config.out_ch, in_channels=config.in_channels,
        num_res_blocks=config.num_res_blocks, resolution=config.resolution,
        z_channels=config.z_channels, ch_mult=tuple(config.ch_mult),
        attn_resolutions=tuple(config.attn_resolutions), n_embed=config.n_embed,
        embed_dim=config.embed_dim, dropout=config.dropout, double_z=config.double_z,
        resamp_with_conv=config.resamp_with_conv, give_pre_end=config.give_pre_end,
        num_resolutions=len(config.ch_mult),
    )


def load_seed_modules(directory: str) -> types.ModuleType:
    """vqgan-jax's `modeling_flax_vqgan.py` from a checkout, its transformers base class and
    config class replaced by placeholders (only its Flax modules are used)."""
    root = Path(directory)
    candidates = [root / "vqgan_jax" / "modeling_flax_vqgan.py", root / "modeling_flax_vqgan.py"]
    source = next((p for p in candidates if p.is_file()), None)
    if source is None:
        raise FileNotFoundError(f"no modeling_flax_vqgan.py under {root} (looked for "
                                f"{', '.join(str(p) for p in candidates)})")
    package = "_vqgan_jax_seed"
    stubs = {
        package: types.ModuleType(package),
        f"{package}.configuration_vqgan": types.ModuleType(f"{package}.configuration_vqgan"),
        "transformers": types.ModuleType("transformers"),
        "transformers.modeling_flax_utils": types.ModuleType("transformers.modeling_flax_utils"),
    }
    stubs[package].__path__ = []
    stubs[f"{package}.configuration_vqgan"].VQGANConfig = SeedConfig
    stubs["transformers.modeling_flax_utils"].FlaxPreTrainedModel = type(
        "FlaxPreTrainedModel", (), {})
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location(f"{package}.modeling_flax_vqgan", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


# ---------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Impl:
    """One JAX implementation: (op) -> f(params, x), compiled per batch."""

    name: str
    fn: Callable[[str], Callable]
    precision: str = "default"


def ours(config: VQGANConfig, dtype, precision: str = "default") -> Impl:
    module = module_from_config(config, jnp.dtype(dtype))

    def fn(op: str) -> Callable:
        return lambda p, x: module.apply({"params": p}, x, method=op)

    short = {"float32": "f32", "bfloat16": "bf16"}[jnp.dtype(dtype).name]
    label = f"ours {short}" + (" highest" if precision == "highest" else
                               " default" if short == "f32" else "")
    return Impl(label, fn, precision)


def seed(seed_modules, config: VQGANConfig, dtype) -> Impl:
    module = seed_modules.VQModule(seed_config(config), dtype=jnp.dtype(dtype))

    def fn(op: str) -> Callable:
        method = module.encode if op == "encode" else module.decode
        return lambda p, x: module.apply({"params": p}, x, method=method)

    short = {"float32": "f32 default", "bfloat16": "bf16"}[jnp.dtype(dtype).name]
    return Impl(f"vqgan-jax {short}", fn)


class Table:
    def __init__(self, peak_tflops: float | None, flops: dict | None):
        self.peak, self.flops = peak_tflops, flops
        self.speed: dict[tuple[str, str, int], float] = {}
        say("| op | batch | implementation | images/s | MFU | x vqgan-jax same dtype | compile s |")
        say("|---|---:|---|---:|---:|---:|---:|")

    def row(self, op: str, batch: int, name: str, images_per_s: float | None, compile_s=None,
            note: str = "") -> None:
        if images_per_s is None:
            say(f"| {op} | {batch} | {name} | - | - | - | - | {note}".rstrip() + " |")
            return
        self.speed[(name, op, batch)] = images_per_s
        mfu = (f"{100 * images_per_s * self.flops[op] / 1e12 / self.peak:.1f}%"
               if self.flops and self.peak else "-")
        seed_name = "vqgan-jax " + ("bf16" if "bf16" in name else "f32 default")
        base = self.speed.get((seed_name, op, batch))
        ratio = (f"{images_per_s / base:.2f}" if base and name in ("ours bf16", "ours f32 default")
                 else "-")
        compiled = f"{compile_s:.1f}" if compile_s is not None else "-"
        say(f"| {op} | {batch} | {name} | {images_per_s:,.0f} | {mfu} | {ratio} | {compiled} |"
            + (f" {note}" if note else ""))


def time_calls(call: Callable, sync: Callable, warmup: int, repeats: int):
    """(seconds per call over `repeats` back-to-back calls after `warmup`, last output)."""
    for _ in range(warmup):
        out = sync(call())
    start = time.perf_counter()
    for _ in range(repeats):
        out = call()
    sync(out)
    return (time.perf_counter() - start) / repeats, out


def run_jax(impl: Impl, op: str, batch: int, params, inputs: dict, args) -> tuple[float, float, object]:
    x = inputs[op][:batch]
    start = time.perf_counter()
    with jax.default_matmul_precision(impl.precision), contextlib.redirect_stdout(io.StringIO()):
        compiled = jax.jit(impl.fn(op)).lower(params, x).compile()
    compile_s = time.perf_counter() - start
    # "highest" is there for its tokens (true float32 convs are slow on GPUs): two calls do.
    warmup, repeats = (1, 1) if impl.precision == "highest" else (args.warmup, args.repeats)
    seconds, out = time_calls(lambda: compiled(params, x), jax.block_until_ready, warmup, repeats)
    return batch / seconds, compile_s, out


def host_out(op: str, out):
    """What agreement needs: encode tokens [B,h*w]; decode the first 4 images."""
    if op == "encode":
        return np.asarray(out[1]).reshape(out[1].shape[0], -1)
    return np.asarray(out[:4], np.float32)


def model_rows(args, config, params, inputs, impls, table, outputs) -> None:
    cells = [(op, b) for b in args.batches for op in ("encode", "decode")]
    for op, batch in cells:
        for impl in impls:
            if "f32" in impl.name and batch != args.batches[0] and not args.f32_all_batches:
                continue
            if impl.precision == "highest" and (op != "encode" or batch != args.batches[0]):
                continue
            if elapsed() > args.budget_s:
                table.row(op, batch, impl.name, None, note=f"skipped: past --budget-s {args.budget_s:g}")
                continue
            try:
                speed, compile_s, out = run_jax(impl, op, batch, params, inputs, args)
            except Exception as error:  # noqa: BLE001 - report and go on (e.g. out of memory)
                table.row(op, batch, impl.name, None, note=f"failed: {type(error).__name__}: "
                          f"{str(error).splitlines()[0][:160]}")
                continue
            outputs[(impl.name, op, batch)] = host_out(op, out)
            del out
            table.row(op, batch, impl.name, speed, compile_s)


def taming_rows(args, reference, inputs, table, outputs) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latents = lambda n: inputs["decode_host"][:n]  # noqa: E731
    first = args.batches[0]
    # fp32 with TF32 off first: the reference for token agreement. No compiles here, so these
    # rows get 40 s past the budget.
    plan = [("fp32", "encode", first)]
    plan += [("bf16-cl", op, b) for b in args.batches for op in ("encode", "decode")]
    for mode, op, batch in plan:
        name = TAMING_NAMES[mode]
        if elapsed() > args.budget_s + 40:
            table.row(op, batch, name, None, note=f"skipped: past --budget-s {args.budget_s:g} + 40")
            continue
        try:
            variant = TorchVariant(mode, reference, device, inputs["encode_host"], latents)
            prepared = variant.prepare(op, batch)
            seconds, out = time_calls(prepared.call, prepared.sync, 1 if mode == "fp32" else
                                      args.warmup, 1 if mode == "fp32" else args.repeats)
            outputs[(name, op, batch)] = (prepared.to_numpy(out)[0] if op == "encode"
                                          else prepared.to_numpy(out)[0][:4])
            del out, prepared
            variant.finish()
            table.row(op, batch, name, batch / seconds)
        except Exception as error:  # noqa: BLE001
            table.row(op, batch, name, None, note=f"failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:160]}")


def _tiny(family: str) -> VQGANConfig:
    """The tiny config in `family`'s shape (MaskGIT: no attention; Open-MAGVIT2: 2^z codes)."""
    if family == "open_magvit2":
        return TINY.replace(family=family, attn_resolutions=(), z_channels=10, embed_dim=10,
                            n_embed=2**10)
    if family == "maskgit":  # no attention, embed_dim == z_channels
        return TINY.replace(family=family, attn_resolutions=(), value_range=(0.0, 1.0))
    return TINY.replace(family=family)


def family_rows(args) -> None:
    """Each tokenizer family's published architecture (benchmarks/families.py), model only,
    our random init: encode (quantizer included) and decode, bf16 and f32 default, first batch."""
    from families import BENCHES

    from vqgan_datasets.models.modeling import init_params

    batch = args.batches[0]
    say(f"\n### Tokenizer families, model only, batch {batch}\n")
    table = Table(args.peak_tflops, None)
    for name, bench in BENCHES.items():
        try:
            config = (_tiny(name) if args.tiny else bench.config(argparse.Namespace(ch=None)))
            params = jax.device_put(init_params(config, args.seed))
            size = config.resolution
            grid = config.grid_shape(size)
            pixels = to_model_range(synthetic_images(batch, size, args.seed))
            latents = np.random.default_rng(args.seed).normal(
                0, 1, (batch, *grid, config.embed_dim)).astype(np.float32)
            inputs = {"encode": jax.device_put(pixels), "decode": jax.device_put(latents)}
        except Exception as error:  # noqa: BLE001 - report and go on to the next family
            say(f"| - | {batch} | {name} | - | - | - | - | failed: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:160]} |")
            continue
        for dtype in (jnp.bfloat16, jnp.float32):
            impl = ours(config, dtype)
            impl.name = f"{name} {impl.name.removeprefix('ours ')}"
            for op in ("encode", "decode"):
                if elapsed() > args.budget_s + 60:
                    table.row(op, batch, impl.name, None, note="skipped: past --budget-s + 60")
                    continue
                try:
                    speed, compile_s, _ = run_jax(impl, op, batch, params, inputs, args)
                    table.row(op, batch, impl.name, speed, compile_s)
                except Exception as error:  # noqa: BLE001
                    table.row(op, batch, impl.name, None, note=f"failed: {type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160]}")


def agreement(outputs: dict, batch: int) -> None:
    say(f"\n### Token agreement (batch {batch}, the same images)\n")
    say("| implementation | against | tokens equal |")
    say("|---|---|---:|")
    tokens = {name: out for (name, op, b), out in outputs.items() if op == "encode" and b == batch}
    taming_fp32, highest = TAMING_NAMES["fp32"], "ours f32 highest"
    pairs = [(highest, taming_fp32)]
    if taming_fp32 not in tokens:
        say(f"| {highest} | {taming_fp32} | - (no taming row) |")
    pairs += [(name, highest) for name in tokens if name not in (highest, taming_fp32)]
    for name, other in pairs:
        if name in tokens and other in tokens:
            value = (tokens[name] == tokens[other].reshape(tokens[name].shape)).mean()
            say(f"| {name} | {other} | {100 * value:.2f}% |")
    decoded = {name: out for (name, op, b), out in outputs.items() if op == "decode" and b == batch}
    if "ours f32 default" in decoded and "vqgan-jax f32 default" in decoded:
        diff = np.abs(decoded["ours f32 default"] - decoded["vqgan-jax f32 default"]).max()
        say(f"\ndecode, ours f32 default vs vqgan-jax f32 default: max |diff| {diff:.2e} "
            "(4 images, TF32 both)")


# ---------------------------------------------------------------------------------------------
# End to end: JPEG bytes -> tokens


def make_jpegs(count: int, distinct: int, seed_value: int) -> list[bytes]:
    """`count` JPEGs (q=90) 400-1100 px on the long side from scikit-image's photos (`distinct`
    different ones, cycled)."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed_value)
    bases = [Image.fromarray(getattr(data, n)()[..., :3]) for n in
             ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")]
    out = []
    for i in range(distinct):
        base = bases[i % len(bases)]
        long_side = int(rng.integers(400, 1101))
        aspect = float(rng.choice([0.75, 1.0, 4 / 3]))
        size = (long_side, round(long_side * aspect)) if aspect < 1 else (round(long_side / aspect), long_side)
        image = base.resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return [out[i % distinct] for i in range(count)]


def e2e_row(name: str, count: int, work: Callable[[], object], warm: Callable[[], object] | None) -> object:
    """Run `warm` (compiles, starts workers), then time `work`; print the row or the error."""
    try:
        if warm is not None:
            warm()
        start = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - start
        say(f"| {name} | {count} | {count / seconds:,.0f} | {seconds:.1f} |")
        return result
    except Exception as error:  # noqa: BLE001 - another helper's API may differ: say so, go on
        message = str(error).splitlines()[0][:200] if str(error) else ""
        say(f"| {name} | {count} | - | - | failed: {type(error).__name__}: {message}")
        return None


def e2e_rows(args, config, params) -> None:
    from vqgan_datasets.models.modeling import VQModel

    model = VQModel(config, params, dtype=jnp.dtype(args.e2e_dtype))
    size = args.image_size
    jpegs = make_jpegs(args.e2e_images, min(64, args.e2e_images), args.seed)
    warm_items = jpegs[: 2 * args.batches[0]]
    say(f"\n### End to end: {len(jpegs)} JPEGs (400-1100 px) -> tokens, ours {args.e2e_dtype}, "
        f"{os.cpu_count()} host cores\n")
    say("| path | images | images/s | seconds |")
    say("|---|---:|---:|---:|")
    tokens = {}
    for mode in ("exact", "fast"):
        tokens[mode] = engine_row(model, jpegs, warm_items, size, mode, args.e2e_engine_workers)
    tokens["map"] = map_row(model, jpegs, warm_items, size, args.batches[0])
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, blob in enumerate(jpegs):
            path = Path(tmp) / f"{i:06d}.jpg"
            path.write_bytes(blob)
            paths.append(str(path))
        p_encode = jax.pmap(lambda b: model.encode(b)[1])
        for workers in args.e2e_loader_workers:
            run = functools.partial(seed_style, p_encode, size, workers, args.batches[0])
            e2e_row(f"model-card script: torch DataLoader(num_workers={workers}) + pmap, uint8",
                    len(paths), lambda run=run: run(paths), lambda run=run: run(paths[:2 * args.batches[0]]))
    if tokens.get("exact") is not None:
        for other in ("fast", "map"):
            if tokens.get(other) is not None and tokens[other].shape == tokens["exact"].shape:
                equal = (tokens[other] == tokens["exact"]).mean()
                say(f"\ntokens, {other} vs exact: {100 * equal:.2f}% equal")


def engine_row(model, jpegs, warm_items, size: int, mode: str, workers: int | None):
    """Our Engine with the agreed keywords (workers=, preprocess=): one engine, warmed first."""
    name = f"Engine(workers={workers}).encode_iter(preprocess={mode!r})"
    try:
        from vqgan_datasets import Engine

        engine = Engine(model, workers=workers)
    except Exception as error:  # noqa: BLE001
        return e2e_row(name, len(jpegs), functools.partial(_raise, error), None)

    def run(items):
        results = engine.encode_iter(items, image_size=size, preprocess=mode)
        return np.stack([result.tokens for result in results])

    try:
        return e2e_row(name, len(jpegs), lambda: run(jpegs), lambda: run(warm_items))
    finally:
        engine.close()


def map_row(model, jpegs, warm_items, size: int, batch_size: int):
    """`datasets` map over an Image(decode=False) column with our tokenizer (one instance)."""
    def run(items):
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in items]})
        ds = ds.cast_column("image", datasets.Image(decode=False))
        out = ds.map(tokenizer[0], batched=True, batch_size=batch_size, remove_columns=["image"])
        return np.asarray(out.with_format("numpy")["vqgan_tokens"])

    tokenizer = []
    try:
        from vqgan_datasets import VQGANTokenizer

        tokenizer.append(VQGANTokenizer(model=model, image_size=size))
    except Exception as error:  # noqa: BLE001
        return e2e_row("datasets map", len(jpegs), functools.partial(_raise, error), None)
    return e2e_row("datasets map(VQGANTokenizer, batched=True), Image(decode=False)", len(jpegs),
                   lambda: run(jpegs), lambda: run(warm_items))


def _raise(error: Exception) -> None:
    raise error


def seed_style(p_encode, size: int, workers: int, batch_size: int, paths: list[str]) -> int:
    """The model card's pmap HowTo pipeline (written anew): a torch Dataset of paths, PIL
    loading, LANCZOS resize of the short side and a centre crop with torchvision, a DataLoader,
    pmap(encode) on uint8 pixels (unscaled, as the HowTo), tokens formatted as text lines."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import InterpolationMode

    class Photos(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as image:
                image = image.convert("RGB")
            scale = size / min(image.size)
            image = TF.resize(image, [round(scale * image.size[1]), round(scale * image.size[0])],
                              interpolation=InterpolationMode.LANCZOS)
            return np.asarray(TF.center_crop(image, [size, size]))

    devices = jax.local_device_count()
    loader = DataLoader(Photos(), batch_size=batch_size, num_workers=workers,
                        timeout=300 if workers else 0, drop_last=True)
    lines = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our uint8 warning: the HowTo scales nothing
        group = []
        for batch in loader:
            group.append(batch.numpy())
            if len(group) == devices:
                codes = np.asarray(p_encode(np.stack(group)))
                lines += len([",".join(map(str, row)) for row in codes.reshape(-1, codes.shape[-1])])
                group = []
    return lines


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vqgan-jax", metavar="DIR", help="a vqgan-jax checkout (git-ignored, "
                        "e.g. third_party/vqgan-jax); its row is skipped without it")
    parser.add_argument("--batches", default="128,256")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=790.0,
                        help="dense bf16 peak for MFU (default 790: H100/H200 SXM, measured ~798)")
    parser.add_argument("--f32-all-batches", action="store_true",
                        help="float32 rows at every batch (default: the first batch only)")
    parser.add_argument("--skip-taming", action="store_true")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="start no model row after this many seconds (the model part then "
                        "ends within about 4 minutes)")
    parser.add_argument("--e2e", action="store_true", help="also time JPEG bytes -> tokens")
    parser.add_argument("--families", action="store_true",
                        help="also time each tokenizer family's model (benchmarks/families.py)")
    parser.add_argument("--e2e-images", type=int, default=1024)
    parser.add_argument("--e2e-dtype", default="float32")
    parser.add_argument("--e2e-engine-workers", type=int, default=None,
                        help="Engine's preprocessing processes (default: its own choice)")
    parser.add_argument("--e2e-loader-workers", default="4,15")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny config, 32x32 images, batches 2,4: runs on CPU in a minute")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.batches, args.warmup, args.repeats = "2,4", 1, 2
        args.e2e_images, args.e2e_loader_workers = 16, "0,2"
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.e2e_loader_workers = [int(w) for w in str(args.e2e_loader_workers).split(",") if w]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    config = TINY if args.tiny else f16_16384()
    args.image_size = config.resolution
    flops = None if args.tiny else FLOPS_PER_IMAGE
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    say(f"## GPU check: VQGAN {'tiny' if args.tiny else 'f16-16384'} at {args.image_size}², "
        f"{jax.default_backend()} ({devices}), {datetime.date.today()}")
    say(f"jax {jax.__version__}; batches {args.batches}; {args.repeats} timed calls after "
        f"{args.warmup}; MFU against {args.peak_tflops:g} TFLOP/s"
        + (" (taming's FLOPs: encode 140.6 G, decode 252.7 G per image)" if flops else ""))

    with_torch = not args.skip_taming
    if with_torch:
        try:
            import taming.modules.diffusionmodules.model  # noqa: F401
            import torch  # noqa: F401
        except ImportError as error:
            say(f"(taming rows skipped: {error})")
            with_torch = False
    images = synthetic_images(max(args.batches), args.image_size, args.seed)
    pixels = to_model_range(images)
    reference, params = shared_weights(config, pixels[:2], args.seed, with_torch)
    codebook = params["quantize"]["embedding"]["embedding"]
    grid = config.grid_shape(args.image_size)
    codes = np.random.default_rng(args.seed).integers(0, config.n_embed, (max(args.batches), *grid))
    latents = codebook[codes].astype(np.float32)
    inputs = {"encode": jax.device_put(pixels), "decode": jax.device_put(latents),
              "encode_host": pixels, "decode_host": latents}
    params = jax.device_put(params)
    say(f"weights and inputs ready at {elapsed():.0f}s "
        f"({'taming init' if with_torch else 'our init'}, seed {args.seed})\n")

    impls = [ours(config, jnp.bfloat16), ours(config, jnp.float32)]
    if args.vqgan_jax:
        try:
            seed_modules = load_seed_modules(args.vqgan_jax)
            impls = [seed(seed_modules, config, jnp.bfloat16), impls[0],
                     seed(seed_modules, config, jnp.float32), impls[1]]
        except Exception as error:  # noqa: BLE001
            say(f"(vqgan-jax rows skipped: {type(error).__name__}: {error})")
    else:
        say("(vqgan-jax rows skipped: pass --vqgan-jax DIR, a checkout of its public source)")
    impls.append(ours(config, jnp.float32, "highest"))

    outputs: dict = {}
    table = Table(args.peak_tflops, flops)
    model_rows(args, config, params, inputs, impls, table, outputs)
    if with_torch:
        taming_rows(args, reference, inputs, table, outputs)
    agreement(outputs, args.batches[0])
    if args.families:
        family_rows(args)
    say(f"\nmodel rows done at {elapsed():.0f}s")
    if args.e2e:
        e2e_rows(args, config, jax.device_get(params))
        say(f"\nall done at {elapsed():.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
