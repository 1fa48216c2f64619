"""Names of SD1.5/SDXL weights in the original (ldm / sgm) layout, computed from a diffusers config.

Single-file checkpoints (``model.diffusion_model.input_blocks.4.1...``), kohya SDXL LoRAs
(``lora_unet_input_blocks_4_1_...``) and ComfyUI all use the ldm names; diffusers, peft and our adapters use the
diffusers names. Loading goes through diffusers' own converters (ldm -> diffusers); this module gives the other
direction, which the project needs to *write* ldm-layout files (random-weight test checkpoints, SDXL kohya LoRAs
in the sgm naming) and to describe a module in the names users see in ComfyUI. Its correctness is checked by
round-tripping through diffusers' converters in the tests.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd15": ("cond_stage_model.transformer.",), "sdxl": ("conditioner.embedders.0.transformer.",)}
OPEN_CLIP_PREFIX_SDXL = "conditioner.embedders.1.model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _layers_per_block(config: Mapping[str, Any]) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: only SD-family UNets with one integer value are supported")
    return lpb


def unet_block_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """``(diffusers prefix, ldm prefix, sub-name map)`` for every block of a UNet2DConditionModel config."""
    lpb = _layers_per_block(config)
    down, up = config["down_block_types"], config["up_block_types"]
    out: list[tuple[str, str, dict[str, str]]] = [
        ("conv_in", "input_blocks.0.0", {}),
        ("time_embedding.linear_1", "time_embed.0", {}),
        ("time_embedding.linear_2", "time_embed.2", {}),
        ("conv_norm_out", "out.0", {}),
        ("conv_out", "out.2", {}),
    ]
    if config.get("addition_embed_type") == "text_time":
        out += [("add_embedding.linear_1", "label_emb.0.0", {}), ("add_embedding.linear_2", "label_emb.0.2", {})]
    for i, kind in enumerate(down):
        has_attn = "CrossAttn" in kind
        for j in range(lpb):
            n = 1 + i * (lpb + 1) + j
            out.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", _RESNET))
            if has_attn:
                out.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", {}))
        if i < len(down) - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op", {}))
    out += [("mid_block.resnets.0", "middle_block.0", _RESNET), ("mid_block.attentions.0", "middle_block.1", {}),
            ("mid_block.resnets.1", "middle_block.2", _RESNET)]
    for i, kind in enumerate(up):
        has_attn = "CrossAttn" in kind
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            out.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _RESNET))
            if has_attn:
                out.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", {}))
        if i < len(up) - 1:
            out.append((f"up_blocks.{i}.upsamplers.0.conv",
                        f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv", {}))
    return out


def _rename(name: str, table: list[tuple[str, str, dict[str, str]]], what: str) -> str:
    for dprefix, lprefix, sub in table:
        if name == dprefix or name.startswith(dprefix + "."):
            rest = name[len(dprefix):].lstrip(".")
            for d, l in sub.items():
                if rest == d or rest.startswith(d + "."):
                    rest = l + rest[len(d):]
                    break
            return lprefix + ("." + rest if rest else "")
    raise KeyError(f"{what} name {name!r} has no ldm equivalent")


def unet_name_to_ldm(name: str, config: Mapping[str, Any]) -> str:
    """Diffusers UNet module/parameter name -> ldm name (without the ``model.diffusion_model.`` prefix)."""
    return _rename(name, unet_block_prefixes(config), "UNet")


def unet_state_dict_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in ldm naming (no prefix)."""
    table = unet_block_prefixes(config)
    return {_rename(k, table, "UNet"): v for k, v in state_dict.items()}


def _vae_table(config: Mapping[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    n = len(config["block_out_channels"])
    lpb = _layers_per_block(config)
    out: list[tuple[str, str, dict[str, str]]] = [("encoder.conv_norm_out", "encoder.norm_out", {}),
                                                  ("decoder.conv_norm_out", "decoder.norm_out", {})]
    for i in range(n):
        for j in range(lpb):
            out.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        out.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {}))
        for j in range(lpb + 1):
            out.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET))
        out.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv", {}))
    for part in ("encoder", "decoder"):
        out += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
                (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
                (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTN)]
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv",
                 "post_quant_conv"):
        out.append((name, name, {}))
    return out


def vae_state_dict_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in ldm naming; mid-block attention linears become 1x1 convs."""
    table = _vae_table(config)
    out = {}
    for k, v in state_dict.items():
        name = _rename(k, table, "VAE")
        if ".mid.attn_1." in name and name.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[name] = v
    return out


def open_clip_state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict in open_clip naming (SDXL's second text encoder)."""
    top = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    sub = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
           "mlp.fc2": "mlp.c_proj"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if not k.startswith(("text_model.", "text_projection")):
            k = "text_model." + k
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith("text_model.encoder.layers."):
            idx, rest = k[len("text_model.encoder.layers."):].split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, proj, kind = rest.split(".")
                qkv.setdefault((int(idx), kind), {})[proj[0]] = v
                continue
            for d, l in sub.items():
                if rest.startswith(d + "."):
                    rest = l + rest[len(d):]
                    break
            else:
                raise KeyError(f"text encoder name {k!r} has no open_clip equivalent")
            out[f"transformer.resblocks.{idx}.{rest}"] = v
        elif k.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"text encoder name {k!r} has no open_clip equivalent")
    for (idx, kind), parts in qkv.items():
        out[f"transformer.resblocks.{idx}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def ldm_checkpoint(family: str, unet: torch.nn.Module, vae: torch.nn.Module,
                   text_encoders: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The single-file (ldm/sgm) state dict of a diffusers SD1.5 or SDXL model, as A1111/ComfyUI save it."""
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family {family!r}: ldm checkpoints are written for 'sd15' and 'sdxl'")
    sd = {UNET_PREFIX + k: v for k, v in unet_state_dict_to_ldm(unet.state_dict(), unet.config).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae_state_dict_to_ldm(vae.state_dict(), vae.config).items()})
    te_sd = {(k if k.startswith("text_model.") else "text_model." + k): v  # transformers 5 drops "text_model."
             for k, v in text_encoders[0].state_dict().items() if not k.endswith("position_ids")}
    sd.update({CLIP_PREFIXES[family][0] + k: v for k, v in te_sd.items()})
    if family == "sdxl":
        if len(text_encoders) != 2:
            raise ValueError("an SDXL checkpoint needs both text encoders")
        big = open_clip_state_dict_from_hf(text_encoders[1].state_dict())
        sd.update({OPEN_CLIP_PREFIX_SDXL + k: v for k, v in big.items()})
    return sd
