"""Training through the MODEL, CLIP and VAE that ComfyUI loaded: the library's model seam over ComfyUI's own objects.

:class:`ComfyModel` is a :class:`~shortft_core.DiffusionModel` whose network is the MODEL's own diffusion model (one
copy in memory, trained in place): the noise prediction goes through ``BaseModel.apply_model`` (so the MODEL's model
sampling, weight patches and object patches apply, and gradients flow through it; what only ComfyUI's sampler runs, such
as block patches and CFG functions, is refused: :func:`sampling_patches`), the text through the CLIP's encoder, the
decode through the VAE's first stage model (``comfy.sd.VAE.decode`` is no gradient path). LoRA adapters are peft layers
injected into the diffusion model's modules (they add ``B(A x)`` beside the frozen layer, never a patched weight), and
LoRA files reach them through ComfyUI's own key maps, so every layout ComfyUI loads loads here. The library's
:class:`~shortft_core.TrainingSession` records what training changes and puts it back; the weights themselves are only
re-registered as ordinary tensors where ComfyUI made them in inference mode (same values, dtype and device). Under
ComfyUI's DynamicVRAM (its default on NVIDIA GPUs), which streams a MODEL's or VAE's weights from host memory per layer
call, the network and the VAE trained are static copies ComfyUI loads for them (:func:`static_copy`), dropped when
training ends (:meth:`ComfyModel.release`).

The chain works in the variance-preserving latent x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; ComfyUI's discrete
models take x_ve = x_t / sqrt(abar_t) at sigma_t = sqrt((1 - abar_t) / abar_t) and return the denoised x0, so
eps = (x_ve - x0) / sigma_t for eps and v models alike. A rectified-flow MODEL (ModelSamplingSD3) takes the flow latent
x_t sqrt((1 - f)^2 + f^2) at its flow level f, the level of the same signal-to-noise ratio, so eps = (x_flow - (1 - f)
x0) / f; at f = 1 (pure noise) eps is the latent itself, and the chain takes the MODEL's x0 there. SD3 / SD3.5
(an MMDiT) and FLUX.1 dev (10000 flow levels, of which the chain steps on every tenth; its guidance an input of the
network) are such flow MODELs: the set adapts their transformers' layers (:data:`LORA_TARGETS`) under their own
module names.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import re
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping, Sequence

import comfy.ldm.modules.attention as comfy_attention
import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_sampling
import comfy.ops
import comfy.sd1_clip
import comfy.utils
import torch

from ..shortft_core import (LEAN_DEVICES, Conditioning, DiffusionModel, LoadedLora, LoraModule, NoiseSchedule,
                            StopRequested, bundled_config, checkpoint_blocks, diffusers_module_order,
                            layer_norm_saving_output, lean_frozen_convs, lean_geglu, lean_norm_act, load_lora_modules,
                            lora_base_family, lora_metadata, tiled_tokens, tiny_weights_dir)
from .apply import WRAPPER_KEY as APPLY_WRAPPER_KEY
from .apply import lora_patches
from .common import chain_levels, chain_sigmas, is_dynamic, is_flow
from .family import trainable_family

log = logging.getLogger(__name__)

DEFAULT_SIZE = {"tiny": 32, "sd15": 512, "sd2": 768, "sdxl": 1024, "sd3": 1024, "flux": 1024}
# The LoRA targets of ComfyUI's transformers, the counterpart of the UNet's attention and feed-forward layers. MMDiT
# (SD3, SD3.5): each joint block's fused q/k/v and output projections (image and text streams; SD3.5 medium's second
# image attention) and its MLP. FLUX: each double block's q/k/v, output projection and MLP of either stream, each
# single block's two linear layers (fused q/k/v with the MLP's input; attention output with the MLP's output). The
# files keep these module names, as kohya's SD3 and FLUX LoRAs do, and load in ComfyUI by them.
MMDIT_TARGETS = ("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj", "mlp.fc1", "mlp.fc2")
FLUX_TARGETS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj",
                "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
LORA_TARGETS = {"sd3": MMDIT_TARGETS, "flux": FLUX_TARGETS}
# The guidance scale a guidance-distilled network (FLUX.1 dev) is trained at: ComfyUI's default (BaseModel Flux's
# extra_conds, the FluxGuidance node's), what its samplers give it unless a node sets another
DISTILLED_GUIDANCE = 3.5


def model_sampling(patcher: Any) -> Any:
    """The model sampling ``patcher`` samples with: its own object patch where a node (ModelSamplingDiscrete, for
    v-prediction or zero-terminal-SNR checkpoints) gave it one, else the network's. Not the BaseModel's attribute,
    which holds whatever the clone loaded last patched in (the MODEL's clones share one BaseModel)."""
    return patcher.get_model_object("model_sampling")


def prediction_type(sampling: Any) -> str:
    """The prediction type of ComfyUI's model ``sampling`` (eps or v on the discrete schedule, flow on a flow table:
    SD3's and FLUX's own, ModelSamplingSD3 / AuraFlow / Flux as rectified-flow fine-tunes are sampled), or a
    ValueError naming what ShortFT cannot train."""
    name = next((c.__name__ for c in type(sampling).__mro__ if c.__module__ == comfy.model_sampling.__name__
                 and issubclass(c, torch.nn.Module)), type(sampling).__name__)  # not a node's subclass's name
    if is_flow(sampling):
        if type(sampling).calculate_denoised is not comfy.model_sampling.CONST.calculate_denoised or \
                getattr(sampling, "noise_scale", 1.0) != 1.0:
            raise ValueError(f"the MODEL's flow model sampling ({name}) is not plain rectified flow; ShortFT trains "
                             "flow MODELs sampled with ModelSamplingSD3, ModelSamplingAuraFlow or ModelSamplingFlux")
        chain_levels(sampling)  # a table the chain's levels lie on
        return "flow"
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete):
        raise ValueError(f"the MODEL samples with {name}; ShortFT trains discrete-schedule models (eps or v) and "
                         "rectified-flow ones (ModelSamplingSD3, ModelSamplingAuraFlow, ModelSamplingFlux)")
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v_prediction"
    if isinstance(sampling, comfy.model_sampling.EPS) and type(sampling).calculate_denoised is \
            comfy.model_sampling.EPS.calculate_denoised:
        return "epsilon"
    raise ValueError(f"the MODEL's model sampling ({name}, e.g. ModelSamplingDiscrete's lcm or x0) "
                     "predicts neither eps nor v; ShortFT trains eps and v models: set ModelSamplingDiscrete's "
                     "sampling to eps or v_prediction, or remove it")


