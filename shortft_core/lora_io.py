"""LoRA files <-> peft adapters on a diffusers UNet: strict import of every published key layout, and export
in the kohya layout (what ComfyUI's stock LoraLoader and A1111-style tools read) or the diffusers layout.

Import goes through diffusers' own converters (``StableDiffusionPipeline.lora_state_dict`` for kohya keys,
``convert_unet_state_dict_to_peft`` for diffusers keys, ``unet.load_lora_adapter`` for the injection) and then
checks the result against the file: every tensor must land in exactly one LoRA layer of the UNet with the file's
rank and scale, or the import fails listing the keys. diffusers itself only warns about unused keys, and drops
some silently (keys of the other naming in a mixed file, per-module alphas of attention layers), hence the check.

Scale convention: a module's effective LoRA multiplier is ``alpha / rank`` (kohya's ``.alpha``; ComfyUI and
diffusers use 1.0, i.e. alpha = rank, when a file has none). Exports always write ``.alpha`` for every module.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .adapters import lora_compute_in_input_dtype
from .lifecycle import outside_inference_mode
from .files import SafetensorsHeader, atomic_save, check_safetensors, refuse_overwrite

log = logging.getLogger(__name__)

LAYOUTS = ("kohya", "diffusers")
KOHYA_PREFIX = "lora_unet_"
KOHYA_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
_CROSS_ATTENTION_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
_FAMILY_NAMES = {"sd15": "SD1.x/SD1.5", "sd2": "SD2.x", "sdxl": "SDXL", "custom": "a custom UNet"}
_UNSUPPORTED_SUFFIXES = {
    ".dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", ".lora_mid.weight": "LoCon with CP decomposition",
    ".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr", ".diff": "full-weight difference",
    ".diff_b": "bias difference", ".w_norm": "norm difference", ".lora_B.bias": "LoRA with bias",
}
_WEIGHT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight",
                    "_lora.down.weight", "_lora.up.weight")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be loaded completely and exactly into the given UNet."""


@dataclass
class LoraModule:
    """One LoRA module in diffusers naming: ``W' = W + (alpha / rank) * up @ down``."""

    down: torch.Tensor  # lora_A / lora_down: (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # lora_B / lora_up: (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoadedLora:
    """What :func:`load_lora_adapter` put into the UNet."""

    adapter_name: str
    source: str
    layout: str  # kohya | kohya_sgm | diffusers | peft
    family: str | None  # base model the LoRA's shapes belong to (sd15 / sdxl / ...), None when unknown
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shortft(self) -> dict[str, Any] | None:
        """The caller's JSON metadata written by :func:`export_lora`, if the file came from ShortFT."""
        raw = self.metadata.get("shortft")
        return json.loads(raw) if raw else None

    @property
    def ranks(self) -> dict[int, int]:
        return dict(collections.Counter(m.rank for m in self.modules.values()))


# ----- reading files -----------------------------------------------------------------------------------------
def _checked(path: str | os.PathLike, what: str) -> tuple[Path, SafetensorsHeader | None]:
    """``path`` as an existing file, with its checked header when it is a ``.safetensors`` file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {path} not found (looked for that exact file); copy the .safetensors file there "
            "(e.g. from the Hyper-SD / PCM / TCD model pages on a machine with network access)")
    return path, check_safetensors(path, what) if path.suffix == ".safetensors" else None


def lora_file(path: str | os.PathLike, what: str = "LoRA file") -> Path:
    """``path`` as an existing, whole file: a FileNotFoundError says where it was looked for and how to get it,
    and a ``.safetensors`` file whose header does not describe a complete file is a
    :class:`~shortft_core.files.SafetensorsFileError` (a ValueError) naming ``what`` and the file. Only the header is
    read, so the command line calls this before it loads a model."""
    return _checked(path, what)[0]


def lora_metadata(path: str | os.PathLike, what: str = "LoRA file") -> dict[str, str]:
    """The safetensors metadata of a LoRA file, read from its checked header only ({} for other file types)."""
    _, header = _checked(path, what)
    return dict(header.metadata) if header is not None else {}


def read_lora(path: str | os.PathLike, what: str = "LoRA file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the safetensors metadata of a LoRA file (pickles only via ``weights_only=True``); a damaged
    safetensors file is refused from its header before any tensor is read."""
    path, header = _checked(path, what)
    if header is not None:
        from safetensors.torch import load_file

        return load_file(str(path)), dict(header.metadata)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise LoraFormatError(f"{path} cannot be read with weights_only=True ({e}); convert it to .safetensors "
                                  "with a tool you trust") from e
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LoraFormatError(f"{path} does not hold a flat dict of tensors")
        return dict(sd), {}
    raise LoraFormatError(f"{path}: unknown LoRA file type {path.suffix!r}; expected .safetensors")


