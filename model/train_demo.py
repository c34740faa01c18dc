"""Train the demo VQGAN installed with the package (vqgan_datasets/_demo/model) on CPU from the
photos that pip packages ship.

A small f8 VQGAN of the project's own architecture (`vqgan_datasets.models.modeling`), trained with
L2 + L1 reconstruction, codebook and commitment losses (straight-through estimator) and dead-code
re-seeding. No perceptual or adversarial loss: both need downloaded weights or far more compute.
It is a demo for offline quickstarts and tests, not a tokenizer for real use.

    python model/train_demo.py --out vqgan_datasets/_demo/model --card-dir model/demo --card \
        --minutes 28                                          # the committed checkpoint
    python model/train_demo.py --tiny --steps 3 --out /tmp/x  # a smoke run in seconds

--out gets config.json and model.safetensors (the package data); --card-dir gets
train_stats.json and, with --card, the model card README.md (model/demo/README.md records what
the committed checkpoint was trained on and what it measures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("train_demo")

try:  # run as `python model/train_demo.py` from a checkout without `pip install -e .`
    import vqgan_datasets.models.modeling  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Held out from training, used only to measure reconstruction: two scikit-image photos, so the
# held-out check needs nothing beyond the test extra. (`skimage.data.cat` is the same photo as
# `chelsea`, so it is never used.)
HELDOUT_PHOTOS = ("chelsea", "coffee")
# Colour photos from scikit-image; `stereo_motorcycle` gives two views of one scene.
TRAIN_COLOR_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry",
                      "retina", "stereo_motorcycle")
# Grayscale photos and textures, used as gray RGB: more structure to learn from.
TRAIN_GRAY_PHOTOS = ("camera", "coins", "clock", "brick", "grass", "gravel")
# scikit-learn's two sample photos, when scikit-learn is installed.
TRAIN_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that determines a training run (recorded in train_stats.json)."""

    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)
    num_res_blocks: int = 0
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 32
    n_embed: int = 512
    norm_groups: int = 8
    resolution: int = 256
    crop: int = 64
    batch_size: int = 16
    steps: int = 500
    lr: float = 1e-3
    warmup_steps: int = 50
    l1_weight: float = 0.5
    beta: float = 0.25
    dead_window: int = 50
    seed: int = 0
    minutes: float | None = None

    @classmethod
    def tiny(cls, **changes) -> Settings:
        """A model that compiles and steps in seconds (for tests)."""
        base = dict(ch=32, ch_mult=(1, 2), z_channels=8, n_embed=16, resolution=32, crop=16,
                    batch_size=2, steps=3, warmup_steps=1, dead_window=2)
        base.update(changes)
        return cls(**base)

    def model_config(self):
        from vqgan_datasets.models.config import VQGANConfig

        return VQGANConfig(
            ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
            attn_resolutions=self.attn_resolutions, resolution=self.resolution,
            z_channels=self.z_channels, embed_dim=self.z_channels, n_embed=self.n_embed,
            norm_groups=self.norm_groups, dropout=0.0, value_range=(-1.0, 1.0),
        )


# ---------------------------------------------------------------------------------------------
# Data: photos, random scaled crops, and the evaluation view.


def load_photos(names: Sequence[str]) -> list[np.ndarray]:
    """scikit-image photos by name as uint8 RGB arrays (grayscale ones repeated to RGB)."""
    return [image for _, image in named_photos(names)]


def named_photos(names: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    from skimage import data

    photos = []
    for name in names:
        image = getattr(data, name)()
        views = {"_left": image[0], "_right": image[1]} if isinstance(image, tuple) else {"": image}
        for suffix, view in views.items():
            view = np.asarray(view, dtype=np.uint8)
            if view.ndim == 2:
                view = np.repeat(view[..., None], 3, axis=-1)
            photos.append((name + suffix, np.ascontiguousarray(view[..., :3])))
    return photos


def named_sklearn_photos(names: Sequence[str] = TRAIN_SKLEARN_PHOTOS):
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        logger.warning("scikit-learn is not installed: training without %s", list(names))
        return []
    return [(name, np.asarray(load_sample_image(name), dtype=np.uint8)) for name in names]


def training_set(with_sklearn: bool = True) -> tuple[list[tuple[str, np.ndarray]], int]:
    """(name, photo) pairs to train on, and how many of them (the first ones) are colour."""
    color = named_photos(TRAIN_COLOR_PHOTOS)
    if with_sklearn:
        color += named_sklearn_photos()
    return color + named_photos(TRAIN_GRAY_PHOTOS), len(color)


def training_photos(with_sklearn: bool = True) -> list[np.ndarray]:
    return [image for _, image in training_set(with_sklearn)[0]]


def eval_view(image: np.ndarray, size: int) -> np.ndarray:
    """The project's preprocessing: shortest side to `size` with LANCZOS, centre crop, uint8."""
    pil = Image.fromarray(image)
    width, height = pil.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    pil = pil.resize(new, Image.LANCZOS)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8)