def chain_schedule(sampling: Any) -> NoiseSchedule:
    """The chain's schedule of ComfyUI's model ``sampling``: each level's abar (the variance-preserving level of the
    same signal-to-noise ratio: 1 / (1 + sigma^2) for the discrete models' sigma, (1 - f)^2 / ((1 - f)^2 + f^2) for
    flow level f) and the prediction type. A discrete model's chain ends at its first level, as diffusers' DDIM
    does; a flow model's at the clean sample, where ComfyUI's samplers end."""
    kind = prediction_type(sampling)
    sigmas = chain_sigmas(sampling).detach().double().cpu()
    if kind == "flow":
        return NoiseSchedule.from_flow_levels(sigmas)
    abar = 1.0 / (1.0 + sigmas**2)
    return NoiseSchedule(abar, float(abar[0]), kind)


# what nodes attach to a MODEL for sampling, by where ComfyUI's sampler runs it, with nodes that attach each kind
_SAMPLING_OPTIONS = {
    "model_function_wrapper": "a model function wrapper",
    "sampler_calc_cond_batch_function": "a cond-batch function",
    "sampler_pre_cfg_function": "a pre-CFG function",
    "sampler_cfg_function": "a CFG function (e.g. RescaleCFG)",
    "sampler_post_cfg_function": "a post-CFG function (e.g. PerturbedAttentionGuidance, SAG, CFGZeroStar)",
}
_BLOCK_PATCH_EXAMPLES = {"output_block_patch": " (e.g. FreeU)", "input_block_patch": " (e.g. Deep Shrink)",
                         "attn2": " (e.g. IPAdapter)", "attn1": " (e.g. PerturbedAttentionGuidance)"}


def sampling_patches(patcher: Any) -> list[str]:
    """What nodes attached to the MODEL that only ComfyUI's sampler runs: network patches and replacements, attention
    overrides, CFG and model functions, wrappers (ApplyAlignedLoRA's timestep-aware set among them) and hooks.
    Training calls the network directly, so these would not shape what it trains. Weight patches (LoRAs, merges)
    and object patches (ModelSamplingDiscrete) are part of the loaded network and are not listed."""
    options = patcher.model_options
    transformer = options.get("transformer_options", {})
    found = [f"{kind}{_BLOCK_PATCH_EXAMPLES.get(kind, '')}"
             for kind, patches in transformer.get("patches", {}).items() if patches]
    found += [f"{kind} replacement{_BLOCK_PATCH_EXAMPLES.get(kind, '')}"
              for kind, patches in transformer.get("patches_replace", {}).items() if patches]
    if transformer.get("optimized_attention_override") is not None:
        found.append("an attention override")
    found += [text for key, text in _SAMPLING_OPTIONS.items() if options.get(key)]
    for kind, keyed in getattr(patcher, "wrappers", {}).items():
        for key, wrappers in keyed.items():
            if wrappers:
                found.append(f"{kind} wrapper {key!r}" + (" (ApplyAlignedLoRA's timestep-aware set)"
                                                           if key == APPLY_WRAPPER_KEY else ""))
    if getattr(patcher, "hook_patches", None):
        found.append("hooks")
    return found


def text_options(clip: Any) -> str:
    """How the CLIP encodes beyond its weights and patches, as a part of the model's identity: the last layer a node
    chose (CLIP Set Last Layer) and tokenizer options a node set ('' for neither)."""
    parts = []
    if getattr(clip, "layer_idx", None) is not None:
        parts.append(f", clip layer {clip.layer_idx}")
    options = getattr(clip, "tokenizer_options", None)
    if options:
        parts.append(f", tokenizer {json.dumps(options, sort_keys=True, default=str)}")
    return "".join(parts)


def clip_hooks(clip: Any) -> bool:
    """Whether hooks are set on the CLIP (Set CLIP Hooks): ComfyUI applies them per sampling step or schedule the
    encoding by them, neither of which a prompt encoded once for training follows."""
    return bool(getattr(clip, "apply_hooks_to_conds", None) or getattr(getattr(clip, "patcher", None),
                                                                         "forced_hooks", None))


# a textual-inversion embedding in a prompt, as ComfyUI's tokenizer finds it: "embedding:" at the start or after
# whitespace, its name up to whitespace, "<" or "[", trailing commas not part of it
EMBEDDING = re.compile(r"(?:(?<=\s)|^)embedding:[^\s<\[]*?(?=,*(?:[\s<\[]|$))")


def prompt_syntax(clip: Any) -> tuple[bool, bool]:
    """Whether the CLIP's tokenizers read ComfyUI's emphasis weights, and textual-inversion embeddings, in a prompt
    (the SD tokenizers do, unless made with weights disabled or without an embeddings folder)."""
    tokenizer = getattr(clip, "tokenizer", None)
    parts = (tokenizer, *getattr(tokenizer, "__dict__", {}).values())
    found = [t for t in parts if isinstance(t, comfy.sd1_clip.SDTokenizer)]
    return (any(not t.disable_weights for t in found),
            any(t.embedding_directory is not None for t in found))


