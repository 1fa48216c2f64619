"""Train the tiny world from scratch: VAE, text encoder + UNet, and the two rewards.

    python -m shortft_core.tiny_world.build --out /tmp/tiny          # the shipped weights, ~70 min (one thread)
    python -m shortft_core.tiny_world.build --out /tmp/t2 --threads 2    # 48 min on an idle 2-core box
    python -m shortft_core distill --model tiny --out /tmp/sc --target teacher ...    # then the shortcut
    python -m shortft_core.tiny_world.build --out /tmp/tiny --add-shortcut /tmp/sc/shortcut.safetensors

The result is deterministic for a seed on a given CPU type and thread count (``--threads``, default 1): every
scene, noise draw and batch order comes from seeded generators, and torch runs in deterministic mode. All
weights are stored as fp16 safetensors (the 30 MiB budget); ``MANIFEST.json`` records their SHA-256 hashes.

Layout written to ``--out``:
    pipeline/   a diffusers StableDiffusionPipeline folder (tokenizer, text_encoder, unet, vae, scheduler)
    reward/     a transformers CLIPModel folder: the text-image alignment reward
    aesthetic_head.safetensors   LAION-layout MLP on the reward's image embedding (render cleanliness)
    shortcut.safetensors         the distilled 4-step shortcut LoRA (added after distillation, --add-shortcut)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..compat import prefixed_keys
from ..files import atomic_save, atomic_write_json, sha256_file
from ..schedule import SD15_SCHEDULER_CONFIG, NoiseSchedule, add_noise
from ..tokenizer import CLIP_MAX_LENGTH, load_clip_tokenizer, write_clip_tokenizer
from . import quality_property as qp
from . import scenes

log = logging.getLogger(__name__)

TEXT_DIM = 64


@dataclass
class BuildConfig:
    """Everything that determines the shipped weights."""

    seed: int = 0
    threads: int = 1  # one thread: bit-identical across runs and robust to a busy machine
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 6e-4
    unet_images: int = 60000
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    reward_steps: int = 2500
    reward_batch: int = 128
    reward_lr: float = 1e-3
    reward_split: str = "any"  # the reward knows every composition (like HPS/PickScore); the generator never
    aesthetic_weight: float = 0.05  # sees the held-out ones, which is what leaves alignment room on them


# ---------------------------------------------------------------------------------------------------------------
# architectures (SD1.5's component classes at toy width)
# ---------------------------------------------------------------------------------------------------------------
def text_encoder_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=TEXT_DIM,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu")


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=scenes.IMAGE_SIZE,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=scenes.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(48, 96, 96), cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=16,
    )


def make_reward_model():
    from transformers import CLIPConfig, CLIPModel

    text = text_encoder_config().to_dict()
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  image_size=scenes.IMAGE_SIZE, patch_size=4, projection_dim=TEXT_DIM, hidden_act="quick_gelu")
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT_DIM))


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def _images(seed: int, indices, split: str = "train") -> tuple[torch.Tensor, list[scenes.Scene]]:
    arr, sc = scenes.scene_batch(seed, indices, split)
    return scenes.to_float(arr), sc


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


class _Progress:
    """One tqdm bar across all phases, or plain log lines when tqdm is unavailable."""

    def __init__(self, total: int, enabled: bool = True, log_every: int = 250) -> None:
        self.bar = None
        self.count = 0
        self.log_every = log_every
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def phase(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_description(name)
        log.info("phase: %s", name)

    def step(self, **metrics: float) -> None:
        self.count += 1
        if self.count % self.log_every == 0 and metrics:
            log.info("step %d: %s", self.count, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------------------------
def train_vae(cfg: BuildConfig, progress: _Progress):
    """Autoencoder: L1 + L2 reconstruction with a tiny KL term (as SD's VAE: near-deterministic latents)."""
    progress.phase("vae")
    torch.manual_seed(scenes.hash_seed(cfg.seed, 1))
    vae = make_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.vae_steps, 100))
    gen = torch.Generator().manual_seed(scenes.hash_seed(cfg.seed, 2))
    for step in range(cfg.vae_steps):
        x, _ = _images(cfg.seed + 1000, range(step * cfg.vae_batch, (step + 1) * cfg.vae_batch), "train")
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(gen)).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.step(loss=loss.item())
    vae.eval().requires_grad_(False)
    x, _ = _images(cfg.seed + 2000, range(512), "train")
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=round(scale, 5))
    log.info("vae scaling_factor %.5f", vae.config.scaling_factor)
    return vae


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def train_unet(cfg: BuildConfig, vae, tokenizer, progress: _Progress):
    """Text encoder + UNet trained together on eps-prediction with SD1.5's noise schedule (min-SNR weighting)."""
    import copy

    from transformers import CLIPTextModel

    progress.phase("encode")
    n = cfg.unet_images
    latents, captions = [], []
    with torch.no_grad():
        for start in range(0, n, 256):
            x, sc = _images(cfg.seed, range(start, min(n, start + 256)), "train")
            latents.append(vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor)
            captions += [s.caption for s in sc]
    latents = torch.cat(latents)
    ids = _tokenize(tokenizer, captions)
    empty_ids = _tokenize(tokenizer, [""])[0]

    progress.phase("unet")
    torch.manual_seed(scenes.hash_seed(cfg.seed, 3))
    unet = make_unet().train()
    text_encoder = CLIPTextModel(text_encoder_config()).train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.unet_steps, 200))
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    abar_all = schedule.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(scenes.hash_seed(cfg.seed, 4))
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        tok = ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        tok[drop] = empty_ids
        t = torch.randint(0, schedule.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        abar = abar_all[t]
        xt = add_noise(x0, noise, abar)
        hidden = text_encoder(tok).last_hidden_state
        pred = unet(xt, t, encoder_hidden_states=hidden).sample
        snr = abar / (1 - abar)
        weight = snr.clamp(max=cfg.min_snr_gamma) / snr
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        progress.step(loss=loss.item())
    return ema_unet.requires_grad_(False), ema_text.requires_grad_(False)


def train_reward(cfg: BuildConfig, tokenizer, progress: _Progress):
    """CLIP-style contrastive training with one hard-negative caption per image, plus the cleanliness head."""
    from ..rewards.aesthetic import AestheticMLP
    from ..rewards.clip import clip_features
    from ..rewards.preprocess import Preprocess

    progress.phase("reward")
    torch.manual_seed(scenes.hash_seed(cfg.seed, 5))
    model = make_reward_model().train()
    head = AestheticMLP(TEXT_DIM).train()
    prep = Preprocess(size=scenes.IMAGE_SIZE, interpolation="bilinear", crop=False)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.reward_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.reward_steps, 100))
    gen = torch.Generator().manual_seed(scenes.hash_seed(cfg.seed, 6))
    rng = np.random.default_rng(scenes.hash_seed(cfg.seed, 7))
    attrs = ("colour", "shape", "shape", "position", "position", "background")  # shape is the hardest to bind
    b = cfg.reward_batch
    for step in range(cfg.reward_steps):
        x, sc = _images(cfg.seed + 3000, range(step * b, (step + 1) * b), cfg.reward_split)
        strengths = qp.random_strengths(b, gen)
        x = qp.degrade(x, strengths, gen)
        hard = []
        for s in sc:
            options = [v for v in scenes.variants(s, attrs[int(rng.integers(len(attrs)))])]
            options = options or [v for a in attrs for v in scenes.variants(s, a)]
            hard.append(options[int(rng.integers(len(options)))].caption)
        tok = tokenizer([s.caption for s in sc] + hard, padding="longest", return_tensors="pt").input_ids
        img = F.normalize(clip_features(model.get_image_features(pixel_values=prep(x))), dim=-1)
        txt = F.normalize(clip_features(model.get_text_features(input_ids=tok)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T  # (b, 2b): own caption, other captions, hard negatives
        target = torch.arange(b)
        loss_clip = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target))
        loss_aes = F.mse_loss(head(img), qp.cleanliness(strengths))
        loss = loss_clip + cfg.aesthetic_weight * loss_aes
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        progress.step(clip=loss_clip.item(), aes=loss_aes.item())
    return model.eval().requires_grad_(False), head.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------
