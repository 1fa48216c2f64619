"""Offline loading of real SD1.5 / SDXL models: diffusers folders and single-file ldm checkpoints.

Nothing here reaches a hub. Single-file checkpoints (what ComfyUI keeps in ``models/checkpoints``) are converted
with diffusers' own ldm -> diffusers converters, using the architecture configs bundled in
``shortft_core/configs/<family>/`` and CLIP tokenizers built from open_clip's merge table (cached in the user
cache folder). Layouts ShortFT cannot train (SD2 and other v-prediction models, inpainting UNets, refiners, SD3,
Flux, ...) are refused before any heavy work, with a message saying what is supported.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .compat import transformers_dtype
from .families import bundled_config
from .files import check_safetensors
from .lifecycle import outside_inference_mode
from .models import TINY, T2IModel
from .schedule import NoiseSchedule
from .tiny_world import weights_dir
from .tokenizer import EOS, load_clip_tokenizer, write_clip_tokenizer

log = logging.getLogger(__name__)

SUPPORTED = ("SD1.x/SD1.5 and SDXL base 1.0 (eps-prediction, 4-channel UNet), as a diffusers folder "
             "(model_index.json) or a single-file .safetensors/.ckpt checkpoint in the original (ldm) layout")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SDXL_PAD_TOKEN = "!"  # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>
_UNET = "model.diffusion_model."
_HOW_TO_GET = ("Download the checkpoint on a machine with network access (e.g. the .safetensors file of "
               "stable-diffusion-v1-5 or stable-diffusion-xl-base-1.0) and copy it here; nothing is downloaded "
               "at run time.")


class UnsupportedModelError(ValueError):
    """The checkpoint or folder holds a model layout ShortFT does not support."""


# ----- tokenizers ------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The user cache folder (``$SHORTFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/shortft``, else ``~/.cache/shortft``)."""
    env = os.environ.get("SHORTFT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shortft"


def clip_tokenizer(pad_token: str = EOS, cache: str | os.PathLike | None = None):
    """A CLIP BPE tokenizer built offline from open_clip's merges, cached per pad token in ``cache`` (default
    :func:`cache_dir`)."""
    name = "clip_tokenizer" if pad_token == EOS else f"clip_tokenizer_pad{ord(pad_token[0]):03d}"
    folder = (Path(cache) if cache is not None else cache_dir()) / name
    try:
        return load_clip_tokenizer(folder)
    except (FileNotFoundError, RuntimeError, OSError):
        pass
    try:
        write_clip_tokenizer(folder, pad_token=pad_token)
    except OSError as e:  # read-only home: build into a temporary folder instead
        log.warning("cannot write the tokenizer cache %s (%s); building it in a temporary folder", folder, e)
        folder = Path(tempfile.mkdtemp(prefix="shortft_tok_"))
        write_clip_tokenizer(folder, pad_token=pad_token)
    return load_clip_tokenizer(folder)


# ----- reading checkpoints ----------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint; safetensors, or a pickle read with ``weights_only=True`` only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (looked for that exact file). {_HOW_TO_GET}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path, "checkpoint")  # a truncated download is named here, not deep in the reader
        sd: Any = load_file(str(path))
    elif path.suffix in CHECKPOINT_SUFFIXES:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling refusal ends here
            raise ValueError(
                f"{path} cannot be read safely (weights_only=True refused it: {e}); convert it to .safetensors "
                "with a tool you trust, ShortFT never executes pickled code"
            ) from e
    else:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; expected one of {CHECKPOINT_SUFFIXES}")
    while isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def detect_checkpoint_family(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> str:
    """'sd15' or 'sdxl' from the keys of an ldm-layout checkpoint; anything else raises UnsupportedModelError."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{name} is {what}; supported: {SUPPORTED}")

    if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in sd):
        raise refuse("a diffusers-layout UNet file, not a full checkpoint: pass the diffusers folder instead")
    try:
        kind = infer_diffusers_model_type(sd)
    except (KeyError, IndexError, ValueError, AttributeError):  # its probes assume complete checkpoints
        kind = "unknown"
    conv_in = sd.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        hints = {"sd3": "an SD3 model", "sd35_large": "an SD3.5 model", "sd35_medium": "an SD3.5 model"}
        if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in sd):
            kind = kind if kind.startswith("sd3") else "sd3"
        elif any(".double_blocks." in k or k.startswith("double_blocks.") for k in sd):
            kind = kind if kind.startswith("flux") else "flux"
        what = hints.get(kind) or ("a Flux model" if kind.startswith("flux") else
                                   f"not an SD-family checkpoint (no {_UNET}input_blocks.*; detected {kind!r})")
        raise refuse(what)
    if conv_in.shape[1] != 4:
        raise refuse(f"a {conv_in.shape[1]}-channel UNet (inpainting / instruct-pix2pix); "
                     "only 4-channel text-to-image UNets can be trained")
    if any(k in sd for k in ("v_pred", "edm_mean", "edm_vpred.sigma_max")) or kind == "playground-v2-5":
        raise refuse("a v-prediction / EDM model")
    if kind in ("v2", "inpainting_v2") or "cond_stage_model.model.token_embedding.weight" in sd:
        raise refuse("an SD2.x model (OpenCLIP-H text encoder, mostly v-prediction)")
    if kind == "xl_refiner" or ("conditioner.embedders.0.model.text_projection" in sd):
        raise refuse("an SDXL refiner (no CLIP-L text encoder)")
    has_xl_text = any(k.startswith("conditioner.embedders.1.model.") for k in sd)
    has_xl_unet = _UNET + "label_emb.0.0.weight" in sd
    if has_xl_text and has_xl_unet:
        return "sdxl"
    if has_xl_text or has_xl_unet:
        raise refuse("an incomplete SDXL checkpoint (UNet or text encoders missing)")
    attn2 = sd.get(_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if attn2 is not None and attn2.shape[1] != 768:
        raise refuse(f"an SD-shaped model with {attn2.shape[1]}-wide cross-attention (SD1.x uses 768)")
    if attn2 is None or not any(k.startswith("cond_stage_model.transformer.") for k in sd):
        raise refuse("not a full SD1.x checkpoint (UNet cross-attention or CLIP text encoder missing)")
    return "sd15"


# ----- building modules from converted state dicts ------------------------------------------------------------
def _materialise(factory: Callable[[], torch.nn.Module], sd: dict[str, torch.Tensor], what: str, source: str,
                 dtype: torch.dtype) -> torch.nn.Module:
    """Build ``factory()`` without allocating, then assign ``sd`` strictly (every weight present, none left over)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = factory()
    expected = set(module.state_dict())
    sd = _fit_text_model_prefix({k: v for k, v in sd.items() if not k.endswith("position_ids")}, expected)
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"{source}: the {what} weights do not match the bundled {what} architecture "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); "
            f"the file is damaged or not a standard checkpoint. Supported: {SUPPORTED}"
        )
    wrong = [k for k, v in module.state_dict().items() if tuple(v.shape) != tuple(sd[k].shape)]
    if wrong:
        k = wrong[0]
        raise UnsupportedModelError(
            f"{source}: {what} weight {k} has shape {tuple(sd[k].shape)}, the bundled architecture expects "
            f"{tuple(module.state_dict()[k].shape)} ({len(wrong)} mismatches); supported: {SUPPORTED}"
        )
    module.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
                           strict=True, assign=True)
    return module


