"""Load Tiny World: the library's tiny world (a toy SD1.5-shaped pipeline) as genuine ComfyUI MODEL, CLIP and VAE
objects, so the stock CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode and LoRA nodes run it like a checkpoint.

ComfyUI cannot detect the tiny world from its weights: its detection knows fixed families, its UNet and VAE build
GroupNorms with 32 groups (the tiny world uses 16), SD1.5's latent scale is 0.18215 (the tiny VAE's is its own)
and its stock VAE detection assumes 8x. So the three objects are built here from ComfyUI's own classes:

- MODEL: :class:`TinyWorld` (a ``supported_models_base.BASE``) with the tiny UNet's config, SD1.5's discrete
  scaled-linear eps schedule and :class:`TinyWorldLatent`; a ``model_base.BaseModel`` built with an ops class that
  extends what ``comfy.ops.pick_operations`` picks (manual cast on GPUs included) by a GroupNorm of the tiny
  world's group count; weights mapped from the diffusers file by ``comfy.utils.unet_to_diffusers``; placement by
  ``comfy.model_management`` as ComfyUI's diffusion-model loader does; a (non-dynamic) ``ModelPatcher``.
- CLIP: ``comfy.sd.CLIP`` of a ``ClipTarget`` whose ``SD1ClipModel`` holds an ``SDClipModel`` built from the tiny
  text encoder's JSON config (last hidden state, no projection) and whose tokenizer is an ``SDTokenizer`` on the tiny
  tokenizer folder (the standard CLIP BPE) with the tiny embedding width.
- VAE: ``comfy.sd.VAE`` with an explicit ddconfig of the tiny VAE, the diffusers weights converted by
  ``comfy.diffusers_convert.convert_vae_state_dict`` (written for four levels: the decoder's ``up.N`` are renumbered
  for fewer), the tiny group count set on its GroupNorms and its 4x spatial ratio.

Every object is built from the folder's configs on each call (nothing is cached between loads). The objects exist
only when this pack builds them: a checkpoint saved from them does not reload through the stock loaders.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import comfy.diffusers_convert
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.utils
import torch
from comfy_api.latest import io

from ..shortft_core import tiny_weights_dir as weights_dir
from .common import CATEGORY

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Diffusers UNet settings the ComfyUI UNet built here reproduces; a world whose UNet differs in any of them is refused.
_UNET_FIXED = {
    "act_fn": "silu", "addition_embed_type": None, "center_input_sample": False, "class_embed_type": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "downsample_padding": 1, "dual_cross_attention": False,
    "encoder_hid_dim": None, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_out_scale_factor": 1.0, "resnet_time_scale_shift": "default",
    "time_cond_proj_dim": None, "time_embedding_type": "positional", "transformer_layers_per_block": 1,
    "upcast_attention": False, "use_linear_projection": False, "attention_type": "default",
    "cross_attention_norm": None, "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
}
_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
# The text model's weights ComfyUI's CLIP has and the tiny text encoder does not (SD1.5 checkpoints lack them too).
_CLIP_EXTRA_KEYS = ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")


class TinyWorldLatent(comfy.latent_formats.LatentFormat):
    """The tiny VAE's latent space: 4 channels at 1/4 of the image size, scaled by the VAE config's scaling_factor
    (the shipped world's value here; :func:`load_tiny_world` sets the loaded folder's). A ComfyUI LATENT is the
    model-space latent divided by it, as for SD1.5 with 0.18215."""

    scale_factor = 0.6565
    latent_channels = 4
    spacial_downscale_ratio = 4


class TinyWorld(comfy.supported_models_base.BASE):
    """ComfyUI's model config of the tiny world: an SD1.5-shaped eps UNet (the shipped world's config below; the
    instance gets the loaded folder's from :func:`unet_config_from_diffusers`), SD1.5's discrete schedule and
    :class:`TinyWorldLatent`. :func:`is_tiny_world` recognises a MODEL by this class."""

    unet_config = {
        "use_checkpoint": False, "image_size": 8, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 48,
        "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 0],
        "transformer_depth_output": [1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 64, "num_heads": 8,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    unet_extra_config = {"num_head_channels": -1}  # heads are counted (num_heads), not sized, as in SD1.5
    # ComfyUI's "linear" discrete schedule is SD1.5's scaled linear: betas = linspace(sqrt(start), sqrt(end)) ** 2
    sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
    latent_format = TinyWorldLatent
    memory_usage_factor = 1.0
    norm_groups = 16  # GroupNorm groups of the UNet (ComfyUI's UNet hard-codes 32)


def is_tiny_world(model: Any) -> bool:
    """Whether a ComfyUI MODEL (a ModelPatcher, or its BaseModel) is the tiny world built by :func:`load_tiny_world`
    (clones and patched copies included: they share the model and its config)."""
    base = getattr(model, "model", model)
    return isinstance(getattr(base, "model_config", None), TinyWorld)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def unet_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's UNetModel config for a diffusers ``UNet2DConditionModel`` config of the SD1.5 shape (cross-attention
    down/up blocks or plain ones, one transformer per attention, a cross-attention mid block), or a ValueError
    naming what does not fit. diffusers' ``attention_head_dim`` of such configs is the number of heads."""
    wrong = {k: cfg.get(k, v) for k, v in _UNET_FIXED.items() if cfg.get(k, v) != v}
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if (set(down) - {_CROSS_DOWN, _PLAIN_DOWN} or set(up) - {_CROSS_UP, _PLAIN_UP}
            or [b == _CROSS_DOWN for b in down] != [b == _CROSS_UP for b in reversed(up)]):
        wrong["block types"] = (down, up)
    if (not isinstance(cfg["layers_per_block"], int) or not isinstance(cfg["attention_head_dim"], int)
            or cfg.get("num_attention_heads") is not None):
        wrong["layers_per_block / attention_head_dim / num_attention_heads"] = (
            cfg["layers_per_block"], cfg["attention_head_dim"], cfg.get("num_attention_heads"))
    if wrong:
        raise ValueError(f"the tiny world's UNet config differs from the SD1.5 shape ComfyUI builds here: {wrong}")
    channels, per_block = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    if any(c % channels[0] for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    attn = [int(b == _CROSS_DOWN) for b in down]
    return {
        **TinyWorld.unet_config,
        "image_size": cfg["sample_size"], "in_channels": cfg["in_channels"], "out_channels": cfg["out_channels"],
        "model_channels": channels[0], "channel_mult": [c // channels[0] for c in channels],
        "num_res_blocks": [per_block] * len(channels),
        "transformer_depth": [a for a in attn for _ in range(per_block)],
        # listed from the last output block to the first (ComfyUI pops them from the end)
        "transformer_depth_output": [a for a in attn for _ in range(per_block + 1)],
        "transformer_depth_middle": 1, "context_dim": cfg["cross_attention_dim"],
        "num_heads": cfg["attention_head_dim"],
    }


def group_norm_operations(base: type, groups: int) -> type:
    """``base`` (a ``comfy.ops`` class) whose GroupNorm uses ``groups`` groups whatever group count the module asks
    for (ComfyUI's UNet asks 32): everything else, weight casting included, is ``base``'s."""

    class GroupNorm(base.GroupNorm):
        def __init__(self, num_groups: int, num_channels: int, *args: Any, **kwargs: Any) -> None:
            super().__init__(groups, num_channels, *args, **kwargs)

    return type(f"{base.__name__}_groups{groups}", (base,), {"GroupNorm": GroupNorm})


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def load_unet(pipeline: Path, dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    """The tiny UNet as a ComfyUI MODEL (ModelPatcher of a BaseModel), weights in ``dtype``."""
    cfg = _read_json(pipeline / "unet" / "config.json")
    sched = _read_json(pipeline / "scheduler" / "scheduler_config.json")
    if sched.get("beta_schedule") != "scaled_linear" or sched.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"the tiny world's scheduler {sched.get('beta_schedule')}/{sched.get('prediction_type')} "
                         "is not the scaled-linear eps schedule ComfyUI's discrete sampling reproduces")
    config = TinyWorld(unet_config_from_diffusers(cfg))
    config.norm_groups = cfg["norm_num_groups"]
    config.sampling_settings = {**config.sampling_settings, "linear_start": sched["beta_start"],  # per instance
                                "linear_end": sched["beta_end"], "timesteps": sched["num_train_timesteps"]}
    vae_cfg = _read_json(pipeline / "vae" / "config.json")
    config.latent_format.scale_factor = vae_cfg["scaling_factor"]
    config.latent_format.spacial_downscale_ratio = 2 ** (len(vae_cfg["block_out_channels"]) - 1)

    sd = _load_weights(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    parameters = comfy.utils.calculate_parameters(sd)
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast, device=load_device)
    picked = comfy.ops.pick_operations(dtype, manual_cast, load_device=load_device, model_config=config)
    config.custom_operations = group_norm_operations(picked, config.norm_groups)

    key_map = comfy.utils.unet_to_diffusers(config.unet_config)
    initial_device = comfy.model_management.unet_inital_load_device(parameters, dtype)
    model = config.get_model({}, "", device=initial_device)
    expected = set(model.diffusion_model.state_dict())
    missing, unused = expected - {key_map[k] for k in sd if k in key_map}, sorted(set(sd) - set(key_map))
    if missing or unused:
        raise ValueError(f"the tiny UNet's weights do not map onto ComfyUI's UNet: {len(missing)} missing (e.g. "
                         f"{sorted(missing)[:3]}), {len(unused)} unmapped (e.g. {unused[:3]})")
    # the legacy (non-dynamic) patcher, as ComfyUI's loaders give with disable_dynamic: hooks and weight wrappers
    # work on it everywhere, and a model of a few million parameters gains nothing from dynamic VRAM
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    model.load_model_weights({key_map[k]: v for k, v in sd.items()}, "")
    if initial_device != torch.device("cpu"):
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher


def load_clip(pipeline: Path, dtype: torch.dtype) -> comfy.sd.CLIP:
    """The tiny text encoder and tokenizer as a ComfyUI CLIP (SD1.5's last hidden state), weights in ``dtype``."""
    text_cfg = _read_json(pipeline / "text_encoder" / "config.json")
    tokenizer = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(pipeline / "tokenizer"),
                                  embedding_size=text_cfg["hidden_size"],
                                  max_length=text_cfg["max_position_embeddings"])
    encoder = functools.partial(comfy.sd1_clip.SDClipModel, textmodel_json_config=text_cfg,
                                max_length=text_cfg["max_position_embeddings"], return_projected_pooled=False,
                                special_tokens={"start": text_cfg["bos_token_id"], "end": text_cfg["eos_token_id"],
                                                "pad": text_cfg["pad_token_id"]})
    target = comfy.supported_models_base.ClipTarget(
        functools.partial(comfy.sd1_clip.SD1Tokenizer, tokenizer=tokenizer),
        functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=encoder))
    sd = _load_weights(pipeline / "text_encoder" / "model.safetensors")
    sd = {"clip_l.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()
          if not k.endswith("position_ids")}
    clip = comfy.sd.CLIP(target=target, state_dict=sd, parameters=comfy.utils.calculate_parameters(sd),
                         model_options={"dtype": dtype})
    expected = set(clip.cond_stage_model.state_dict()) - set(_CLIP_EXTRA_KEYS)
    if expected != set(sd):
        raise ValueError(f"the tiny text encoder's weights do not fit ComfyUI's CLIP: missing "
                         f"{sorted(expected - set(sd))[:3]}, unused {sorted(set(sd) - expected)[:3]}")
    return clip