def random_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
    """A square region whose side is log-uniform between `size` (1:1 pixels) and the whole
    shortest side, resized to `size`, flipped left-right half the time."""
    height, width = image.shape[:2]
    short = min(height, width)
    side = int(round(math.exp(rng.uniform(math.log(size), math.log(max(size, short))))))
    side = min(side, short)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    patch = image[top:top + side, left:left + side]
    if side != size:
        patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC,
                                                          reducing_gap=2.0))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return patch


def batches(photos: Sequence[np.ndarray], size: int, batch_size: int, seed: int):
    """An endless, seeded stream of uint8 [B,size,size,3] batches of random crops."""
    rng = np.random.default_rng(seed)
    while True:
        picks = rng.integers(0, len(photos), batch_size)
        yield np.stack([random_crop(rng, photos[i], size) for i in picks])


# ---------------------------------------------------------------------------------------------
# Training: losses, dead-code re-seeding, the jitted step.


def reseed_dead_codes(codebook, last_used, step, latents, key, window: int):
    """Reset the codes unused for `window` steps to random rows of `latents` (recent encoder
    outputs). Pure: returns (codebook, last_used, number reset); reset codes count as used now.

    codebook [K,D], last_used [K] int (step each code was last chosen), latents [N,D].
    """
    import jax
    import jax.numpy as jnp

    dead = (step - last_used) >= window
    count = latents.shape[0]
    if count >= codebook.shape[0]:
        rows = jax.random.permutation(key, count)[: codebook.shape[0]]
    else:
        rows = jax.random.randint(key, (codebook.shape[0],), 0, count)
    fresh = latents[rows].astype(codebook.dtype)
    codebook = jnp.where(dead[:, None], fresh, codebook)
    last_used = jnp.where(dead, step, last_used)
    return codebook, last_used, jnp.sum(dead)


def make_train_step(module, optimizer, settings: Settings):
    import jax
    import jax.numpy as jnp
    import optax

    from vqgan_datasets.models.modeling import VQGAN, nearest_codes, to_model_range

    value_range = (-1.0, 1.0)

    def loss_fn(params, pixels):
        codebook = params["quantize"]["embedding"]["embedding"]
        z = module.apply({"params": params}, pixels, method=VQGAN.encode_latents)
        flat = z.reshape(-1, z.shape[-1])
        indices = nearest_codes(flat, codebook)
        quantized = codebook[indices].reshape(z.shape)
        # Straight-through: the decoder sees the codes, the encoder gets the decoder's gradient.
        straight = z + jax.lax.stop_gradient(quantized - z)
        recon = module.apply({"params": params}, straight, method=VQGAN.decode)
        error = recon - pixels
        mse = jnp.mean(error**2)
        l1 = jnp.mean(jnp.abs(error))
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z) - quantized) ** 2)
        commitment = jnp.mean((z - jax.lax.stop_gradient(quantized)) ** 2)
        loss = mse + settings.l1_weight * l1 + codebook_loss + settings.beta * commitment
        return loss, {"loss": loss, "mse": mse, "indices": indices, "latents": flat}

    def step_fn(params, opt_state, last_used, step, images, key):
        pixels = to_model_range(images, value_range)
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, pixels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        used = jnp.zeros_like(last_used, dtype=bool).at[aux["indices"]].set(True)
        last_used = jnp.where(used, step, last_used)
        codebook, last_used, reset = reseed_dead_codes(
            params["quantize"]["embedding"]["embedding"], last_used, step,
            jax.lax.stop_gradient(aux["latents"]), key, settings.dead_window,
        )
        params = {**params, "quantize": {"embedding": {"embedding": codebook}}}
        stats = {"loss": aux["loss"], "mse": aux["mse"], "reset": reset,
                 "used": jnp.sum(used)}
        return params, opt_state, last_used, stats

    return jax.jit(step_fn, donate_argnums=(0, 1, 2))


