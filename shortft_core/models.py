"""The model seam: :class:`DiffusionModel`, what the chain, the trainer and every method need of a text-to-image
model whatever runs it, and :class:`T2IModel`, its implementation on diffusers / transformers modules.

Every part of the project (sampler, trainer, distillation, evaluation) talks to a :class:`DiffusionModel`, never to
a pipeline object: a noise prediction at a timestep of the model's schedule (whatever the network predicts), frozen
text encoding, a differentiable latent decode, the latent shape, and the network whose layers take the adapters.
:class:`T2IModel` serves the tiny world, SD1.5 and SDXL from local files (nothing here reaches a hub: a missing file
is reported with where it was looked for); the ComfyUI pack implements the same seam over the MODEL, CLIP and VAE
that ComfyUI loaded, so one chain executor and one trainer serve both (in the spirit of k-diffusion's model
wrappers).
"""

from __future__ import annotations

import abc
import logging
import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch

from .adapters import replay_active_adapters
from .memory import DEFAULT_DEVICES, checkpoint_blocks, lean_saved_activations
from .schedule import NoiseSchedule

log = logging.getLogger(__name__)

TINY = "tiny"
# the training settings' mixed_precision values -> the dtype the base weights are loaded in (LoRAs stay fp32)
PRECISION = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device) -> torch.device:
    """A device by name: ``auto`` (cuda when available), cpu, cuda, cuda:1 ...; CUDA must exist here."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: CUDA is not available on this machine; use cpu")
    return dev


def tiled_tokens(hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cross-attention states of different token counts (a prompt over 75 tokens is encoded in several 77-token
    chunks by ComfyUI's CLIP) brought to one count, so they batch: each is repeated along its tokens up to their
    least common multiple. Exact for unmasked attention (a repeated key and value leave the softmax-weighted mean as
    it was), and what ComfyUI's sampler does when it batches such conditioning."""
    counts = {int(h.shape[1]) for h in hidden}
    if len(counts) <= 1:
        return list(hidden)
    tokens = math.lcm(*counts)
    return [h.repeat(1, tokens // h.shape[1], *([1] * (h.ndim - 2))) if h.shape[1] != tokens else h for h in hidden]


@dataclass
class Conditioning:
    """Text conditioning for the UNet: cross-attention states plus, for SDXL, the added embeddings."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def cat(self, other: "Conditioning") -> "Conditioning":
        added = None
        if self.added is not None and other.added is not None:
            added = {k: torch.cat([self.added[k], other.added[k]]) for k in self.added}
        return Conditioning(torch.cat(tiled_tokens([self.hidden, other.hidden])), added)

    def repeat(self, n: int) -> "Conditioning":
        """Repeat a batch-1 conditioning ``n`` times (e.g. the empty prompt for CFG)."""
        added = None if self.added is None else {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()}
        return Conditioning(self.hidden.expand(n, *self.hidden.shape[1:]), added)

    def index(self, idx: torch.Tensor | slice) -> "Conditioning":
        added = None if self.added is None else {k: v[idx] for k, v in self.added.items()}
        return Conditioning(self.hidden[idx], added)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        added = None if self.added is None else {k: v.to(device, dtype) for k, v in self.added.items()}
        return Conditioning(self.hidden.to(device, dtype), added)


class TextEncoderOffload:
    """Keeps frozen text encoders in host memory and lends them to the compute device for each encoding.

    Prompts are encoded once per batch, yet resident encoders would sit on the GPU through every backward (SDXL's
    two: 1.5 GiB in bf16). Each weight lives in a host tensor (pinned when the device is CUDA); a lend points every
    parameter and buffer at a device copy and the return points it back, so nothing is ever copied device -> host.
    Encoded prompts are kept in a host-side LRU cache, one prompt per entry: a prompt seen before costs neither
    a transfer nor an encoder call, and each prompt is encoded on its own, so its conditioning does not depend on
    which batch or which cache state it met (exact resume stays exact).
    """

    def __init__(self, encoders: Sequence[torch.nn.Module], device: torch.device | str, cache_size: int = 1024) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.device = torch.device(device)
        self.cache_size = cache_size
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.tensors: list[torch.Tensor] = []
        for enc in encoders:
            if any(p.requires_grad for p in enc.parameters()):
                raise ValueError("text encoders with trainable parameters cannot be offloaded (their gradients "
                                 "would be lost); freeze them first")
            self.tensors += list(enc.parameters()) + list(enc.buffers())
        self.host = [self._to_host(t.data) for t in self.tensors]
        for t, h in zip(self.tensors, self.host):
            t.data = h

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        h = t.detach().to("cpu")
        return h.pin_memory() if self.device.type == "cuda" else h

    @property
    def nbytes(self) -> int:
        """Bytes the encoders would occupy on the device (what offloading saves there)."""
        return sum(h.numel() * h.element_size() for h in self.host)

    def retarget(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Follow the model to another device or floating dtype (host copies re-made as needed)."""
        if device is not None:
            self.device = torch.device(device)
        new = []
        for h in self.host:
            if dtype is not None and h.is_floating_point() and h.dtype != dtype:
                h = h.to(dtype)
            if self.device.type == "cuda" and not h.is_pinned():
                h = h.pin_memory()
            new.append(h)
        self.host = new
        for t, h in zip(self.tensors, self.host):
            t.data = h
        self.cache.clear()

    @contextmanager
    def lent(self) -> Iterator[None]:
        """The encoders on the device for the duration of the block, back in host memory after it."""
        try:
            for t, h in zip(self.tensors, self.host):
                t.data = h.to(self.device, non_blocking=True)
            yield
        finally:
            for t, h in zip(self.tensors, self.host):
                t.data = h

    def lookup(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A prompt's cached (hidden, pooled) features, or None."""
        hit = self.cache.get(prompt)
        if hit is not None:
            self.cache.move_to_end(prompt)
        return hit

    def store(self, prompt: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> None:
        """Keep one prompt's features (host tensors), dropping the least recently used beyond ``cache_size``."""
        if self.cache_size == 0:
            return
        self.cache[prompt] = (hidden, pooled)
        self.cache.move_to_end(prompt)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)


class DiffusionModel(abc.ABC):
    """The seam between a text-to-image model and the chain, the trainer and every method.

    An implementation provides the attributes below and the abstract methods. ``unet`` is the denoising network (a
    UNet or a transformer) whose layers take the LoRA adapters, ``vae`` the module the decode runs through,
    ``text_encoders`` the frozen encoders; :meth:`eps` is the noise prediction at a timestep of ``schedule`` (the
    network's own prediction type converted), so the chain steps every model the same way; :meth:`predict` adds the
    model's x0 where eps cannot give it (a flow model's level of pure noise). ``lora_names`` maps the
    network's module paths to the diffusers module names LoRA files use (None: they are the same), so sets trained
    on any backend are written in one format; ``adapter_order`` lists the network's module paths in the order the
    diffusers implementation of the same network registers them (None: its own), so a seed initialises the same
    LoRA set on either backend. ``lora_targets`` names the module-name suffixes the alignment set adapts where the
    network is no UNet (None: the UNet's attention and feed-forward layers, ``ATTENTION_FF_TARGETS``)."""

    family: str
    source: str
    info: dict[str, Any]
    schedule: NoiseSchedule
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    text_offload: "TextEncoderOffload | None" = None
    lora_names: Mapping[str, str] | None = None
    adapter_order: Sequence[str] | None = None  # module paths in the reference network's order (add_lora's order)
    lora_targets: Sequence[str] | None = None  # the alignment set's targets on this network (None: the UNet's)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_dtype(self) -> torch.dtype:
        """The dtype of the chain's latents (its noise, jumps and steps; the network casts its input to its own
        dtype): the network's here."""
        return self.dtype

    @property
    def fp16_backward(self) -> bool:
        """Whether training's backward pass runs through float16 arithmetic (the network or the decoder computes in
        fp16), where the loops scale the loss so that small gradients keep their precision."""
        return any(next(m.parameters()).dtype == torch.float16 for m in (self.unet, self.vae))

    def parts(self) -> list[torch.nn.Module]:
        """Every module training may touch (for :class:`~shortft_core.lifecycle.ModelState`)."""
        return [self.unet, self.vae, *self.text_encoders]

    def enable_lean_activations(self, devices: tuple[str, ...] | None = DEFAULT_DEVICES) -> int:
        """Give the network's and the VAE's layers the memory module's lean forwards, taken on ``devices`` (None:
        any; CUDA by default): same values, less kept for backward. Returns how many layers were switched."""
        return lean_saved_activations(self.unet, self.vae, devices=devices)

    @abc.abstractmethod
    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(channels, h, w) of the latent of an image (default: the model's native size)."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str], *, size: tuple[int, int] | None = None) -> "Conditioning":
        """Frozen text conditioning of a batch of prompts for images of ``size`` (h, w; None: the native size),
        which size-conditioned families (SDXL) take in."""

    @abc.abstractmethod
    def eps(self, x: torch.Tensor, t: torch.Tensor | int, cond: "Conditioning",
            unet: torch.nn.Module | None = None) -> torch.Tensor:
        """The noise prediction at latent ``x``, timestep(s) ``t`` of ``schedule`` (``unet``: the module to call
        instead of ``self.unet``, e.g. a DDP wrapper, where the backend calls the network itself)."""

    def predict(self, x: torch.Tensor, t: torch.Tensor | int, cond: "Conditioning",
                unet: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`eps`, and the model's clean sample x0 where the schedule cannot recover it from eps (a level of pure
        noise, abar 0: a flow model's first), else None."""
        return self.eps(x, t, cond, unet=unet), None

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable)."""

    @abc.abstractmethod
    def load_lora(self, source: Any, adapter_name: str, trainable: bool = False, activate: bool = True) -> Any:
        """A LoRA file as peft adapter ``adapter_name`` on :attr:`unet`, read by this backend's key maps; returns a
        :class:`~shortft_core.lora_io.LoadedLora` whose modules carry diffusers names."""

    def reward_prompts(self, prompts: Sequence[str]) -> list[str]:
        """The prompts as a reward reads them: the text itself, without what only this model's text encoder reads in
        it (a host's prompt syntax, such as ComfyUI's weights). Here: the prompts as given."""
        return list(prompts)

    def encode_images(self, images: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> latents (distillation from images needs it)."""
        raise NotImplementedError(f"{type(self).__name__} does not encode images")

    def network_blocks(self) -> Sequence[torch.nn.Module]:
        """The network's blocks that gradient checkpointing recomputes one at a time (:meth:`block_checkpointing`);
        empty where the backend names none, and the chain then recomputes whole network calls."""
        return ()

    blocks_change_inputs = False  # whether the network's blocks add to their input in place (then run on copies)

    def block_replay(self, block: torch.nn.Module) -> Callable[[], ContextManager]:
        """What a block's recomputation in backward must see again of its forward (see ``memory.Replay``): the
        adapters its LoRA layers used."""
        return replay_active_adapters(block)

    def enable_block_checkpointing(self) -> int:
        """Make the network's blocks recomputable one at a time, for the calls made inside
        :meth:`block_checkpointing`: such a call keeps each block's input, and its backward holds one block's
        activations at a time instead of a whole call's. Returns how many blocks were wrapped (0: none named)."""
        blocks = list(self.network_blocks())
        return checkpoint_blocks(blocks, when=lambda: getattr(self, "_blockwise_depth", 0) > 0,
                                 fresh_inputs=self.blocks_change_inputs, replay=self.block_replay)

    @contextmanager
    def block_checkpointing(self) -> Iterator[None]:
        """Network calls inside checkpoint their blocks, where :meth:`enable_block_checkpointing` wrapped them."""
        self._blockwise_depth = getattr(self, "_blockwise_depth", 0) + 1
        try:
            yield
        finally:
            self._blockwise_depth -= 1

    def enable_decoder_checkpointing(self) -> None:
        """Recompute the decoder's blocks in backward (less memory for the decode's backward)."""
        raise ValueError(f"checkpoint_vae (--checkpoint-vae) is not available for a {type(self).__name__}")

    def offload_text_encoders(self, cache_size: int = 1024) -> int:
        """Keep the text encoders off the compute device between encodings; returns the bytes freed there."""
        raise ValueError(f"offload_text_encoders (--offload-text-encoders) is not available for a "
                         f"{type(self).__name__}")

    def onload_text_encoders(self) -> None:
        """Undo :meth:`offload_text_encoders`."""

    def requires_grad_(self, flag: bool) -> "DiffusionModel":
        for m in self.parts():
            m.requires_grad_(flag)
        return self


@dataclass
class T2IModel(DiffusionModel):
    """The parts of an SD-family latent diffusion model that ShortFT needs, as diffusers / transformers modules."""

    family: str  # "tiny" | "sd15" | "sdxl"
    tokenizers: list[Any]
    text_encoders: list[torch.nn.Module]
    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: NoiseSchedule
    scheduler_config: dict[str, Any]
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    text_offload: TextEncoderOffload | None = field(default=None, repr=False)  # see offload_text_encoders

    # ----- properties -----------------------------------------------------------------------------------------
    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.default_size, width or self.default_size
        if h % self.vae_scale or w % self.vae_scale:
            raise ValueError(f"image size {h}x{w} must be a multiple of the VAE factor {self.vae_scale}")
        return (self.latent_channels, h // self.vae_scale, w // self.vae_scale)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "T2IModel":
        offloaded = self.text_offload is not None
        # only the arguments given: diffusers warns about fp32 modules whenever a dtype keyword is present, even None
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in [self.unet, self.vae, *([] if offloaded else self.text_encoders)]:
            m.to(**kw)
        if offloaded:
            self.text_offload.retarget(device, dtype)
        return self

    def offload_text_encoders(self, cache_size: int = 1024) -> int:
        """Keep the text encoders in host memory, lent to the device only while a new prompt is encoded, with an
        LRU cache of ``cache_size`` encoded prompts (frees their weights on the GPU: 1.5 GiB for SDXL in bf16, 0.2
        GiB for SD1.5). Returns the bytes freed on the device; calling it again changes only the cache size."""
        if self.text_offload is None:
            on_device = self.text_encoders and next(self.text_encoders[0].parameters()).device == self.device
            self.text_offload = TextEncoderOffload(self.text_encoders, self.device, cache_size)
            freed = self.text_offload.nbytes if on_device and self.device.type != "cpu" else 0
            log.info("text encoders kept in host memory (%.2f GiB), lent to %s per new prompt; cache of %d prompts",
                     self.text_offload.nbytes / 2**30, self.device, cache_size)
            return freed
        self.text_offload.cache_size = cache_size
        return 0

    def onload_text_encoders(self) -> None:
        """Undo :meth:`offload_text_encoders`: the encoders resident on the model's device again, the cache dropped."""
        off = self.text_offload
        if off is None:
            return
        for t, h in zip(off.tensors, off.host):
            t.data = h.to(self.device)
        self.text_offload = None

    def network_blocks(self) -> list[torch.nn.Module]:
        """The UNet's ResNet blocks and transformer blocks (each ``Transformer2DModel``, its attention and
        feed-forward layers with it)."""
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return [m for m in self.unet.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]

    def enable_decoder_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()

    def load_lora(self, source: Any, adapter_name: str, trainable: bool = False, activate: bool = True) -> Any:
        from .lora_io import load_lora_adapter

        return load_lora_adapter(self.unet, source, adapter_name, trainable=trainable, activate=activate)

    # ----- text ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], *, size: tuple[int, int] | None = None,
                       original_size: tuple[int, int] | None = None,
                       crop_top_left: tuple[int, int] = (0, 0)) -> Conditioning:
        """Frozen text encoding of a batch of prompts (SD1.5: the last hidden state of CLIP-L).

        SDXL: both encoders' penultimate hidden states concatenated (768 + 1280), the pooled projection of the
        second as ``text_embeds`` and ``time_ids`` = (original size, crop top-left, target size), each (h, w);
        ``size`` is the target image size (default: the model's native size), ``original_size`` defaults to it.
        """
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a list of prompts, not a single string")
        prompts = list(prompts)
        if self.family == "sdxl" and (len(self.tokenizers) != 2 or len(self.text_encoders) != 2):
            raise ValueError("an SDXL model needs two tokenizers and two text encoders")
        hidden, pooled = self._text_features(prompts)
        hidden = hidden.to(self.device, self.dtype)
        if self.family != "sdxl":
            return Conditioning(hidden)
        target = tuple(size) if size is not None else (self.default_size, self.default_size)
        original = tuple(original_size) if original_size is not None else target
        time_ids = torch.tensor([[*original, *crop_top_left, *target]], device=self.device, dtype=self.dtype)
        added = {"text_embeds": pooled.to(self.device, self.dtype), "time_ids": time_ids.expand(len(prompts), -1)}
        return Conditioning(hidden, added)

    def _text_features(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, SDXL's pooled embedding or None) for the prompts; through the offload cache if any."""
        off = self.text_offload
        if off is None:
            return self._encode_text(prompts)
        found = {p: off.lookup(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, v in found.items() if v is None]
        if missing:
            with off.lent():
                for p in missing:  # one at a time: a prompt's features never depend on its batch
                    h, pooled = self._encode_text([p])
                    found[p] = (h[0].cpu(), None if pooled is None else pooled[0].cpu())
                    off.store(p, *found[p])
        hidden = torch.stack([found[p][0] for p in prompts]).to(self.device)
        pooled = None if found[prompts[0]][1] is None else torch.stack([found[p][1] for p in prompts]).to(self.device)
        return hidden, pooled

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoders themselves: SD1.5's last hidden state, or SDXL's two penultimate ones and pooled output."""
        if self.family != "sdxl":
            tok, enc = self.tokenizers[0], self.text_encoders[0]
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            return enc(ids).last_hidden_state, None
        hidden = []
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
        pooled = getattr(out, "text_embeds", None)  # the second encoder's projected pooled output
        if pooled is None:
            raise TypeError("SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_embeds)")
        return torch.cat([h.to(self.device, self.dtype) for h in hidden], dim=-1), pooled

    # ----- networks -----------------------------------------------------------------------------------------
    def eps(self, x: torch.Tensor, t: torch.Tensor | int, cond: Conditioning,
            unet: torch.nn.Module | None = None) -> torch.Tensor:
        """The noise prediction at ``x``, timestep(s) ``t``: the UNet's output as its schedule's prediction type
        reads it (a v model's v is turned into eps); ``unet`` overrides the module called (e.g. a DDP-wrapped one)."""
        net = unet if unet is not None else self.unet
        tt = torch.as_tensor(t, device=x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        kwargs = {} if cond.added is None else {"added_cond_kwargs": cond.added}
        out = net(x, tt, encoder_hidden_states=cond.hidden, return_dict=False, **kwargs)[0]
        return self.schedule.eps_from(out, x, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable)."""
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        img = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (posterior mean unless ``sample``)."""
        cfg = self.vae.config
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