def load_vae(pipeline: Path) -> comfy.sd.VAE:
    """The tiny VAE as a ComfyUI VAE, in fp32 (its config asks for an fp32 upcast; it is tiny)."""
    cfg = _read_json(pipeline / "vae" / "config.json")
    channels = list(cfg["block_out_channels"])
    levels, ratio = len(channels), 2 ** (len(channels) - 1)
    # ComfyUI builds the VAE's GroupNorms with 32 groups (their group count is set afterwards): channels must allow it
    if (levels > 4 or any(c % channels[0] or c % 32 for c in channels) or cfg.get("shift_factor") is not None
            or not cfg.get("mid_block_add_attention", True)):
        raise ValueError(f"the tiny world's VAE config (channels {channels}, shift {cfg.get('shift_factor')}, mid "
                         f"attention {cfg.get('mid_block_add_attention', True)}) is not the AutoencoderKL shape "
                         "built here (up to 4 levels, channels multiples of 32 and of the first, no shift)")
    ddconfig = {"double_z": True, "z_channels": cfg["latent_channels"], "resolution": cfg["sample_size"],
                "in_channels": cfg["in_channels"], "out_ch": cfg["out_channels"], "ch": channels[0],
                "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": cfg["layers_per_block"],
                "attn_resolutions": [], "dropout": 0.0}
    sd = comfy.diffusers_convert.convert_vae_state_dict(
        _load_weights(pipeline / "vae" / "diffusion_pytorch_model.safetensors"))
    # the converter numbers the decoder's levels for SD's four (up.3 .. up.0); a world with fewer starts lower
    shift = 4 - levels
    sd = {re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{int(m.group(1)) - shift}.", k): v
          for k, v in sd.items()}
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": cfg["latent_channels"]}},
                       dtype=torch.float32)
    expected = set(vae.first_stage_model.state_dict())
    if expected != set(sd):
        raise ValueError(f"the tiny VAE's weights do not fit ComfyUI's AutoencoderKL: missing "
                         f"{sorted(expected - set(sd))[:3]}, unused {sorted(set(sd) - expected)[:3]}")
    for m in vae.first_stage_model.modules():
        if isinstance(m, torch.nn.GroupNorm):  # built with 32 groups; the forward reads num_groups
            m.num_groups = cfg["norm_num_groups"]
    vae.downscale_ratio = vae.upscale_ratio = ratio
    if vae.patcher.is_dynamic():  # DynamicVRAM's streaming patcher: a VAE of a few MB gains nothing from it, and
        # training needs its weights placed whole (the same legacy patcher as the tiny UNet's)
        vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.patcher.load_device,
                                                       offload_device=vae.patcher.offload_device)
    return vae