def plain_prompt(text: str, weights: bool = True, embeddings: bool = True) -> str:
    """A prompt as a reward reads it: ComfyUI's emphasis ("(red hair:1.3)", "((sky))") reduced to its words, escaped
    parentheses ("\\(1990\\)") as written, and textual-inversion embeddings ("embedding:name") left out, since a
    reward model reads plain text and knows neither weights nor another model's embeddings. ``weights`` and
    ``embeddings``: whether the text encoder reads each (:func:`prompt_syntax`); a prompt without any of this syntax
    is returned as it is."""
    text = comfy.sd1_clip.escape_important(text)
    if weights:
        text = "".join(piece for piece, _ in comfy.sd1_clip.token_weights(text, 1.0))
    text = comfy.sd1_clip.unescape_important(text)
    if embeddings and EMBEDDING.search(text):
        text = re.sub(r",(?:\s*,)+", ",", " ".join(EMBEDDING.sub("", text).split())).strip(", ")
    return text


def check_vae(vae: Any, family: str, latent_format: Any) -> None:
    """Refuse a VAE whose latents are not the MODEL's (another family's, e.g. FLUX's 16 channels, or a video VAE):
    otherwise the first decode fails mid-run, with a shape error naming neither."""
    made = int(latent_format.latent_channels)
    decoded, dims = getattr(vae, "latent_channels", made), getattr(vae, "latent_dim", 2)
    if decoded != made or dims != 2:
        kind = "image" if dims == 2 else "video"
        raise ValueError(f"the VAE decodes {decoded}-channel {kind} latents, the {family} MODEL makes {made}-channel "
                         "image latents: connect the VAE of the same checkpoint (Load Checkpoint's VAE output) or a "
                         f"VAE made for {family}")


# ComfyUI's attention functions whose backward autograd computes (PyTorch operations, SDPA, xformers); the others it
# may be started with compute none (--use-sage-attention: a kernel outside autograd, so q, k and v would get no
# gradient through it) or refuse backward (--use-flash-attention: a custom op without an autograd formula)
_DIFFERENTIABLE_ATTENTION = {getattr(getattr(comfy_attention, name), "__wrapped__", None) for name in
                             ("attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch",
                              "attention_xformers") if hasattr(comfy_attention, name)} - {None}
_SUBSTITUTED: set[str] = set()


def differentiable_attention(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ComfyUI's attention override for training's network calls: the attention function ComfyUI chose where autograd
    computes its backward, else its PyTorch SDPA attention, the same attention in exact arithmetic (sampling keeps
    ComfyUI's choice)."""
    if func in _DIFFERENTIABLE_ATTENTION:
        return func(*args, **kwargs)
    name = getattr(func, "__name__", repr(func))
    if name not in _SUBSTITUTED:
        _SUBSTITUTED.add(name)
        log.info("ShortFT: training computes attention with PyTorch's SDPA instead of ComfyUI's %s, which has no "
                 "backward", name)
    return comfy_attention.attention_pytorch(*args, **kwargs)


def diffusers_names(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """The diffusion model's module paths -> the diffusers module names LoRA files use (from ComfyUI's own map)."""
    return {ldm[: -len(".weight")]: diff[: -len(".weight")]
            for diff, ldm in comfy.utils.unet_to_diffusers(dict(unet_config)).items() if diff.endswith(".weight")}


def interruptible(method: Callable) -> Callable:
    """A network call of the seam that ComfyUI's interrupt can stop: its layers raise ComfyUI's interrupt exception
    inside the call (comfy/ops.py), which the library's loop takes as a stop request (checkpoint, partial set)."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except comfy.model_management.InterruptProcessingException:
            raise StopRequested from None

    return call


@contextlib.contextmanager
def comfy_training(on: bool = True) -> Iterator[None]:
    """ComfyUI's own switch for a training call (``comfy.model_management.in_training``, which its LoRA trainer sets)
    while the block runs, where ``on``: layers with an inference-only kernel (FLUX's RoPE, a custom op without a
    backward) compute with PyTorch operations there, which autograd differentiates. Restored after, however the block
    ends."""
    before = getattr(comfy.model_management, "in_training", False)
    comfy.model_management.in_training = before or on
    try:
        yield
    finally:
        comfy.model_management.in_training = before


def ordinary_tensors_(module: torch.nn.Module) -> int:
    """Re-register every parameter and buffer ComfyUI made in inference mode as an ordinary tensor with the same
    values (autograd cannot save inference tensors for backward); returns how many were re-registered."""
    done = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    done += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    done += 1
    return done


def static_copy(patcher: Any, what: str) -> Any:
    """``patcher`` itself, or where DynamicVRAM streams its weights, the static copy ComfyUI loads for it (its own
    ``clone(disable_dynamic=True)``, as its torch.compile node does: the file read again into a model of its own, the
    patches carried over). Training places the network whole on the GPU and keeps the weights each layer used alive
    until backward; streamed weights stay in host memory and are staged per call, so the caller's patcher is left
    to sampling and the copy is trained."""
    if not is_dynamic(patcher):
        return patcher
    try:
        static = patcher.clone(disable_dynamic=True)
    except RuntimeError as e:
        raise ValueError(f"the {what} streams its weights (ComfyUI's DynamicVRAM) and its loader cannot give the "
                         f"static copy training needs ({e}): load it with a core loader (Load Checkpoint, Load "
                         "Diffusion Model, Load VAE) or start ComfyUI with --disable-dynamic-vram") from None
    log.info("ShortFT: the %s streams its weights (DynamicVRAM): training a static copy ComfyUI loaded for it", what)
    return static


def static_vae(vae: Any) -> Any:
    """``vae`` itself, or a VAE over the static copy of its patcher (see :func:`static_copy`)."""
    patcher = static_copy(vae.patcher, "VAE")
    if patcher is vae.patcher:
        return vae
    copied = copy.copy(vae)
    copied.patcher, copied.first_stage_model = patcher, patcher.model
    return copied


def computes_own_weight(layer: torch.nn.Module) -> bool:
    """The gate of a lean ComfyUI layer, asked on each call: ComfyUI's interrupt check (which the layer's own forward
    makes), then whether the layer computes with its weight as stored. Not where ComfyUI computes with a copy (manual
    cast, low-VRAM or dynamic streaming) or a function of it (weight patches): its own forward runs there."""
    comfy.ops.run_every_op()
    return not (getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None)
                or getattr(layer, "bias_function", None))


def norm_act_pairs(module: torch.nn.Module) -> list[tuple[torch.nn.GroupNorm, torch.nn.SiLU]]:
    """The ``GroupNorm -> SiLU`` pairs of ComfyUI's UNet and VAE whose norm output goes only into the activation: the
    ResBlocks' input layers and their output layers where no scale/shift comes between, the UNet's output head, the
    VAE ResnetBlocks' two norms with their shared (in-place) SiLU. The VAE decoder's output head applies a function,
    not a module, and is left."""
    from comfy.ldm.modules.diffusionmodules import model as vae_blocks
    from comfy.ldm.modules.diffusionmodules import openaimodel

    found: list[tuple[torch.nn.Module, torch.nn.Module]] = []
    for m in module.modules():
        if type(m) is openaimodel.ResBlock:
            found.append((m.in_layers[0], m.in_layers[1]))
            if not m.use_scale_shift_norm:
                found.append((m.out_layers[0], m.out_layers[1]))
        elif type(m) is openaimodel.UNetModel:
            found.append((m.out[0], m.out[1]))
        elif type(m) is vae_blocks.ResnetBlock:
            found += [(m.norm1, m.swish), (m.norm2, m.swish)]
    return [(n, a) for n, a in found if _plain(n, torch.nn.GroupNorm, comfy.ops.disable_weight_init.GroupNorm)
            and type(a) is torch.nn.SiLU]


def _plain(layer: torch.nn.Module, torch_class: type, comfy_class: type) -> bool:
    """Whether ``layer`` is a ``torch_class`` whose forward is torch's or ComfyUI's stock one (which computes with the
    weight as stored unless it casts or patches it): ComfyUI's operation sets that compute otherwise (fp8,
    quantized, cuBLAS) override the forward and are left alone."""
    return isinstance(layer, torch_class) and type(layer).forward in (torch_class.forward, comfy_class.forward)


def lean_layers(module: torch.nn.Module, devices: tuple[str, ...] | None = LEAN_DEVICES) -> int:
    """Give ComfyUI's frozen convolutions, GEGLU feed-forwards and GroupNorm+SiLU pairs in ``module`` the library's
    lean forwards (less kept for backward, same values), taken on ``devices`` and, per call, where
    :func:`computes_own_weight` allows; returns how many layers were switched. Peft's convolutions (the adapters')
    are switched too; the layers of ComfyUI's manual cast compute with a cast copy, so the gate sends them ComfyUI's
    way on every call."""
    from comfy.ldm.modules.attention import GEGLU

    stock = comfy.ops.disable_weight_init
    convs = tuple({type(m) for m in module.modules() if _plain(m, torch.nn.Conv2d, stock.Conv2d)
                   and type(m)._conv_forward is torch.nn.Conv2d._conv_forward})  # conv2d with the weight as passed
    count = (lean_frozen_convs(module, devices, kinds=convs, gate=computes_own_weight)
             + lean_geglu(module, devices, kinds=(GEGLU,))
             + lean_norm_act(module, devices, pairs=norm_act_pairs, gate=computes_own_weight))
    log.debug("ShortFT: %d layers of %s keep less for backward", count, type(module).__name__)
    return count


def _cast_linear_forward(layer: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Linear computed by its cast path: the weight cast to the input's dtype, then a plain linear."""
    comfy.ops.run_every_op()
    return comfy.ops.disable_weight_init.Linear.forward_comfy_cast_weights(layer, input)