def _clip_state_dict(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _fit_text_model_prefix(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoints name CLIP weights ``text_model.*`` (very old ones without it); transformers 5's CLIPTextModel
    drops the prefix while CLIPTextModelWithProjection keeps it: rename to what the module expects."""
    want = any(k.startswith("text_model.") for k in expected)
    have = any(k.startswith("text_model.") for k in sd)
    if want and not have and any(k.startswith("embeddings.") for k in sd):
        return {("text_model." + k if not k.startswith("text_projection") else k): v for k, v in sd.items()}
    if have and not want and any(k.startswith("embeddings.") for k in expected):
        return {k.removeprefix("text_model."): v for k, v in sd.items()}
    return sd


def _finish(model, device: torch.device | str) -> Any:
    model.to(device)
    model.requires_grad_(False)
    for m in [model.unet, model.vae, *model.text_encoders]:
        m.eval()
    return model


def load_single_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, config_dir: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None):
    """Load an SD1.5 or SDXL single-file checkpoint (ldm layout) as a :class:`T2IModel`, offline.

    ``config_dir`` replaces the bundled configs (tests use reduced architectures); ``dtype`` is the weight dtype
    (bf16/fp16 on CUDA). An SDXL VAE asked for in fp16 stays in fp32 (it overflows in fp16).
    """
    path = Path(path).expanduser()
    return model_from_checkpoint(read_checkpoint(path), str(path), device, dtype, config_dir, cache_dir)


def model_from_checkpoint(sd: dict[str, torch.Tensor], source: str = "checkpoint", device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, config_dir: str | os.PathLike | None = None,
                          cache_dir: str | os.PathLike | None = None):
    """The :class:`T2IModel` of an ldm-layout state dict (see :func:`load_single_file`); ``sd`` is consumed."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = source
    family = detect_checkpoint_family(sd, name=source)
    cfg = {part: bundled_config(family, part, config_dir) for part in ("unet", "vae", "scheduler")}
    schedule = NoiseSchedule.from_config(cfg["scheduler"])
    tokenizers = [clip_tokenizer(cache=cache_dir)] + ([clip_tokenizer(SDXL_PAD_TOKEN, cache_dir)] if family == "sdxl"
                                                      else [])

    with init_empty_weights():  # the converters want a complete config dict (defaults filled in)
        unet_cfg = dict(UNet2DConditionModel.from_config(cfg["unet"]).config)
        vae_cfg = dict(AutoencoderKL.from_config(cfg["vae"]).config)
    unet = _materialise(lambda: UNet2DConditionModel.from_config(cfg["unet"]),
                        convert_ldm_unet_checkpoint(sd, unet_cfg), "UNet", str(path), dtype)
    for k in [k for k in sd if k.startswith(("model.diffusion_model.", "model_ema."))]:
        del sd[k]  # free the file's copy of the UNet before converting the rest
    vae_dtype = torch.float32 if (family == "sdxl" and dtype == torch.float16) else dtype
    vae = _materialise(lambda: AutoencoderKL.from_config(cfg["vae"]), convert_ldm_vae_checkpoint(sd, vae_cfg),
                       "VAE", str(path), vae_dtype)
    te_cfg = CLIPTextConfig(**bundled_config(family, "text_encoder", config_dir))
    prefix = "cond_stage_model.transformer." if family == "sd15" else "conditioner.embedders.0.transformer."
    text_encoders: list[torch.nn.Module] = [
        _materialise(lambda: CLIPTextModel(te_cfg), _clip_state_dict(sd, prefix), "text encoder", str(path), dtype)]
    if family == "sdxl":
        te2_cfg = CLIPTextConfig(**bundled_config(family, "text_encoder_2", config_dir))
        with init_empty_weights():
            shell = CLIPTextModelWithProjection(te2_cfg)
        te2_sd = convert_open_clip_checkpoint(shell, sd, prefix="conditioner.embedders.1.model.")
        text_encoders.append(_materialise(lambda: CLIPTextModelWithProjection(te2_cfg), te2_sd, "text encoder 2",
                                          str(path), dtype))
    del sd
    model = T2IModel(family, tokenizers, text_encoders, unet, vae, schedule, cfg["scheduler"], source=source,
                     info={"format": "single_file", "force_zeros_for_empty_prompt": family == "sdxl"})
    _finish(model, device)
    log.info("loaded %s single-file checkpoint %s (UNet %.0fM params, %s)", family, source,
             sum(p.numel() for p in unet.parameters()) / 1e6, dtype)
    return model


# ----- diffusers folders --------------------------------------------------------------------------------------
def _weights_present(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: the pipeline folder is incomplete. {_HOW_TO_GET}")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        why = (f" ({', '.join(pickled[:2])} are pickle files, which are never loaded: they can run code; convert "
               "them to safetensors on a machine you trust)") if pickled else " (the download is incomplete?)"
        raise FileNotFoundError(f"no weights (*.safetensors) in {folder}{why}. {_HOW_TO_GET}")


def _variant(folder: Path) -> str | None:
    """'fp16' when a component folder only holds the ``*.fp16.safetensors`` variant."""
    plain = [p for p in folder.glob("*.safetensors") if ".fp16." not in p.name]
    return "fp16" if not plain and any(folder.glob("*.fp16.safetensors")) else None


def pipeline_class(path: str | os.PathLike) -> str:
    """The ``_class_name`` of a diffusers pipeline folder."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: {path} is not a diffusers pipeline folder. Supported: {SUPPORTED}")
    return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", ""))


def check_sd15_folder(path: str | os.PathLike) -> None:
    """Refuse SD2 / inpainting folders that share StableDiffusionPipeline's class name, before loading weights."""
    cfg_file = Path(path) / "unet" / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: the pipeline folder is incomplete. {_HOW_TO_GET}")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if cfg.get("in_channels", 4) != 4:
        raise UnsupportedModelError(f"{path} has a {cfg['in_channels']}-channel UNet (inpainting); supported: {SUPPORTED}")
    if cfg.get("cross_attention_dim") == 1024:
        raise UnsupportedModelError(f"{path} is an SD2.x model (1024-wide cross-attention); supported: {SUPPORTED}")


def load_sdxl_folder(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """Load a diffusers StableDiffusionXLPipeline folder (two tokenizers and text encoders) as a T2IModel."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path).expanduser()
    cls = pipeline_class(path)
    if cls != "StableDiffusionXLPipeline":
        raise UnsupportedModelError(f"{path} holds a {cls or 'unknown'} pipeline; supported: {SUPPORTED}")
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _weights_present(path / sub)
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise FileNotFoundError(f"{sched_file} is missing: the pipeline folder is incomplete")
    sched_cfg = json.loads(sched_file.read_text(encoding="utf-8"))
    schedule = NoiseSchedule.from_config(sched_cfg)
    if schedule.prediction_type != "epsilon":
        raise UnsupportedModelError(f"{path} is a {schedule.prediction_type}-prediction model; supported: {SUPPORTED}")
    unet_cfg = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    if unet_cfg.get("in_channels", 4) != 4:
        raise UnsupportedModelError(f"{path} has a {unet_cfg['in_channels']}-channel UNet; supported: {SUPPORTED}")
    tokenizers = []
    for sub in ("tokenizer", "tokenizer_2"):
        if (path / sub / "vocab.json").is_file():
            tokenizers.append(load_clip_tokenizer(path / sub))
        else:  # the tokenizer is the same public BPE everywhere: build it rather than fail
            log.info("%s has no %s; using the CLIP tokenizer built from open_clip's merges", path, sub)
            tokenizers.append(clip_tokenizer(EOS if sub == "tokenizer" else SDXL_PAD_TOKEN, cache_dir))
    kw: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)  # never a pickled weight file
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype,
                                                variant=_variant(path / "unet"), **kw)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype, variant=_variant(path / "vae"), **kw)
    te1 = CLIPTextModel.from_pretrained(path / "text_encoder", **transformers_dtype(dtype),
                                        variant=_variant(path / "text_encoder"), **kw)
    te2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **transformers_dtype(dtype),
                                                      variant=_variant(path / "text_encoder_2"), **kw)
    model = T2IModel("sdxl", tokenizers, [te1, te2], unet, vae, schedule, sched_cfg, source=str(path),
                     info={"format": "diffusers", "force_zeros_for_empty_prompt": True})
    _finish(model, device)
    log.info("loaded sdxl from %s (UNet %.0fM params, %s)", path, sum(p.numel() for p in unet.parameters()) / 1e6, dtype)
    return model


# ----- family of a UNet ----------------------------------------------------------------------------------------
# ----- every model by its spec -----------------------------------------------------------------------------
@outside_inference_mode
def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None) -> T2IModel:
    """Load ``"tiny"`` (the embedded tiny world), a local diffusers SD1.5/SDXL folder or a single-file SD1.5/SDXL
    checkpoint (.safetensors / .ckpt in the original ldm layout), offline. ``cache_dir`` holds the CLIP tokenizers
    a single-file checkpoint needs (default: :func:`cache_dir`)."""
    if str(spec) == TINY:
        return load_tiny_model(device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        if pipeline_class(path) == "StableDiffusionPipeline":
            check_sd15_folder(path)
        return load_diffusers_folder(path, device, dtype, cache_dir)
    if path.is_file():
        return load_single_file(path, device, dtype, cache_dir=cache_dir)
    raise FileNotFoundError(
        f"model {spec!r} not found (no such file or folder): pass 'tiny', a local diffusers folder or a single-file "
        f"checkpoint. Supported: {SUPPORTED}"
    )


def load_diffusers_folder(path: str | os.PathLike, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None) -> T2IModel:
    """Load the components of a diffusers StableDiffusionPipeline folder without building the pipeline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file} not found: {path} is not a diffusers pipeline folder")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    cls = index.get("_class_name", "")
    if cls == "StableDiffusionXLPipeline":
        return load_sdxl_folder(path, device, dtype, cache_dir)
    if cls != "StableDiffusionPipeline":
        raise ValueError(
            f"{path} holds a {cls or 'unknown'} pipeline; supported: StableDiffusionPipeline (SD1.x-layout, "
            "eps-prediction) and StableDiffusionXLPipeline"
        )
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path / sub} is missing: the pipeline folder is incomplete")
    sched_files = sorted((path / "scheduler").glob("scheduler_config.json"))
    if not sched_files:
        raise FileNotFoundError(f"{path / 'scheduler' / 'scheduler_config.json'} is missing")
    sched_cfg = json.loads(sched_files[0].read_text(encoding="utf-8"))
    schedule = NoiseSchedule.from_config(sched_cfg)
    if schedule.prediction_type != "epsilon":
        raise ValueError(
            f"{path} is a {schedule.prediction_type}-prediction model; ShortFT supports eps-prediction bases "
            "(SD1.5, SDXL) only"
        )
    tokenizer = load_clip_tokenizer(path / "tokenizer")
    for sub in ("unet", "vae", "text_encoder"):
        _weights_present(path / sub)
    kw = dict(local_files_only=True, use_safetensors=True)  # never a pickled weight file
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **transformers_dtype(dtype), **kw)
    model = T2IModel("sd15", [tokenizer], [text_encoder], unet, vae, schedule, sched_cfg, source=str(path))
    model.to(device)
    model.requires_grad_(False)
    for m in [unet, vae, text_encoder]:
        m.eval()
    log.info("loaded %s (UNet %.1fM params) from %s", model.family, sum(p.numel() for p in unet.parameters()) / 1e6, path)
    return model


def load_tiny_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    root: str | os.PathLike | None = None) -> T2IModel:
    """The tiny text-to-image pipeline as a :class:`T2IModel` (family ``tiny``)."""
    from dataclasses import replace

    model = load_diffusers_folder(weights_dir(root) / "pipeline", device, dtype)
    return replace(model, family="tiny", source="tiny" if root is None else str(root))