def make_optimizer(settings: Settings):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, max(1, settings.warmup_steps), max(2, settings.steps),
        end_value=settings.lr * 0.05,
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


@dataclasses.dataclass
class Result:
    params: dict
    losses: list[float]
    steps: int
    seconds: float


def train(settings: Settings, photos: Sequence[np.ndarray] | None = None,
          progress: bool = True) -> Result:
    """Train from scratch; deterministic for a given `settings.seed` (stops early at `minutes`)."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from vqgan_datasets.models.modeling import init_params, module_from_config

    config = settings.model_config()
    module = module_from_config(config)
    photos = training_photos() if photos is None else photos
    params = jax.tree_util.tree_map(jnp.asarray, init_params(config, settings.seed))
    optimizer = make_optimizer(settings)
    opt_state = optimizer.init(params)
    # Every code starts dead, so the first step seeds the codebook from encoder outputs.
    last_used = jnp.full((config.n_embed,), -settings.dead_window, jnp.int32)
    step_fn = make_train_step(module, optimizer, settings)
    key = jax.random.PRNGKey(settings.seed)
    stream = batches(photos, settings.crop, settings.batch_size, settings.seed)
    deadline = None if settings.minutes is None else time.monotonic() + 60 * settings.minutes

    losses: list[float] = []
    start = time.monotonic()
    bar = tqdm(range(settings.steps), file=sys.stderr, disable=not progress, unit="step",
               mininterval=5.0)
    done = 0
    for step in bar:
        key, sub = jax.random.split(key)
        params, opt_state, last_used, stats = step_fn(
            params, opt_state, last_used, jnp.int32(step), next(stream), sub)
        done = step + 1
        out_of_time = deadline is not None and time.monotonic() > deadline
        if step % 25 == 0 or done == settings.steps or out_of_time:
            stats = jax.device_get(stats)
            losses.append(float(stats["loss"]))
            psnr = 10 * math.log10(4.0 / max(float(stats["mse"]), 1e-12))
            bar.set_postfix(loss=f"{stats['loss']:.4f}", psnr=f"{psnr:.1f}",
                            used=int(stats["used"]), reset=int(stats["reset"]), refresh=False)
        if out_of_time:
            logger.warning("time budget of %.1f min reached after %d steps", settings.minutes,
                           done)
            break
    bar.close()
    params = jax.device_get(params)
    return Result(params=params, losses=losses, steps=done, seconds=time.monotonic() - start)


# ---------------------------------------------------------------------------------------------
# Evaluation through the public uint8 API.


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def evaluate(model, photos: Sequence[np.ndarray], size: int | None = None) -> dict:
    """Mean per-image PSNR of encode_images → decode_images, and the codes those images use."""
    size = size or model.config.resolution
    images = np.stack([eval_view(p, size) for p in photos])
    codes = model.encode_images(images)
    recon = model.decode_images(codes)
    scores = [psnr(a, b) for a, b in zip(images, recon, strict=True)]
    return {"psnr": float(np.mean(scores)), "psnr_each": scores, "codes": codes}


def codebook_usage(codes: np.ndarray, n_embed: int) -> dict:
    counts = np.bincount(codes.ravel(), minlength=n_embed)
    p = counts[counts > 0] / counts.sum()
    return {"used": int((counts > 0).sum()), "fraction": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())), "tokens": int(counts.sum())}


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="vqgan_datasets/_demo/model",
                        help="checkpoint directory to write (config.json, model.safetensors)")
    parser.add_argument("--card-dir", help="where train_stats.json and the card go "
                        "(default: --out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop early after this much training time (breaks determinism)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for smoke tests")
    parser.add_argument("--ch", type=int)
    parser.add_argument("--ch-mult", type=lambda s: tuple(int(v) for v in s.split(",")))
    parser.add_argument("--num-res-blocks", type=int)
    parser.add_argument("--attn-resolutions",
                        type=lambda s: tuple(int(v) for v in s.split(",") if v))
    parser.add_argument("--z-channels", type=int)
    parser.add_argument("--n-embed", type=int)
    parser.add_argument("--norm-groups", type=int)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--no-sklearn", action="store_true",
                        help="leave out scikit-learn's photos even when it is installed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--card", action="store_true", help="also write the model card README.md")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    changes = {name: getattr(args, name) for name in (
        "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "n_embed",
        "norm_groups", "resolution", "crop", "batch_size", "lr", "steps", "minutes",
    ) if getattr(args, name) is not None}
    changes["seed"] = args.seed
    return Settings.tiny(**changes) if args.tiny else Settings(**changes)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import jax

    jax.config.update("jax_platforms", "cpu")
    from vqgan_datasets.models.modeling import VQModel

    settings = settings_from_args(args)
    named, n_color = training_set(with_sklearn=not args.no_sklearn)
    photos = [image for _, image in named]
    logger.info("training on %d photos; %s", len(photos), settings)
    result = train(settings, photos, progress=not args.quiet)
    logger.info("%d steps in %.0f s (%.2f steps/s)", result.steps, result.seconds,
                result.steps / result.seconds)

    config = settings.model_config()
    model = VQModel(config, result.params)
    out = Path(args.out)
    model.save_pretrained(str(out), formats=("safetensors",))  # one weights file in the wheel
    train_eval = evaluate(model, photos[:n_color])
    held = evaluate(model, load_photos(HELDOUT_PHOTOS))
    usage_held = codebook_usage(held["codes"], config.n_embed)
    usage_all = codebook_usage(np.concatenate([train_eval["codes"], held["codes"]]),
                               config.n_embed)
    stats = {
        "psnr_train": train_eval["psnr"],
        "psnr_heldout": held["psnr"],
        "psnr_train_each": dict(zip([n for n, _ in named[:n_color]], train_eval["psnr_each"],
                                    strict=True)),
        "psnr_heldout_each": dict(zip(HELDOUT_PHOTOS, held["psnr_each"], strict=True)),
        "eval_resolution": config.resolution,
        "codebook_usage_heldout": usage_held,
        "codebook_usage_all_eval": usage_all,
        "train_photos": [n for n, _ in named],
        "heldout_photos": list(HELDOUT_PHOTOS),
        "params": sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(result.params)),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "final_loss": result.losses[-1],
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "hardware": _hardware(),
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
    }
    stats["command"] = " ".join(["python model/train_demo.py", *(sys.argv[1:] if argv is None
                                                                 else argv)])
    card_dir = Path(args.card_dir) if args.card_dir else out
    card_dir.mkdir(parents=True, exist_ok=True)
    (card_dir / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n",
                                               encoding="utf-8")
    if args.card:
        (card_dir / "README.md").write_text(model_card(stats, out), encoding="utf-8")
    logger.info("PSNR train %.2f dB, held-out %.2f dB; held-out codes %d/%d, perplexity %.1f",
                stats["psnr_train"], stats["psnr_heldout"], usage_held["used"], config.n_embed,
                usage_held["perplexity"])
    return stats


def model_card(stats: dict, out: Path) -> str:
    """The demo's README.md, filled in from its train_stats.json."""
    s = stats["settings"]
    size_mb = sum(f.stat().st_size for f in out.iterdir()
                  if f.name in ("config.json", "model.safetensors")) / 2**20
    usage_h, usage_a = stats["codebook_usage_heldout"], stats["codebook_usage_all_eval"]
    each = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
    grid = s["resolution"] // 2 ** (len(s["ch_mult"]) - 1)
    skimage_names = [n for n in stats["train_photos"] if n not in TRAIN_SKLEARN_PHOTOS]
    sklearn_names = [n for n in stats["train_photos"] if n in TRAIN_SKLEARN_PHOTOS]
    sklearn_text = f" and scikit-learn's {' and '.join(sklearn_names)}" if sklearn_names else ""
    kmeans_text = (
        "The demo's decoder sees neighbouring tokens, yet after a few minutes of CPU training "
        "it is still below that: it has learned colours and coarse structure, and textures "
        "come out blurred." if stats["psnr_heldout"] < 22.1 else
        "The demo is above that, since its decoder also sees the neighbouring tokens; "
        "textures still come out blurred.")
    stopped = (f" (the --minutes budget stopped it before the {s['steps']} scheduled steps, so "
               "a rerun may stop at a different step)" if stats["steps"] < s["steps"] else "")
    return f"""# vqgan-datasets demo VQGAN (f{2 ** (len(s["ch_mult"]) - 1)}, {s["n_embed"]} codes)

**A demo, not for real use.** This checkpoint exists so that the quickstart, the examples and the
tests run offline, with no download. It was trained for {stats["seconds"] / 60:.0f} minutes on a
small shared CPU from {len(stats["train_photos"])} photos; its reconstructions are blurry and
its tokens mean nothing to any other model. For real work use a real VQGAN such as
`flax-community/vqgan_f16_16384`.

## Architecture

Our Flax VQGAN (`vqgan_datasets.models.modeling.VQGAN`, taming-transformers' layout), installed
with the package (`vqgan_datasets/_demo/model`) and loaded with
`VQModel.from_pretrained(DEMO_MODEL)` after `from vqgan_datasets.jobs.demo import DEMO_MODEL`:

| field | value |
|---|---|
| ch, ch_mult | {s["ch"]}, {tuple(s["ch_mult"])} (downsample factor {2 ** (len(s["ch_mult"]) - 1)}) |
| num_res_blocks, attn_resolutions | {s["num_res_blocks"]}, {tuple(s["attn_resolutions"])} (the mid block's attention only) |
| z_channels = embed_dim, n_embed | {s["z_channels"]}, {s["n_embed"]} |
| norm_groups | {s["norm_groups"]} (taming uses 32 with ch=128, i.e. 4 channels per group; so does this) |
| resolution | {s["resolution"]} → a {grid}×{grid} token grid |
| value_range | [-1, 1] (pixels x/127.5 − 1, as taming) |
| parameters | {stats["params"]:,} ({size_mb:.1f} MB for config.json + model.safetensors) |

## Training

- Photos that pip packages ship, so the run needs no network: scikit-image's
  {", ".join(skimage_names)} (grayscale ones as gray RGB){sklearn_text}
  ({len(stats["train_photos"])} in all).
- Held out, never trained on: scikit-image's {" and ".join(stats["heldout_photos"])}
  (`skimage.data.cat` is the same photo as chelsea and is not used either).
- Augmentation: square crops whose side is log-uniform between {s["crop"]} pixels and the
  photo's shortest side, resized to {s["crop"]}×{s["crop"]} (bicubic), flipped left-right half
  the time; batches of {s["batch_size"]}.
- Loss: MSE + {s["l1_weight"]}·L1 reconstruction, codebook loss, and commitment loss with
  β = {s["beta"]}, straight-through estimator; no perceptual or adversarial loss (both need
  downloaded weights).
- Dead codes: a code unused for {s["dead_window"]} steps is reset to a random encoder output of
  the current batch (also how the codebook is initialised, at step 0).
- Adam, learning rate {s["lr"]:g} (warm-up {s["warmup_steps"]} steps, cosine decay to 5%),
  gradient clipping at norm 1; {stats["steps"]} steps{stopped} in {stats["seconds"] / 60:.1f} minutes
  on {stats["hardware"]}, shared with other jobs; jax {stats["versions"]["jax"]}; seed
  {stats["seed"]}.

Reproduce (from the repository root, about {stats["seconds"] / 60:.0f} minutes on such a CPU; the
same seed gives the same weights on the same machine and library versions):

```
{stats["command"]}
```

## Measured

Through the public uint8 path, `VQModel.encode_images` → `decode_images`, on each photo
resized (shortest side to {stats["eval_resolution"]}, LANCZOS) and centre-cropped to
{stats["eval_resolution"]}×{stats["eval_resolution"]}; PSNR is the mean of per-photo PSNRs (dB).

| photos | PSNR |
|---|---|
| held out ({" and ".join(stats["heldout_photos"])}) | **{stats["psnr_heldout"]:.2f}** ({each(stats["psnr_heldout_each"])}) |
| training, the {len(stats["psnr_train_each"])} colour ones | {stats["psnr_train"]:.2f} |

Per training photo: {each(stats["psnr_train_each"])}.

Codebook usage: the held-out photos use {usage_h["used"]} of {s["n_embed"]} codes
({usage_h["fraction"]:.0%}; perplexity {usage_h["perplexity"]:.0f} over {usage_h["tokens"]}
tokens); all evaluated photos together use {usage_a["used"]} ({usage_a["fraction"]:.0%};
perplexity {usage_a["perplexity"]:.0f} over {usage_a["tokens"]} tokens).

For scale: replacing each 8×8 patch of the two held-out photos by the nearest of 512
k-means centroids (fitted on 8×8 patches of 2,048 random training crops) gives 23.4 (chelsea)
and 20.7 (coffee) dB, 22.1 on average, at 256×256. {kmeans_text}

`train_stats.json` holds these numbers; `tests/test_train_demo.py` checks that the held-out
PSNR still reaches the reported value minus 0.5 dB.
"""


def _hardware() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({model}), CPU only"


if __name__ == "__main__":
    main()