# ----- the UNet's modules ---------------------------------------------------------------------------------------
def _unwrap(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet2DConditionModel behind DDP / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(unet, attr) and isinstance(getattr(unet, attr), torch.nn.Module) and not hasattr(unet, "config"):
            unet = getattr(unet, attr)
    return unet


def _base_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear / Conv2d modules by diffusers path; peft-wrapped ones are listed under their own path."""
    out: dict[str, torch.nn.Module] = {}
    for name, mod in unet.named_modules():
        if name.endswith(".base_layer") or ".base_layer." in name or ".lora_" in name:
            continue
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            out[name] = base
    return out


def _expected_shapes(base: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(base, torch.nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)


def lora_base_family(modules: Mapping[str, LoraModule]) -> str | None:
    """The base architecture a LoRA was made for, from its cross-attention key width (None if undecidable)."""
    for name, m in modules.items():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            return _CROSS_ATTENTION_WIDTH.get(int(m.down.shape[1]), f"a {int(m.down.shape[1])}-wide cross-attention model")
    if any(n.startswith("down_blocks.3.") for n in modules):
        return "sd15"
    if any(n.startswith("add_embedding.") or ".transformer_blocks.9." in n for n in modules):
        return "sdxl"
    return None


def _unet_family_name(unet: torch.nn.Module) -> str:
    from .families import unet_family

    fam = unet_family(unet)
    if fam != "custom":
        return fam
    width = getattr(unet.config, "cross_attention_dim", None)
    return _CROSS_ATTENTION_WIDTH.get(width, "custom") if isinstance(width, int) else "custom"


# ----- key layouts -> diffusers module names -------------------------------------------------------------------
def _refuse_unsupported(keys: Iterable[str], source: str) -> None:
    for key in keys:
        for suffix, kind in _UNSUPPORTED_SUFFIXES.items():
            if key.endswith(suffix) or suffix in key:
                raise LoraFormatError(f"{source} is a {kind} file (key {key!r}); ShortFT loads plain LoRA "
                                      "(lora_down/lora_up or lora_A/lora_B) only")


def _split_text_encoder(sd: Mapping[str, torch.Tensor], source: str) -> None:
    te = [k for k in sd if k.startswith(("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.",
                                           "te.", "te1.", "te2."))]
    if te:
        raise LoraFormatError(
            f"{source} has {len(te)} text-encoder LoRA keys (e.g. {te[0]!r}); ShortFT applies shortcut and "
            "alignment LoRAs to the UNet only, because every chain step shares one frozen text encoding. Use a "
            "UNet-only file (drop the lora_te*/text_encoder* keys with a tool you trust) or a LoRA trained "
            "without text-encoder layers")


def _tag(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
    """Fresh tensor objects per key, so keys can be followed through diffusers' renaming by identity."""
    tagged = {k: v.view_as(v) for k, v in sd.items()}
    return tagged, {id(v): k for k, v in tagged.items()}


def _sgm_to_diffusers_kohya(keys: Iterable[str], unet: torch.nn.Module) -> dict[str, str]:
    """kohya module names in ldm naming -> kohya names in diffusers naming (diffusers 0.42 maps SDXL only)."""
    from .ldm_keys import unet_name_to_ldm

    table = {}
    for name in _base_layers(unet):
        try:
            table[KOHYA_PREFIX + unet_name_to_ldm(name, unet.config).replace(".", "_")] = KOHYA_PREFIX + name.replace(".", "_")
        except KeyError:
            continue
    return {k: table.get(k, k) for k in keys}


def _kohya_to_diffusers(sd: dict[str, torch.Tensor], unet: torch.nn.Module, source: str) -> tuple[dict, dict, str]:
    """kohya keys -> ({module: (down, up)}, {module: alpha}, layout) through diffusers' kohya converter."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    bad = [k for k in sd if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if bad:
        raise LoraFormatError(f"{source}: unrecognised kohya keys {bad[:5]} ({len(bad)} in all)")
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    orphan = sorted(s for s in stems if s + ".lora_down.weight" not in sd or s + ".lora_up.weight" not in sd)
    if orphan:
        raise LoraFormatError(f"{source}: modules without both lora_down and lora_up weights: {orphan[:5]} "
                              f"({len(orphan)} in all); the file is damaged")
    sgm = [s for s in stems if re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", s)]
    plain = [s for s in stems if re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_", s)]
    if sgm and plain:  # diffusers would drop the ldm-named half without a word
        raise LoraFormatError(f"{source} mixes ldm names ({sgm[0]}) and diffusers names ({plain[0]}); "
                              "a kohya file uses one naming")
    layout = "kohya_sgm" if sgm else "kohya"
    sdxl_like = getattr(unet.config, "addition_embed_type", None) == "text_time"
    rename: dict[str, str] = {}
    if sgm and not sdxl_like:
        rename = _sgm_to_diffusers_kohya(stems, unet)
    elif not sgm:  # diffusers' name heuristics break add_embedding.linear_N; its ldm alias converts cleanly
        rename = {s: s.replace("lora_unet_add_embedding_linear_1", "lora_unet_label_emb_0_0")
                  .replace("lora_unet_add_embedding_linear_2", "lora_unet_label_emb_0_2") for s in stems}
    alphas_by_stem = {s: float(sd[s + ".alpha"].item()) for s in stems if s + ".alpha" in sd}
    weights = {}
    for s in stems:
        r = rename.get(s, s)
        weights[r + ".lora_down.weight"] = sd[s + ".lora_down.weight"]
        weights[r + ".lora_up.weight"] = sd[s + ".lora_up.weight"]
    tagged, origin = _tag(weights)
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(dict(tagged), unet_config=unet.config)
    except (KeyError, ValueError, IndexError) as e:
        raise LoraFormatError(f"{source}: diffusers' kohya converter failed ({e!r}); the keys do not belong to "
                              f"this UNet") from e
    converted = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    inverse = {v: k for k, v in rename.items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, t in converted.items():
        raw = origin.get(id(t))
        m = re.match(r"(.+)\.lora_([AB])\.weight$", key)
        if raw is None or m is None:
            raise LoraFormatError(f"{source}: diffusers produced an unexpected key {key!r}")
        module, which = m.groups()
        pairs.setdefault(module, {})["down" if which == "A" else "up"] = weights[raw]
        stem = inverse.get(raw.rsplit(".", 2)[0], raw.rsplit(".", 2)[0])
        if stem in alphas_by_stem:
            alphas[module] = alphas_by_stem[stem]
        if (which == "A") != raw.endswith(".lora_down.weight"):
            raise LoraFormatError(f"{source}: {raw} was converted to {key} (down/up swapped)")
    used = {origin[id(t)] for t in converted.values()}
    unused = sorted(set(weights) - used)
    if unused:
        raise LoraFormatError(f"{source}: diffusers' converter did not use {len(unused)} keys, e.g. {unused[:5]}")
    return pairs, alphas, layout


def _diffusers_to_diffusers(sd: dict[str, torch.Tensor], metadata: Mapping[str, str], unet: torch.nn.Module,
                            source: str) -> tuple[dict, dict, str]:
    """diffusers / peft keys (``unet.`` prefix optional) -> ({module: (down, up)}, {module: alpha}, layout)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    def strip(k: str) -> str:
        for p in ("unet.", *_WRAPPER_PREFIXES):
            if k.startswith(p):
                return k[len(p):]
        return k

    stripped = {strip(k): v for k, v in sd.items()}
    if len(stripped) != len(sd):
        raise LoraFormatError(f"{source}: keys collide once their 'unet.' prefix is removed")
    alpha_keys = {k: v for k, v in stripped.items() if k.endswith(".alpha")}
    weights = {k: v for k, v in stripped.items() if not k.endswith(".alpha")}
    bad = [k for k in weights if not k.endswith(_WEIGHT_SUFFIXES)]
    if bad:
        raise LoraFormatError(f"{source}: unrecognised LoRA keys {bad[:5]} ({len(bad)} in all); expected kohya "
                              "(lora_unet_*.lora_down.weight) or diffusers/peft (*.lora_A.weight) keys")
    layout = "peft" if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights) else "diffusers"
    tagged, origin = _tag(weights)
    converted = convert_unet_state_dict_to_peft(dict(tagged))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in converted.items():
        m = re.match(r"(.+)\.lora_([AB])\.weight$", key)
        raw = origin.get(id(t))
        if m is None or raw is None:
            raise LoraFormatError(f"{source}: key {raw or key!r} does not name a LoRA layer of a UNet module")
        module, which = m.groups()
        pairs.setdefault(module, {})["down" if which == "A" else "up"] = weights[raw]
    alphas: dict[str, float] = {}
    for k, v in alpha_keys.items():  # "<module>.alpha", module in any of the weight namings
        probe = convert_unet_state_dict_to_peft({k[: -len(".alpha")] + ".lora.down.weight": None})
        module = next(iter(probe)).rsplit(".lora_A.weight", 1)[0]
        if module not in pairs:
            raise LoraFormatError(f"{source}: alpha key {k!r} has no LoRA weights")
        alphas[module] = float(v.item())
    if not alphas:
        alphas = _alphas_from_adapter_metadata(metadata, pairs, source)
    return pairs, alphas, layout