def _save_half(module, folder: Path) -> None:
    module.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    module.to(torch.float32)
    from transformers import CLIPTextModel

    if isinstance(module, CLIPTextModel):  # keys as every transformers version reads them
        prefixed_keys(str(folder / "model.safetensors"), "text_model.")


def save_world(out: Path, cfg: BuildConfig, vae, unet, text_encoder, reward_model, head,
               timings: dict[str, float]) -> dict:
    """Write the pipeline folder, the reward folder, the head and MANIFEST.json; return the manifest."""
    from safetensors.torch import save_file

    pipe = out / "pipeline"
    write_clip_tokenizer(pipe / "tokenizer")
    _save_half(text_encoder, pipe / "text_encoder")
    _save_half(unet, pipe / "unet")
    _save_half(vae, pipe / "vae")
    atomic_write_json(pipe / "scheduler" / "scheduler_config.json",
                      {**SD15_SCHEDULER_CONFIG, "_diffusers_version": _diffusers_version()})
    atomic_write_json(pipe / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    _save_half(reward_model, out / "reward")
    state = {k: v.to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    atomic_save(out / "aesthetic_head.safetensors",
                lambda p: save_file(state, p, metadata={"shortft": json.dumps(  # one key: byte-stable header
                    {"input_size": head.input_size, "property": "render cleanliness, 0..10"}, sort_keys=True)}))
    manifest = {"config": dataclasses.asdict(cfg), "torch": torch.__version__,
                "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    return _write_manifest(out, manifest)


def _write_manifest(out: Path, manifest: dict) -> dict:
    """Record every file's SHA-256 (hidden folders such as the phase cache excluded) and the weights' size."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.json"
                   and not any(part.startswith(".") for part in p.relative_to(out).parts))
    weights = [p for p in files if p.suffix == ".safetensors"]
    manifest = {**manifest, "weights_mib": round(sum(p.stat().st_size for p in weights) / 2**20, 2),
                "sha256": {str(p.relative_to(out)): sha256_file(p) for p in files}}
    atomic_write_json(out / "MANIFEST.json", manifest)
    return manifest


def add_shortcut(root: str | os.PathLike, shortcut: str | os.PathLike) -> dict:
    """Copy a distilled shortcut LoRA into a built world as ``shortcut.safetensors`` and re-hash the manifest.

    The file must be a ShortFT-distilled shortcut (its metadata records the edges and the distillation settings,
    which the manifest repeats so that the shipped world says how its shortcut was made)."""
    from ..lora_io import read_lora

    root, shortcut = Path(root), Path(shortcut)
    if not (root / "MANIFEST.json").is_file():
        raise FileNotFoundError(f"{root} is not a built tiny world (no MANIFEST.json); build it first with --out")
    _, meta = read_lora(shortcut)
    info = json.loads(meta.get("shortft", "{}") or "{}")
    if info.get("kind") != "shortcut":
        raise ValueError(f"{shortcut} is not a ShortFT-distilled shortcut (its metadata has no shortft kind "
                         "'shortcut'); make one with `python -m shortft_core distill --model tiny --out DIR`")
    atomic_save(root / "shortcut.safetensors", lambda tmp: shutil.copyfile(shortcut, tmp))
    manifest = json.loads((root / "MANIFEST.json").read_text())
    manifest["shortcut"] = {k: info[k] for k in sorted(info) if k != "kind"}
    return _write_manifest(root, manifest)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def build(out: str | os.PathLike, cfg: BuildConfig = BuildConfig(), overwrite: bool = False,
          progress: bool = True, resume: bool = False) -> dict:
    """Train every tiny-world model and write them to ``out``; returns the manifest.

    ``resume`` continues an interrupted build in ``out`` after its last finished phase; ``overwrite`` starts over.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if resume and (out / ".phases").is_dir():
            log.info("resuming the build in %s", out)
        elif not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its contents"
                                  + (" or --resume to continue the interrupted build" if (out / ".phases").is_dir() else ""))
        else:
            for sub in ("pipeline", "reward", ".phases"):
                shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)  # the thread count fixes the float summation order: part of the recipe
    torch.use_deterministic_algorithms(True)
    try:
        return _build_phases(out, cfg, progress)
    finally:  # leave the caller's process as it was
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build_phases(out: Path, cfg: BuildConfig, progress: bool) -> dict:
    """Tokenizer, the three training phases (each cached, so an interrupted build resumes) and the saved world."""
    tokenizer = load_clip_tokenizer(write_clip_tokenizer(out / "pipeline" / "tokenizer"))
    bar = _Progress(cfg.vae_steps + cfg.unet_steps + cfg.reward_steps, enabled=progress)
    timings: dict[str, float] = {}
    phases = _PhaseCache(out / ".phases", cfg)
    try:
        reward_model, head = phases.run("reward", lambda: train_reward(cfg, tokenizer, bar), timings,
                                        ("reward_", "seed"), make=lambda: (make_reward_model(), _aesthetic_head()))
        vae = phases.run("vae", lambda: (train_vae(cfg, bar),), timings, ("vae_", "seed"), make=lambda: (make_vae(),))[0]
        unet, text_encoder = phases.run("unet", lambda: train_unet(cfg, vae, tokenizer, bar), timings,
                                        ("unet_", "vae_", "seed", "caption_dropout", "min_snr_gamma", "ema_decay"),
                                        make=lambda: (make_unet(), _text_encoder()))
    finally:
        bar.close()
    manifest = save_world(out, cfg, vae, unet, text_encoder, reward_model, head, timings)
    shutil.rmtree(out / ".phases", ignore_errors=True)
    return manifest


def _aesthetic_head():
    from ..rewards.aesthetic import AestheticMLP

    return AestheticMLP(TEXT_DIM)


def _text_encoder():
    from transformers import CLIPTextModel

    return CLIPTextModel(text_encoder_config())


class _PhaseCache:
    """Finished phases are kept in ``out/.phases`` so an interrupted build resumes after its last finished phase
    (a phase is reused only if every setting it depends on is unchanged)."""

    def __init__(self, folder: Path, cfg: BuildConfig) -> None:
        self.folder, self.cfg = folder, cfg

    def _settings(self, keys: tuple[str, ...]) -> dict:
        return {k: v for k, v in dataclasses.asdict(self.cfg).items() if any(k.startswith(p) for p in keys)}

    def run(self, name: str, train: Callable, timings: dict, keys: tuple[str, ...], make: Callable) -> tuple:
        path = self.folder / f"{name}.pt"
        settings = self._settings(keys)
        if path.is_file():
            saved = torch.load(str(path), map_location="cpu", weights_only=True)
            if json.loads(saved["settings"]) == json.loads(json.dumps(settings)):
                modules = make()
                for m, state in zip(modules, saved["states"]):
                    m.load_state_dict(state)
                    m.eval().requires_grad_(False)
                for m, extra in zip(modules, saved["configs"]):
                    if extra:
                        m.register_to_config(**json.loads(extra))
                timings[name] = saved["seconds"]
                log.info("phase %s: reused from %s", name, path)
                return tuple(modules)
        t0 = time.perf_counter()
        modules = train()
        timings[name] = time.perf_counter() - t0
        configs = [json.dumps({"scaling_factor": m.config.scaling_factor}) if hasattr(getattr(m, "config", None), "scaling_factor")
                   else "" for m in modules]
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save(path, lambda p: torch.save({"settings": json.dumps(settings), "seconds": timings[name],
                                                "states": [m.state_dict() for m in modules], "configs": configs}, p))
        return tuple(modules)





def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shortft_core.tiny_world.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (refused if not empty unless --overwrite)")
    parser.add_argument("--add-shortcut", default=None, metavar="FILE",
                        help="instead of building: copy a distilled shortcut LoRA into the built world in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    for f in dataclasses.fields(BuildConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f"default {f.default}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.add_shortcut:
        manifest = add_shortcut(args.out, args.add_shortcut)
        log.info("added %s to %s (%.2f MiB of weights)", args.add_shortcut, args.out, manifest["weights_mib"])
        return 0
    cfg = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
    manifest = build(args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress, resume=args.resume)
    log.info("wrote %s (%.2f MiB of weights) in %s", args.out, manifest["weights_mib"], manifest["timings_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