def load_tiny_world(root: str | Path | None = None, dtype: torch.dtype = torch.float32
                    ) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE]:
    """``(MODEL, CLIP, VAE)`` of the tiny world in ``root`` (default: the shipped one, or ``$SHORTFT_TINY_WEIGHTS``):
    genuine ComfyUI objects for the stock nodes. ``dtype`` is the UNet's and the text encoder's weight dtype (ComfyUI
    casts per layer where the device cannot compute in it); the VAE stays fp32."""
    start = time.perf_counter()
    pipeline = weights_dir(root) / "pipeline"
    model, clip, vae = load_unet(pipeline, dtype), load_clip(pipeline, dtype), load_vae(pipeline)
    log.info("tiny world from %s built as ComfyUI MODEL/CLIP/VAE (%s) in %.2f s", pipeline, dtype,
             time.perf_counter() - start)
    return model, clip, vae


class LoadTinyWorld(io.ComfyNode):
    """The tiny world's MODEL, CLIP and VAE for the stock sampling nodes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShortFT_LoadTinyWorld",
            display_name="Load Tiny World",
            category=CATEGORY,
            description="Loads the embedded tiny world (a toy SD1.5-shaped model that runs on a CPU, 32x32 images) "
                        "as a MODEL, CLIP and VAE for the stock nodes: CLIP Text Encode, Empty Latent Image "
                        "(32x32), KSampler, VAE Decode, and ApplyAlignedLoRA with sets trained on the tiny world.",
            inputs=[
                io.Combo.Input("dtype", options=list(DTYPES), default="fp32", optional=True,
                               tooltip="Weight precision of the UNet and the text encoder (the VAE stays fp32). "
                                       "fp32 reproduces the library's tiny-world samples; the model is small "
                                       "enough that lower precision saves nothing worth having."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The tiny UNet with SD1.5's noise schedule (eps "
                                                              "prediction), for KSampler and ApplyAlignedLoRA."),
                io.Clip.Output(display_name="CLIP", tooltip="The tiny CLIP text encoder (standard CLIP tokenizer, "
                                                            "64-wide embeddings), for CLIP Text Encode."),
                io.Vae.Output(display_name="VAE", tooltip="The tiny VAE (4x: a 32x32 image is an 8x8 latent), "
                                                          "for VAE Decode and VAE Encode."),
            ],
        )

    @classmethod
    def execute(cls, dtype: str = "fp32") -> io.NodeOutput:
        return io.NodeOutput(*load_tiny_world(dtype=DTYPES[dtype]))


NODES: list[type[io.ComfyNode]] = [LoadTinyWorld]