def _alphas_from_adapter_metadata(metadata: Mapping[str, str], pairs: Mapping[str, Any], source: str) -> dict[str, float]:
    """Per-module kohya-convention alphas from diffusers' ``lora_adapter_metadata`` (a LoraConfig as JSON)."""
    from peft.utils.other import get_pattern_key

    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    cfg = json.loads(raw)
    if any(k.startswith("unet.") for k in cfg):
        cfg = {k[len("unet."):]: v for k, v in cfg.items() if k.startswith("unet.")}
    if "lora_alpha" not in cfg:
        return {}
    if cfg.get("use_dora"):
        raise LoraFormatError(f"{source} is a DoRA adapter (lora_adapter_metadata use_dora=true); not supported")
    out = {}
    alpha_pattern, rank_pattern = cfg.get("alpha_pattern") or {}, cfg.get("rank_pattern") or {}

    def split(pattern: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Anchored per-module keys ("^" + escaped name, as ours) by name, and the remaining regex keys."""
        exact, regex = {}, {}
        for key, value in pattern.items():
            name = re.sub(r"\\(.)", r"\1", key[1:]) if key.startswith("^") else None
            if name is not None and "^" + re.escape(name) == key:
                exact[name] = value
            else:
                regex[key] = value
        return exact, regex

    split_alpha, split_rank = split(alpha_pattern), split(rank_pattern)

    def lookup(parts: tuple[dict[str, Any], dict[str, Any]], module: str, default: Any) -> Any:
        exact, regex = parts
        if module in exact:
            return exact[module]
        return regex.get(get_pattern_key(regex.keys(), module), default) if regex else default

    for module, ab in pairs.items():
        rank = int(ab["down"].shape[0]) if "down" in ab else int(cfg.get("r", 8))
        declared_rank = lookup(split_rank, module, cfg.get("r", rank))
        if int(declared_rank) != rank:
            raise LoraFormatError(f"{source}: {module} has rank {rank}, its adapter metadata says {declared_rank}")
        alpha = float(lookup(split_alpha, module, cfg["lora_alpha"]))
        out[module] = alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha
    return out


def lora_modules(sd: Mapping[str, torch.Tensor], unet: torch.nn.Module, metadata: Mapping[str, str] | None = None,
                 source: str = "LoRA") -> tuple[dict[str, LoraModule], str]:
    """Every LoRA module of a file, in diffusers naming, checked against ``unet``; raises on any unused key,
    a shape that does not fit, or a LoRA made for another architecture."""
    unet = _unwrap(unet)
    sd = dict(sd)
    if not sd:
        raise LoraFormatError(f"{source} holds no tensors")
    _refuse_unsupported(sd, source)
    _split_text_encoder(sd, source)
    if all(k.startswith(KOHYA_PREFIX) for k in sd):
        pairs, alphas, layout = _kohya_to_diffusers(sd, unet, source)
    elif any(k.startswith(KOHYA_PREFIX) for k in sd):
        other = next(k for k in sd if not k.startswith(KOHYA_PREFIX))
        raise LoraFormatError(f"{source} mixes kohya keys with other keys (e.g. {other!r}); not a LoRA layout "
                              "ShortFT knows")
    else:
        pairs, alphas, layout = _diffusers_to_diffusers(sd, metadata or {}, unet, source)
    half = sorted(m for m, ab in pairs.items() if set(ab) != {"down", "up"})
    if half:
        raise LoraFormatError(f"{source}: modules with only one of the two LoRA matrices: {half[:5]}")
    modules = {m: LoraModule(ab["down"], ab["up"], alphas.get(m, float(ab["down"].shape[0])))
               for m, ab in sorted(pairs.items())}
    missing_alpha = [m for m in modules if m not in alphas]
    if layout.startswith("kohya") and missing_alpha:
        log.warning("%s: %d modules have no .alpha; they use scale 1.0 (alpha = rank) as ComfyUI does",
                    source, len(missing_alpha))
    _check_fits(modules, unet, source)
    return modules, layout


def _check_fits(modules: Mapping[str, LoraModule], unet: torch.nn.Module, source: str) -> None:
    layers = _base_layers(unet)
    lora_family, unet_fam = lora_base_family(modules), _unet_family_name(unet)
    missing = [m for m in modules if m not in layers]
    wrong = []
    for m, mod in modules.items():
        if m in layers:
            want_down, want_up = _expected_shapes(layers[m], mod.rank)
            if tuple(mod.down.shape) != want_down or tuple(mod.up.shape) != want_up:
                wrong.append(f"{m}: down {tuple(mod.down.shape)} up {tuple(mod.up.shape)}, the UNet needs "
                             f"{want_down} / {want_up}")
    if not missing and not wrong:
        return
    if lora_family and unet_fam not in ("custom",) and lora_family != unet_fam:
        raise LoraFormatError(
            f"{source} is a LoRA for {_FAMILY_NAMES.get(lora_family, lora_family)} but the model is "
            f"{_FAMILY_NAMES.get(unet_fam, unet_fam)}; use a LoRA made for this base model")
    detail = (f"{len(missing)} target modules do not exist in this UNet (e.g. {missing[:3]})" if missing else "") + \
             ("; " if missing and wrong else "") + (f"{len(wrong)} shapes do not fit (e.g. {wrong[0]})" if wrong else "")
    raise LoraFormatError(f"{source} does not fit this UNet ({_FAMILY_NAMES.get(unet_fam, unet_fam)}): {detail}; "
                          f"the LoRA looks made for {_FAMILY_NAMES.get(lora_family or '', 'another architecture')}")


# ----- injection -------------------------------------------------------------------------------------------------
def _lora_config_kwargs(modules: Mapping[str, LoraModule]) -> dict[str, Any]:
    """Exact peft LoraConfig arguments: the most common rank/alpha, per-module patterns for the rest."""
    ranks = collections.Counter(m.rank for m in modules.values())
    alphas = collections.Counter(m.alpha for m in modules.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    return {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
        "rank_pattern": {"^" + re.escape(n): m.rank for n, m in modules.items() if m.rank != r},
        "alpha_pattern": {"^" + re.escape(n): m.alpha for n, m in modules.items() if m.alpha != alpha},
        "lora_dropout": 0.0, "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": False,
    }


def _adapter_layers(unet: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers of one adapter, by diffusers module path."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in _unwrap(unet).named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in mod.lora_A:
            for p in _WRAPPER_PREFIXES:
                name = name.removeprefix(p)
            out[name] = mod
    return out


def _adapter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the peft adapters present in ``unet``."""
    return list(getattr(_unwrap(unet), "peft_config", {}) or {})


def _set_active(unet: torch.nn.Module, names: Iterable[str]) -> None:
    """Make exactly ``names`` active (empty: base model only) without changing any parameter's requires_grad."""
    from .adapters import AdapterSwitch

    unet = _unwrap(unet)
    unknown = set(names) - set(_adapter_names(unet))
    if unknown:
        raise ValueError(f"unknown adapters {sorted(unknown)}; loaded: {_adapter_names(unet)}")
    AdapterSwitch(unet).activate(list(names))


def _active(unet: torch.nn.Module) -> list[str]:
    """Union of the adapters active in any LoRA layer of ``unet``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen: list[str] = []
    for mod in _unwrap(unet).modules():
        if isinstance(mod, BaseTunerLayer):
            for n in mod.active_adapters:
                if n not in seen:
                    seen.append(n)
    return seen


@outside_inference_mode
def load_lora_adapter(unet: torch.nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
                      adapter_name: str, trainable: bool = False, dtype: torch.dtype | None = None,
                      activate: bool = True, metadata: Mapping[str, str] | None = None) -> LoadedLora:
    """Load a LoRA file (or state dict) of any supported layout into ``unet`` as peft adapter ``adapter_name``.

    Every tensor of the file must be used, with the file's rank and alpha; the adapter is frozen unless
    ``trainable``, cast to ``dtype`` if given (else the UNet's dtype), and added to the active adapters if
    ``activate``. Raises :class:`LoraFormatError` (the UNet is left unchanged) when anything does not fit.
    """
    unet = _unwrap(unet)
    if isinstance(source, Mapping):
        sd, meta, label = dict(source), dict(metadata or {}), "state dict"
    else:
        sd, meta = read_lora(source)
        meta.update(metadata or {})
        label = str(source)
    _check_new_adapter(unet, adapter_name)
    modules, layout = lora_modules(sd, unet, meta, label)
    load_lora_modules(unet, modules, adapter_name, trainable=trainable, dtype=dtype, activate=activate, source=label)
    family = lora_base_family(modules)
    log.info("loaded LoRA %s as adapter %r: %d modules, layout %s, ranks %s%s", label, adapter_name, len(modules),
             layout, dict(collections.Counter(m.rank for m in modules.values())), "" if trainable else " (frozen)")
    return LoadedLora(adapter_name, label, layout, family, modules, meta)


def _check_new_adapter(net: torch.nn.Module, adapter_name: str) -> None:
    if not adapter_name or not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in _adapter_names(net):
        raise ValueError(f"adapter {adapter_name!r} is already loaded in this network; remove it first "
                         "(shortft_core.adapters.remove_adapters) or choose another name")


@outside_inference_mode
def load_lora_modules(net: torch.nn.Module, modules: Mapping[str, LoraModule], adapter_name: str,
                      trainable: bool = False, dtype: torch.dtype | None = None, activate: bool = True,
                      source: str = "LoRA") -> None:
    """Add the LoRA ``modules`` (module path of ``net`` -> down, up, alpha) to ``net`` as peft adapter
    ``adapter_name``, holding exactly the given tensors (cast to ``dtype``, else the network's dtype): the one way
    a LoRA file reaches a network, a diffusers UNet or any other module tree (e.g. a ComfyUI MODEL's, whose files
    ComfyUI's own key maps read). Frozen unless ``trainable``; active beside the active ones if ``activate``.
    Raises :class:`LoraFormatError` (the network is left unchanged) when a tensor does not load as given."""
    from peft import LoraConfig

    from .adapters import inject_adapter

    net = _unwrap(net)
    _check_new_adapter(net, adapter_name)
    before = _active(net)
    flags = {id(p): p.requires_grad for p in net.parameters()}
    target_dtype = dtype or next(net.parameters()).dtype
    peft_sd = {}
    for name, m in modules.items():
        peft_sd[f"{name}.lora_A.weight"] = m.down.to(target_dtype)
        peft_sd[f"{name}.lora_B.weight"] = m.up.to(target_dtype)
    with warnings.catch_warnings():  # several adapters on one network is the design, not an accident
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter(net, LoraConfig(**_lora_config_kwargs(modules)), adapter_name)
    layers = _adapter_layers(net, adapter_name)
    try:
        with torch.no_grad():  # the exact tensors, in the adapter's layers
            for name, layer in layers.items():
                layer.lora_A[adapter_name].weight.data = peft_sd[f"{name}.lora_A.weight"].clone()
                layer.lora_B[adapter_name].weight.data = peft_sd[f"{name}.lora_B.weight"].clone()
        _verify_loaded(net, adapter_name, modules, peft_sd, source)
    except Exception:
        from .adapters import remove_adapters

        remove_adapters(net, [adapter_name])
        raise
    for p in net.parameters():  # peft may have flipped other adapters' flags; restore them
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])
    for layer in layers.values():
        for p in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
            p.requires_grad_(trainable)
    _set_active(net, before + [adapter_name] if activate else before)
    lora_compute_in_input_dtype(net)


def _verify_loaded(unet: torch.nn.Module, adapter_name: str, modules: Mapping[str, LoraModule],
                   peft_sd: Mapping[str, torch.Tensor], source: str) -> None:
    from peft.utils import get_peft_model_state_dict

    got = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    unused = sorted(set(peft_sd) - set(got))
    extra = sorted(set(got) - set(peft_sd))
    if unused or extra:
        raise LoraFormatError(f"{source}: after loading, {len(unused)} file tensors are unused (e.g. {unused[:3]}) "
                              f"and {len(extra)} adapter tensors have no file tensor (e.g. {extra[:3]})")
    for k, v in peft_sd.items():
        if not torch.equal(got[k].to(v.dtype), v):
            raise LoraFormatError(f"{source}: {k} was not loaded as stored")
    layers = _adapter_layers(unet, adapter_name)
    for name, m in modules.items():
        layer = layers[name]
        if layer.r[adapter_name] != m.rank or not math.isclose(layer.scaling[adapter_name], m.scale, rel_tol=1e-9):
            raise LoraFormatError(f"{source}: {name} got rank {layer.r[adapter_name]} scale "
                                  f"{layer.scaling[adapter_name]}, the file says rank {m.rank} scale {m.scale}")


# ----- export ------------------------------------------------------------------------------------------------------
def adapter_modules(unet: torch.nn.Module, adapter_name: str) -> dict[str, LoraModule]:
    """The LoRA modules of one peft adapter (kohya alpha convention: alpha = effective scale x rank)."""
    layers = _adapter_layers(unet, adapter_name)
    if not layers:
        raise ValueError(f"the UNet has no LoRA adapter {adapter_name!r}; loaded: {_adapter_names(unet)}")
    out = {}
    for name, layer in sorted(layers.items()):
        if layer.use_dora.get(adapter_name, False):
            raise ValueError(f"adapter {adapter_name!r} uses DoRA ({name}); kohya/ComfyUI LoRA files cannot hold it")
        if getattr(layer, "lora_bias", {}).get(adapter_name, False):
            raise ValueError(f"adapter {adapter_name!r} has LoRA biases ({name}); kohya/ComfyUI LoRA files cannot hold them")
        rank, alpha = layer.r[adapter_name], float(layer.lora_alpha[adapter_name])
        rslora = getattr(layer, "use_rslora", {}).get(adapter_name, False)  # peft < 0.18 keeps no per-layer flag
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        down = layer.lora_A[adapter_name].weight.detach()
        up = layer.lora_B[adapter_name].weight.detach()
        out[name] = LoraModule(down, up, alpha if not rslora else scale * rank)
    return out


def kohya_state_dict(modules: Mapping[str, LoraModule], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """kohya keys ``lora_unet_<path with dots as underscores>.{lora_down,lora_up}.weight`` and ``.alpha``."""
    out = {}
    for name, m in modules.items():
        key = KOHYA_PREFIX + name.replace(".", "_")
        out[key + ".lora_down.weight"] = m.down.to(dtype).contiguous()
        out[key + ".lora_up.weight"] = m.up.to(dtype).contiguous()
        out[key + ".alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return out


def diffusers_state_dict(modules: Mapping[str, LoraModule], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """diffusers pipeline keys ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (alphas go in the metadata)."""
    out = {}
    for name, m in modules.items():
        out[f"unet.{name}.lora_A.weight"] = m.down.to(dtype).contiguous()
        out[f"unet.{name}.lora_B.weight"] = m.up.to(dtype).contiguous()
    return out


def _metadata(modules: Mapping[str, LoraModule], layout: str, family: str, adapter_name: str, title: str,
              extra: Mapping[str, Any] | None) -> dict[str, str]:
    from . import __version__

    rank = collections.Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    meta = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(float(alpha)),
        "ss_base_model_version": KOHYA_BASE_MODEL_VERSION.get(family, family),
        "ss_v2": "False",
        "ss_output_name": title,
        "ss_training_comment": "ShortFT reward fine-tuning (arXiv 2507.22604)",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title,
        "shortft_version": __version__,
        "shortft_family": family,
        "shortft_adapter": adapter_name,
        "shortft_layout": layout,
        "shortft_modules": str(len(modules)),
    }
    if family in MODELSPEC_ARCHITECTURE:
        meta["modelspec.architecture"] = MODELSPEC_ARCHITECTURE[family]
    if extra is not None:
        meta["shortft"] = json.dumps(extra, sort_keys=True)
    if layout == "diffusers":
        cfg = _lora_config_kwargs(modules)
        meta["lora_adapter_metadata"] = json.dumps({f"unet.{k}": v for k, v in cfg.items()}, sort_keys=True)
    return meta


def _warn_mixed_alphas(modules: Mapping[str, LoraModule], layout: str, path: Path) -> None:
    if layout == "kohya" and len({m.alpha for m in modules.values()}) > 1:
        log.warning("%s: modules have different alphas; ComfyUI and A1111 apply them, but diffusers 0.42's kohya "
                    "loader ignores per-module alphas of attention layers (use layout='diffusers' for diffusers)", path)


def export_lora(unet: torch.nn.Module, adapter_name: str, path: str | os.PathLike, layout: str = "kohya",
                metadata: Mapping[str, Any] | None = None, family: str | None = None, overwrite: bool = False,
                dtype: torch.dtype = torch.float16) -> Path:
    """Write one peft adapter of ``unet`` as a LoRA file (atomically; refuses to overwrite unless asked).

    ``layout``: "kohya" (ComfyUI LoraLoader, A1111, kohya; ``.alpha`` for every module) or "diffusers"
    (``pipe.load_lora_weights``). ``metadata`` (JSON-able: training config, plan, segment map...) is stored as
    the "shortft" field; ``family`` (sd15 / sdxl / tiny...) defaults to the one the UNet's config matches.
    """
    modules = adapter_modules(unet, adapter_name)
    if family is None:
        family = _unet_family_name(_unwrap(unet))
    return write_lora_modules(modules, path, layout, metadata, family, overwrite, dtype, adapter_name)


def write_lora_modules(modules: Mapping[str, LoraModule], path: str | os.PathLike, layout: str = "kohya",
                       metadata: Mapping[str, Any] | None = None, family: str = "custom", overwrite: bool = False,
                       dtype: torch.dtype = torch.float16, adapter_name: str = "lora") -> Path:
    """Write LoRA modules (diffusers module names) as a file; see :func:`export_lora` for the layouts."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {LAYOUTS}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype}: LoRA files are written in float16, bfloat16 or float32")
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    refuse_overwrite(path, overwrite, "LoRA file")
    if metadata is not None:
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata must be JSON-serialisable (training config, plan, segment map...): {e}") from e
    if not modules:
        raise ValueError(f"no LoRA modules to write to {path}")
    _warn_mixed_alphas(modules, layout, path)
    sd = kohya_state_dict(modules, dtype) if layout == "kohya" else diffusers_state_dict(modules, dtype)
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"adapter {adapter_name!r} has values that overflow {dtype} (e.g. {bad[0]}); "
                         "export with dtype=torch.float32")
    meta = _metadata(modules, layout, family, adapter_name, path.stem, metadata)
    atomic_save(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    log.info("wrote %s LoRA %s (%d modules, %s, adapter %r)", layout, path, len(modules), dtype, adapter_name)
    return path


def convert_lora_file(src: str | os.PathLike, dst: str | os.PathLike, unet: torch.nn.Module, layout: str = "kohya",
                      overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Re-write a LoRA file in another layout, checked against ``unet`` (a meta-device UNet is enough)."""
    src_sd, meta = read_lora(src)
    modules, _ = lora_modules(src_sd, unet, meta, str(src))
    dtype = dtype or next(iter(modules.values())).down.dtype
    family = meta.get("shortft_family") or _unet_family_name(_unwrap(unet))
    extra = json.loads(meta["shortft"]) if meta.get("shortft") else None
    return write_lora_modules(modules, dst, layout, extra, family, overwrite, dtype,
                              meta.get("shortft_adapter", Path(src).stem))