def differentiable_fp8_layers(module: torch.nn.Module) -> int:
    """Give the fp8 matmul layers ComfyUI uses for fp8 weights on GPUs that compute in fp8 (Load Diffusion Model's
    fp8_e4m3fn_fast, or ``--fast``) its cast path, which autograd differentiates: their fp8 path clamps its input in
    place (conditioning saved for backward among it, so backward fails) and has no backward itself. Instance
    overrides, which the training session removes when it ends, so sampling keeps the fp8 path; returns how many."""
    fp8_linear = getattr(getattr(comfy.ops, "fp8_ops", None), "Linear", None)
    if fp8_linear is None:
        return 0
    layers = [m for m in module.modules() if isinstance(m, fp8_linear)]
    for layer in layers:
        layer.forward = functools.partial(_cast_linear_forward, layer)
    if layers:
        log.info("ShortFT: %d fp8 matmul layers computed by ComfyUI's cast path while training", len(layers))
    return len(layers)


def _residual_safe_norm_forward(layer: torch.nn.Module, input: torch.Tensor) -> torch.Tensor:
    comfy.ops.run_every_op()
    return layer_norm_saving_output(input, layer.normalized_shape, layer.eps)


def residual_safe_norms(module: torch.nn.Module) -> int:
    """Give the LayerNorms without weight and bias in ``module`` a forward whose backward keeps their output, not
    their input (:func:`~shortft_core.memory.layer_norm_saving_output`; same values): FLUX's blocks normalise their
    residual stream and then add to it in place, which autograd refuses where the norm kept the stream for backward.
    Instance overrides, which the training session removes when it ends; returns how many."""
    stock = (torch.nn.LayerNorm.forward, comfy.ops.disable_weight_init.LayerNorm.forward)
    layers = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is None
              and m.bias is None and type(m).forward in stock]
    for layer in layers:
        layer.forward = functools.partial(_residual_safe_norm_forward, layer)
    return len(layers)


def fingerprint(parts: Sequence[tuple[torch.nn.Module, Mapping[str, Any]]], samples: int = 8,
                values: int = 4096) -> str:
    """A short digest that tells models apart for a run's identity (two checkpoints, or one with other LoRAs patched
    on, are different runs). ``parts``: (module, its ComfyUI weight patches) pairs; each adds its tensor names,
    shapes and dtypes, the first ``values`` values of ``samples`` tensors spread through it, and its patches' keys,
    strengths and first values. Cheap: it reads a few kilobytes, whatever the model's size."""
    digest = hashlib.sha256()

    def head(tensor: torch.Tensor, n: int) -> bytes:
        with torch.inference_mode(False):
            return tensor.detach().flatten()[:n].float().cpu().numpy().tobytes()

    for module, patches in parts:
        state = module.state_dict()
        names = sorted(state)
        digest.update(";".join(f"{n}:{tuple(state[n].shape)}:{state[n].dtype}" for n in names).encode())
        for name in names[:: max(1, len(names) // samples)][:samples]:
            digest.update(head(state[name], values))
        for key in sorted(patches):
            for strength, patch, strength_model, *_ in patches[key]:
                digest.update(f"{key}:{strength}:{strength_model};".encode())
                weights = getattr(patch, "weights", patch if isinstance(patch, tuple) else ())
                for w in [w for w in weights if isinstance(w, torch.Tensor)][:2]:
                    digest.update(head(w, 64))
    return digest.hexdigest()[:16]


class ComfyModel(DiffusionModel):
    """The library's model seam over a ComfyUI MODEL (ModelPatcher), CLIP and VAE: see the module docstring.
    Prompts are encoded one at a time and kept (``cache_size`` of them), so a prompt's conditioning never depends on
    its batch and the CLIP runs once per prompt."""

    def __init__(self, model: Any, clip: Any, vae: Any, source: str = "ComfyUI MODEL", cache_size: int = 4096) -> None:
        unrun = sampling_patches(model)
        if unrun:
            raise ValueError(f"the MODEL carries what only ComfyUI's sampler runs: {'; '.join(unrun)}. Training calls "
                             "the network itself and would align a model without them: connect LoadShortcutModel to "
                             "the MODEL before the nodes that add them (e.g. straight from Load Checkpoint), and put "
                             "them after ApplyAlignedLoRA for sampling (a set to train on top of: apply it in mode "
                             "'merged')")
        if clip_hooks(clip):
            raise ValueError("the CLIP carries hooks (Set CLIP Hooks), which ComfyUI applies at sampling or by "
                             "schedule and a prompt encoded once for training does not: connect LoadShortcutModel's "
                             "clip before Set CLIP Hooks (a LoRA on the text encoder: load it with Load LoRA)")
        self.family = trainable_family(model)  # a static copy (bind) is of the same family
        check_vae(vae, self.family, model.model.latent_format)  # before anything loads
        self._caller = (model, vae)
        self.clip = clip
        self._syntax = prompt_syntax(clip)
        self.patcher: Any = None  # bound by bind(): the caller's MODEL, or its static copy
        self._placed = False  # prepare() placed the network and the VAE for training
        self.bind()
        self.info: dict[str, Any] = {}
        self.schedule = chain_schedule(self.sampling)
        self.text_encoders = [clip.cond_stage_model]
        # what identifies the model in a run's settings and the set's metadata: the family and a digest of the
        # MODEL, CLIP and VAE (their weights and the patches, such as LoRAs, they carry), a node's model sampling, and
        # how a node set the CLIP to encode (another last layer is other conditioning: another run, not a resume)
        self.source = (f"{source} ({self.family}, {fingerprint(self._fingerprinted())}{self._sampling_patch()}"
                       f"{text_options(clip)})")
        # SD2's v-prediction models are made for 768 px, its eps ones (SD2-base) for 512
        self.native_size = 512 if self.family == "sd2" and self.schedule.prediction_type == "epsilon" \
            else DEFAULT_SIZE[self.family]
        config = getattr(self.base.model_config, "unet_config", {})
        self.lora_names = diffusers_names(config) or None  # none for a transformer: its files use its module paths
        self.lora_targets = LORA_TARGETS.get(self.family)
        # a network distilled from CFG takes the guidance scale as an input, and samples without CFG
        self.distilled_guidance = DISTILLED_GUIDANCE if config.get("guidance_embed") else None
        self.adapter_order = self._diffusers_order()
        self.cache_size = cache_size
        self._conds: OrderedDict[tuple[str, int, int], dict[str, torch.Tensor]] = OrderedDict()

    def bind(self) -> None:
        """Work on the caller's MODEL and VAE, or where DynamicVRAM streams them, on static copies of them (loaded
        again after :meth:`release` dropped them). Cheap when they are bound already."""
        if self.patcher is not None:
            return
        model, vae = self._caller
        self.patcher, self.comfy_vae = static_copy(model, "MODEL"), static_vae(vae)
        self.base = self.patcher.model
        self.unet = self.base.diffusion_model
        self.vae = self.comfy_vae.first_stage_model
        self.sampling = model_sampling(self.patcher)  # its noise levels (a node's patch, such as zero-terminal SNR)
        self._sigmas = chain_sigmas(self.sampling)  # at the chain's levels
        self._placed = False

    @property
    def copies(self) -> dict[str, Any]:
        """The patchers of the static copies being worked on, by what they copy (none where nothing is streamed or
        nothing is bound)."""
        if self.patcher is None:
            return {}
        model, vae = self._caller
        return {what: mine for what, mine, theirs in (("MODEL", self.patcher, model),
                                                      ("VAE", self.comfy_vae.patcher, vae.patcher))
                if mine is not theirs}

    def release(self) -> None:
        """Once training is over, drop what it held beyond the caller's objects, so it does not stay for as long as
        ComfyUI caches the graph: the encoded prompts (encoded again when needed), and the static copies of a streamed
        MODEL or VAE (their weights on the GPU, or in host memory once ComfyUI offloads them; the next training's
        :meth:`bind`, which :meth:`prepare` calls, loads them again). The caller's own objects are kept."""
        self._conds.clear()
        copies = self.copies
        if not copies:
            return
        loaded = comfy.model_management.current_loaded_models
        for entry in [e for e in loaded if any(e.model is c for c in copies.values())]:
            loaded.remove(entry)  # gone with the copy, not moved to host memory first
            for finalizer in (entry.model_finalizer, getattr(entry, "_patcher_finalizer", None)):
                if finalizer is not None:
                    finalizer.detach()
        self.patcher = self.comfy_vae = self.base = self.unet = self.vae = None
        self._placed = False
        log.info("ShortFT: released the static copy of the streamed %s", " and ".join(copies))

    def _sampling_patch(self) -> str:
        """The model sampling a node patched in, as a part of the model's identity ('' for the network's own)."""
        if "model_sampling" not in self.patcher.object_patches:
            return ""
        levels = hashlib.sha256(self.schedule.alphas_cumprod.double().numpy().tobytes()).hexdigest()[:8]
        return f", {self.schedule.prediction_type} sampling {levels}"

    def _fingerprinted(self) -> list[tuple[torch.nn.Module, Mapping[str, Any]]]:
        clip_patcher = getattr(self.clip, "patcher", None)
        return [(self.unet, self.patcher.patches), (self.clip.cond_stage_model, getattr(clip_patcher, "patches", {})),
                (self.vae, {})]

    def _diffusers_order(self) -> list[str] | None:
        """The diffusion model's module paths in the order the library's diffusers UNet of this family registers
        them, so a seed gives the LoRA set the CLI would start from (None where no diffusers config is known)."""
        if self.lora_names is None or self.family not in ("tiny", "sd15", "sdxl"):
            return None
        if self.family == "tiny":
            config = json.loads((tiny_weights_dir() / "pipeline" / "unet" / "config.json").read_text(encoding="utf-8"))
        else:
            config = bundled_config(self.family, "unet")
        path_of = {name: path for path, name in self.lora_names.items()}
        return [path_of[name] for name in diffusers_module_order(config) if name in path_of]

    # ----- placement ------------------------------------------------------------------------------------------------
    def prepare(self, prompts: Sequence[str] = (), size: tuple[int, int] | None = None,
                progress: Callable[[int, int], None] | None = None) -> None:
        """Encode ``prompts`` at image ``size`` first (at most ``cache_size`` of them; the rest are encoded on first
        use; ``progress(done, total)`` after each), then place the network and the VAE where ComfyUI computes (whole,
        no streaming) and make their weights ordinary tensors, so gradients can flow through them. Encoding first
        spares the text encoder's loads during training; a prompt beyond the cache is encoded when first used, with
        the network and the VAE kept in place."""
        self.bind()
        wanted = list(dict.fromkeys(prompts))
        first = wanted[: self.cache_size]
        for done, prompt in enumerate(first, 1):
            self._encode_one(prompt, size)
            if progress is not None:
                progress(done, len(first))
        if len(wanted) > self.cache_size:
            log.warning("ShortFT: %d prompts, %d encoded before training (the prompt cache's size); the others are "
                        "encoded on first use", len(wanted), self.cache_size)
        comfy.model_management.load_models_gpu([self.patcher, self.comfy_vae.patcher], force_full_load=True)
        partial = [what for what, m in (("MODEL", self.base), ("VAE", self.vae)) if getattr(m, "model_lowvram", False)]
        if partial:
            raise ValueError(f"ComfyUI placed only part of the {' and '.join(partial)} on "
                             f"{self.patcher.load_device} and streams the rest per layer (--novram does so); "
                             "training keeps the whole network and VAE on the device: start ComfyUI without "
                             "--novram (--lowvram trains: ShortFT asks for a full load)")
        if self.base.model_sampling is not self.sampling:
            raise RuntimeError("the loaded MODEL samples with another model sampling than its patcher names")
        self._placed = True
        count = ordinary_tensors_(self.unet) + ordinary_tensors_(self.vae)
        if count:
            log.info("ShortFT: %d tensors of the MODEL and VAE re-registered outside inference mode", count)

    @contextlib.contextmanager
    def _kept_in_place(self) -> Iterator[None]:
        """Once prepare() placed them, the network being trained and the VAE are no candidates for ComfyUI's
        unloading while the block runs (a prompt encoded mid-run loads the text encoder, and on a full GPU ComfyUI
        frees memory by moving the least used models off it, which would move trained weights, their LoRA layers
        and the optimizer's tensors apart). Their entries leave ComfyUI's list of loaded models for the block and
        return to its head after, however it ends; the memory they hold stays visible to ComfyUI as used device
        memory, so the text encoder loads into what is free (partly, when little is)."""
        loaded = comfy.model_management.current_loaded_models
        ours = (self.base, self.vae)
        held = [entry for entry in loaded if entry.model is not None
                and any(entry.model.model is m for m in ours)] if self._placed else []
        for entry in held:
            loaded.remove(entry)
        try:
            yield
        finally:
            loaded[0:0] = [entry for entry in held if entry not in loaded]

    @property
    def device(self) -> torch.device:
        """Where the network's weights are; while nothing is bound (:meth:`release`), where ComfyUI computes with the
        caller's MODEL, so a run can be checked without loading a static copy."""
        if self.unet is None:
            return self._caller[0].load_device
        return super().device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network computes in, which the LoRA adapters take: ComfyUI's manual-cast dtype where it or a
        node set one (fp16 weights on a CPU compute in fp32, fp8 weights in fp16, bf16 or fp32), else the weights'
        (the caller's MODEL's while nothing is bound: a static copy has its dtype and options)."""
        patcher = self.patcher if self.patcher is not None else self._caller[0]
        return patcher.get_model_object("manual_cast_dtype") or patcher.model.get_dtype()

    @property
    def latent_dtype(self) -> torch.dtype:
        """fp32, whatever the network computes in, as ComfyUI's samplers keep their latents. A jump recovers x0 by
        dividing by sqrt(abar_t), which magnifies the latents' rounding as much: 15x at t = 999 on SD's schedule, 4500x
        under zero terminal SNR (ModelSamplingDiscrete's zsnr, v-prediction checkpoints made with it), where fp16 or
        bf16 latents would move the first jump by 12-17 % (BENCHMARKS.md)."""
        return torch.float32

    @property
    def fp16_backward(self) -> bool:
        return self.dtype == torch.float16 or next(self.vae.parameters()).dtype == torch.float16

    def enable_lean_activations(self, devices: tuple[str, ...] | None = LEAN_DEVICES) -> int:
        """The library's lean layers on ComfyUI's own classes (see :func:`lean_layers`), and, on any device, the cast
        path for ComfyUI's fp8 matmul layers, whose own path has no backward (:func:`differentiable_fp8_layers`), and
        affine-free LayerNorms that keep their output for backward (:func:`residual_safe_norms`): the training-only
        forwards the trainer installs and the session removes."""
        differentiable_fp8_layers(self.unet)
        residual_safe_norms(self.unet)
        return lean_layers(self.unet, devices) + lean_layers(self.vae, devices)

    @property
    def latent_format(self) -> Any:
        return self.base.latent_format

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        factor = int(self.comfy_vae.downscale_ratio)
        size = self.native_size
        h, w = height or size, width or size
        if h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} must be a multiple of the VAE factor {factor}")
        return (int(self.latent_format.latent_channels), h // factor, w // factor)

    # ----- text ---------------------------------------------------------------------------------------------------
    @interruptible
    def _encode_one(self, prompt: str, size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        height, width = size or (self.native_size,) * 2
        key = (prompt, height, width)
        hit = self._conds.get(key)
        if hit is not None:
            self._conds.move_to_end(key)
            return hit
        with torch.no_grad():
            with self._kept_in_place():
                out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
            c, h, w = self.latent_shape(height, width)
            extra = {} if self.distilled_guidance is None else {"guidance": self.distilled_guidance}
            conds = self.base.extra_conds(cross_attn=out["cond"], pooled_output=out.get("pooled_output"),
                                          width=width, height=height, device=self.device,
                                          noise=torch.zeros(1, c, h, w, device=self.device), **extra)
        # kept in host memory, as ComfyUI keeps conditioning between nodes: thousands of prompts would hold
        # gigabytes of the device (SDXL: 0.6 MiB each, fp32); a batch's are moved to the device when used
        found = {k: v.cond.detach().to("cpu") for k, v in conds.items()}
        if "c_crossattn" not in found:
            raise ValueError(f"the {self.family} MODEL gave no cross-attention conditioning")
        self._conds[key] = found
        while len(self._conds) > self.cache_size:
            self._conds.popitem(last=False)
        return found

    def reward_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The prompts without ComfyUI's prompt syntax, which the CLIP reads and a reward does not
        (:func:`plain_prompt`)."""
        return [plain_prompt(p, *self._syntax) for p in prompts]

    def encode_prompts(self, prompts: Sequence[str], *, size: tuple[int, int] | None = None) -> Conditioning:
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        each = [self._encode_one(p, size) for p in prompts]
        # a prompt over 75 tokens is encoded in several chunks: batched as ComfyUI batches it (tiled_tokens)
        hidden = torch.cat(tiled_tokens([e["c_crossattn"] for e in each])).to(self.device)
        added = {k: torch.cat([e[k] for e in each]).to(self.device) for k in each[0] if k != "c_crossattn"} or None
        return Conditioning(hidden, added)

    # ----- networks -------------------------------------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
            unet: torch.nn.Module | None = None) -> torch.Tensor:
        return self.predict(x, t, cond, unet=unet)[0]

    @interruptible
    def predict(self, x: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
                unet: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """eps from the MODEL's denoised output at the chain's latent ``x`` (see the module docstring), and that
        output itself at a flow model's level of pure noise, where eps is the latent and says nothing of x0."""
        if unet is not None and unet is not self.unet:
            raise ValueError("a ComfyUI MODEL is called through its own apply_model (no DDP wrapper)")
        tt = torch.as_tensor(t, device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        # the conversions run in fp32 whatever the latents' dtype: at small sigma eps = (x_ve - x0) / sigma cancels
        # almost all of x_ve, so in fp16 or bf16 x0's rounding would reach eps magnified 1 / sigma times (33x at
        # t = 1); apply_model casts the network's input to the network's dtype and returns x0 in fp32
        sigma = self._sigmas.to(x.device)[tt.long()].float()
        shape = (-1, *([1] * (x.ndim - 1)))
        flow = self.schedule.prediction_type == "flow"
        # the MODEL's own latent at its level: x_ve = x / sqrt(abar) for the discrete models, the flow latent
        # x sqrt((1 - f)^2 + f^2) for flow level f = sigma
        scale = (((1.0 - sigma) ** 2 + sigma**2) if flow else (1.0 + sigma**2)).sqrt().reshape(shape)
        x_in = x.float() * scale
        extra = dict(cond.added or {})
        options = {"optimized_attention_override": differentiable_attention}
        with comfy_training(torch.is_grad_enabled()):  # a call that backward runs through
            denoised = self.base.apply_model(x_in, sigma, c_crossattn=cond.hidden, transformer_options=options,
                                             **extra)
        denoised = denoised.float()
        if not flow:
            return ((x_in - denoised) / sigma.reshape(shape)).to(x.dtype), None
        eps = (x_in - (1.0 - sigma).reshape(shape) * denoised) / sigma.reshape(shape)
        top = bool((sigma == 1.0).any())  # pure noise: the chain steps with the MODEL's x0 there
        return eps.to(x.dtype), (denoised.to(x.dtype) if top else None)

    @interruptible
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE may lie on another device than the network (``--cpu-vae`` keeps it on the CPU): the latents go to
        it and the images come back, so the gradient crosses devices as it does for a reward elsewhere."""
        z = self.base.process_latent_out(latents)
        weight = next(self.vae.parameters())
        image = self.vae.decode(z.to(weight.device, weight.dtype))
        return ((image.to(latents.device, torch.float32) + 1.0) / 2.0).clamp(0, 1)

    blocks_change_inputs = True  # FLUX's and the MMDiT's blocks add to their input streams in place

    def network_blocks(self) -> list[torch.nn.Module]:
        """The blocks ComfyUI's networks are built of: a UNet's ResNet and transformer blocks (``ResBlock``,
        ``SpatialTransformer``), an MMDiT's joint blocks, FLUX's double- and single-stream blocks."""
        from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock
        from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        kinds = (ResBlock, comfy_attention.SpatialTransformer, JointBlock, DoubleStreamBlock, SingleStreamBlock)
        return [m for m in self.unet.modules() if isinstance(m, kinds)]

    def block_replay(self, block: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
        """The block's adapters, and what :meth:`predict` sets around a call with gradient: ComfyUI's training switch
        (the recomputation runs in backward, outside that call) and an interrupt taken as a stop request."""
        adapters = super().block_replay(block)

        @contextlib.contextmanager
        def reinstate() -> Iterator[None]:
            with adapters(), comfy_training():
                try:
                    yield
                except comfy.model_management.InterruptProcessingException:
                    raise StopRequested from None

        return reinstate

    def enable_decoder_checkpointing(self) -> None:
        """Recompute the VAE decoder's middle and upsampling blocks (ResNet, attention, upsample) in backward, one at
        a time, so the decode's backward keeps each block's input instead of every activation at full resolution.
        The blocks' forwards are instance overrides, which the training session removes when it ends."""
        decoder = getattr(self.vae, "decoder", None)
        mid, ups = getattr(decoder, "mid", None), getattr(decoder, "up", None)
        if mid is None or ups is None:
            raise ValueError(f"checkpoint_vae: this VAE's decoder ({type(decoder).__name__}) has no middle and "
                             "upsampling blocks to recompute; turn VAE checkpointing off")
        blocks = [getattr(mid, name) for name in ("block_1", "attn_1", "block_2") if hasattr(mid, name)]
        for level in ups:
            blocks += [*level.block, *level.attn]
            if hasattr(level, "upsample"):
                blocks.append(level.upsample)
        count = checkpoint_blocks(blocks)
        log.info("ShortFT: %d blocks of the VAE decoder recomputed in backward", count)

    def offload_text_encoders(self, cache_size: int = 1024) -> int:
        """ComfyUI's model management places the text encoder itself (loaded to encode, offloadable after): only
        the prompt cache's size changes."""
        self.cache_size = cache_size
        return 0

    # ----- LoRA files -----------------------------------------------------------------------------------------------
    def load_lora(self, source: Any, adapter_name: str, trainable: bool = False,
                  activate: bool = True) -> LoadedLora:
        """A LoRA file of any layout ComfyUI reads, as peft adapter ``adapter_name`` on the diffusion model; every
        key must land on a weight (ComfyUI's key map and ``lora_patches`` check it). LoRAs on parts of one fused
        weight (diffusers' separate q, k and v on MMDiT's qkv) become one LoRA on it (:func:`fused_lora`)."""
        path = str(source)
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        key_map = comfy.lora.model_lora_keys_unet(self.base, {})
        patches = lora_patches(sd, source, self.patcher, key_map)
        parts: dict[str, list[tuple[tuple[int, int, int] | None, LoraModule]]] = {}
        for key, patch in patches.items():
            weights = getattr(patch, "weights", None)
            name = key if isinstance(key, str) else key[0]
            if getattr(patch, "name", None) != "lora" or weights is None or any(w is not None for w in weights[3:]) \
                    or (not isinstance(key, str) and (len(key) > 2 or key[1][0] != 0)):
                raise ValueError(f"{path}: {name} is not a plain LoRA (up, down, alpha) on a weight or on rows of "
                                 "a fused one; ShortFT loads plain LoRAs")
            up, down, alpha = weights[0], weights[1], weights[2]
            rank = down.shape[0]
            module = LoraModule(down.float(), up.float(), float(alpha) if alpha is not None else float(rank))
            parts.setdefault(name, []).append((None if isinstance(key, str) else tuple(key[1][:3]), module))
        modules = {}
        for name, found in parts.items():
            module_path = name.removeprefix("diffusion_model.").removesuffix(".weight")
            whole = len(found) == 1 and found[0][0] is None
            modules[module_path] = found[0][1] if whole else \
                fused_lora(found, int(comfy.utils.get_attr(self.base, name).shape[0]))
        # stored in the dtype the network computes in, not its weights' (which may be fp8)
        load_lora_modules(self.unet, modules, adapter_name, trainable=trainable, dtype=self.dtype, activate=activate,
                          source=path)
        named = {self.lora_names.get(m, m) if self.lora_names else m: v for m, v in modules.items()}
        return LoadedLora(adapter_name, path, "comfyui", lora_base_family(named), named, lora_metadata(path))


def fused_lora(parts: Sequence[tuple[tuple[int, int, int] | None, LoraModule]], rows: int) -> LoraModule:
    """One LoRA on a fused weight of ``rows`` output rows from LoRAs on row blocks of it (``(0, offset, size)``; None:
    all rows): their down matrices stacked, their up matrices, scaled, placed block-diagonally at their rows, rank
    the sum of theirs and scale 1. The same delta as ComfyUI's patches by part (exact: no rank is lost)."""
    downs, width = [], sum(m.down.shape[0] for _, m in parts)
    first = parts[0][1].up
    up = torch.zeros((rows, width, *first.shape[2:]), dtype=torch.float32)
    column = 0
    for offset, m in parts:
        _, start, size = offset if offset is not None else (0, 0, rows)
        rank = m.down.shape[0]
        up[start:start + size, column:column + rank] = m.up.float() * (m.alpha / rank)
        downs.append(m.down.float())
        column += rank
    return LoraModule(torch.cat(downs), up, float(width))
