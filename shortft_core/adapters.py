"""LoRA adapters on the UNet (peft): the frozen shortcut and the timestep-aware alignment set.

Several adapters live on one UNet at once. Which of them a UNet call uses is switched per chain step by
:class:`AdapterSwitch`, which only sets each LoRA layer's active list: unlike peft's ``set_adapter`` it never
touches ``requires_grad``, so the frozen shortcut stays frozen and the trainable set stays trainable whatever is
active. The base weights are never trained.

The alignment set has ``k`` adapters ``align_1 .. align_k``, one per trajectory segment. In timestep-aware mode
the set active in segment ``j`` is ``align_1 .. align_j`` (stacked, as in the paper); in single mode one adapter
``align_1`` serves every timestep.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from .segments import Segments

ATTENTION_FF_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# Consistency-distilled shortcuts (LCM / PCM / Hyper-SD LoRAs) also adapt the ResNet blocks.
SHORTCUT_TARGETS: tuple[str, ...] = ATTENTION_FF_TARGETS + (
    "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
    "upsamplers.0.conv",
)
SHORTCUT_ADAPTER = "shortcut"


def lora_config(rank: int, alpha: float | None = None, targets: Sequence[str] = ATTENTION_FF_TARGETS):
    """A peft LoraConfig (B initialised to zero, so a new adapter starts as the identity)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), target_modules=list(targets),
                      init_lora_weights=True, lora_dropout=0.0)


def inject_adapter(net: torch.nn.Module, config, name: str) -> None:
    """Add the peft adapter ``name`` with ``config`` to ``net``: through diffusers' own adapter methods on a diffusers
    model, through peft's injection on any other module tree (e.g. the network of a ComfyUI MODEL), which then
    carries the same ``peft_config`` bookkeeping."""
    if hasattr(net, "add_adapter") and hasattr(net, "delete_adapters"):
        net.add_adapter(config, adapter_name=name)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, net, adapter_name=name)
    if name not in (getattr(net, "peft_config", None) or {}):
        raise ValueError(f"peft injected no adapter {name!r}: no module matched {config.target_modules}")


def add_lora(unet: torch.nn.Module, name: str, rank: int, alpha: float | None = None,
             targets: Sequence[str] = ATTENTION_FF_TARGETS, seed: int | None = None,
             order: Sequence[str] | None = None) -> list[torch.nn.Parameter]:
    """Inject a new LoRA adapter ``name`` into ``unet``; returns its parameters (left trainable, in fp32).

    With ``seed`` the initial weights are deterministic; ``order`` (module paths of ``unet`` in the order another
    implementation of the same network registers them, e.g. the diffusers UNet a ComfyUI MODEL corresponds to)
    makes them the values that network would get for the same seed (:func:`initialise_in_order`)."""
    if name in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet already has an adapter named {name!r}")
    flags = {id(p): p.requires_grad for p in unet.parameters()}  # add_adapter's set_adapter flips other adapters
    fork = torch.random.fork_rng() if seed is not None else contextlib.nullcontext()
    with fork, warnings.catch_warnings():
        # several adapters on one UNet is the design here (shortcut + alignment set), not the accident peft warns of
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter(unet, lora_config(rank, alpha, targets), name)
    for p in unet.parameters():
        if id(p) in flags:
            p.requires_grad_(flags[id(p)])
    params = adapter_parameters(unet, name)
    if not params:
        raise ValueError(f"no module of the UNet matched the LoRA targets {list(targets)}")
    for p in params:  # trainable: fp32 whatever the base's dtype (an optimizer step can be below bf16's resolution)
        p.data = p.data.float()
        p.requires_grad_(True)
    if order is not None and seed is not None:  # after the cast: exact values whatever the base's dtype (fp8 too)
        initialise_in_order(unet, name, order, seed)
    lora_compute_in_input_dtype(unet)
    return params


def initialise_in_order(net: torch.nn.Module, name: str, order: Sequence[str], seed: int) -> None:
    """Give adapter ``name``'s A matrices the values peft gives them for ``seed`` when it meets the adapted modules in
    ``order`` (B stays zero): per module, peft creates A (in -> r) and B (r -> out) as ``nn.Linear`` layers, each
    drawing its default initialisation, then draws A again with Kaiming-uniform. Replaying that sequence in
    another network's module order gives two implementations of one network the same initial LoRA."""
    layers = {path: layer for path, layer in net.named_modules() if name in getattr(layer, "lora_A", {})}
    ordered = [path for path in order if path in layers]
    if sorted(ordered) != sorted(layers):
        missing = sorted(set(layers) - set(ordered))
        raise ValueError(f"adapter {name!r}: the module order misses {len(missing)} adapted modules (e.g. "
                         f"{missing[:3]})")
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for path in ordered:
            a, b = layers[path].lora_A[name], layers[path].lora_B[name]
            if not isinstance(a, torch.nn.Linear):
                raise ValueError(f"{path}: only linear LoRA layers can be initialised in another order")
            torch.nn.Linear(a.in_features, a.out_features, bias=False)
            torch.nn.Linear(b.in_features, b.out_features, bias=b.bias is not None)
            weight = torch.empty(a.weight.shape)
            torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            a.weight.copy_(weight.to(a.weight))
            b.weight.zero_()


def _forward_in_input_dtype(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = self.weight.to(x.dtype)  # differentiable: the gradient still reaches the fp32 parameter
    b = None if self.bias is None else self.bias.to(x.dtype)
    if isinstance(self, torch.nn.Conv2d):
        return self._conv_forward(x, w, b)
    return torch.nn.functional.linear(x, w, b)


def lora_compute_in_input_dtype(unet: torch.nn.Module, enable: bool = True) -> None:
    """Run every LoRA of ``unet`` in the dtype of the activations it receives, whatever its parameters' dtype.

    peft casts a layer's input to the adapter's dtype: with a bf16 base and fp32 trainable LoRAs every adapted layer
    then keeps an fp32 copy of its input for the backward pass (one per q/k/v, 4x wide for ff.net.2) and adds an
    fp32 delta. Here the adapter's weights are cast to the input's dtype instead (the parameters and the optimizer
    stay fp32), which on an fp32 base changes nothing. Idempotent; ``enable=False`` restores peft's behaviour.
    """
    from types import MethodType

    for layer in lora_layers(unet):
        layer.cast_input_dtype_enabled = not enable
        for name in ("lora_A", "lora_B"):
            for m in getattr(layer, name, {}).values():
                if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                if enable:
                    m.forward = MethodType(_forward_in_input_dtype, m)
                elif "forward" in m.__dict__:
                    del m.forward


def lora_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(unet: torch.nn.Module) -> list[str]:
    return list(getattr(unet, "peft_config", {}).keys())


def remove_adapters(unet: torch.nn.Module, names: Sequence[str]) -> None:
    """Delete the adapters ``names`` from ``unet``. A layer peft wrapped that is left without any adapter goes back
    to its base layer, and peft's bookkeeping goes with the last adapter, so after removing every adapter the UNet
    has the modules, parameter names and attributes it had before any was added."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    present = [n for n in names if n in (getattr(unet, "peft_config", {}) or {})]
    if present:
        inner = unet.module if hasattr(unet, "module") and hasattr(unet.module, "peft_config") else unet
        with warnings.catch_warnings():  # peft names the adapter it activates instead: nothing to act on here
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            if hasattr(inner, "delete_adapters"):
                inner.delete_adapters(present)
            else:  # a module tree peft injected into directly
                for layer in lora_layers(inner):
                    for n in present:
                        if _holds(layer, n):
                            layer.delete_adapter(n)
                for n in present:
                    inner.peft_config.pop(n, None)
    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer) and all(len(getattr(module, a, ())) == 0
                                                      for a in module.adapter_layer_names):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    if not getattr(unet, "peft_config", None):
        unet.__dict__.pop("peft_config", None)
        unet.__dict__.pop("_hf_peft_config_loaded", None)


def _holds(layer: torch.nn.Module, name: str) -> bool:
    """Whether a peft layer carries adapter ``name``."""
    return any(name in getattr(layer, a, {}) for a in layer.adapter_layer_names)


def adapter_parameters(unet: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter, in a stable order."""
    marker = f".{name}."
    return [p for n, p in unet.named_parameters() if marker in n and ("lora_" in n)]


def adapter_state(unet: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Detached copy of one adapter's weights keyed by parameter name (adapter name removed)."""
    marker = f".{name}."
    return {n.replace(marker, "."): p.detach().clone() for n, p in unet.named_parameters() if marker in n and "lora_" in n}


def load_adapter_state(unet: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy weights saved by :func:`adapter_state` into adapter ``name`` (strict)."""
    marker = f".{name}."
    params = {n.replace(marker, "."): p for n, p in unet.named_parameters() if marker in n and "lora_" in n}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter {name!r}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.dtype))


def freeze_all_but(unet: torch.nn.Module, trainable: Sequence[str]) -> list[torch.nn.Parameter]:
    """Make exactly the named adapters trainable; everything else (base, other adapters) frozen."""
    keep = set(trainable)
    out = []
    for n, p in unet.named_parameters():
        on = "lora_" in n and any(f".{a}." in n for a in keep)
        p.requires_grad_(on)
        if on:
            out.append(p)
    return out


def _active_of(layer: torch.nn.Module) -> tuple[str, ...]:
    a = layer._active_adapter
    return (a,) if isinstance(a, str) else tuple(a)


class AdapterSwitch:
    """Chooses which adapters a UNet call uses, without changing which parameters are trainable.

    Whether a change is needed is read from the LoRA layers themselves, not from a remembered last setting: another
    switch of the same UNet (an evaluation's beside a trainer's) or peft (adding or loading an adapter activates it)
    may have changed them since.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.layers = lora_layers(unet)
        self.known = set(adapter_names(unet))

    @property
    def current(self) -> tuple[str, ...] | None:
        """The adapters every LoRA layer uses now; None when the layers disagree (or there are none)."""
        sets = {_active_of(layer) for layer in self.layers}
        return sets.pop() if len(sets) == 1 else None

    def refresh(self) -> None:
        """Call after adding adapters."""
        self.layers = lora_layers(self.unet)
        self.known = set(adapter_names(self.unet))

    def activate(self, names: Sequence[str]) -> None:
        names = tuple(names)
        if self.layers and all(_active_of(layer) == names for layer in self.layers):
            return
        unknown = set(names) - self.known
        if unknown:
            raise KeyError(f"unknown adapter(s) {sorted(unknown)}; the UNet has {sorted(self.known)}")
        for layer in self.layers:
            layer._active_adapter = list(names)

    @contextlib.contextmanager
    def using(self, names: Sequence[str]) -> Iterator[None]:
        previous = self.current
        self.activate(names)
        try:
            yield
        finally:
            if previous is not None:
                self.activate(previous)


def replay_active_adapters(block: torch.nn.Module) -> Callable[[], ContextManager]:
    """The adapters each LoRA layer of ``block`` uses now, as a context that sets them again and afterwards puts
    back what was active then: a checkpointed block recomputed in backward, after the chain has switched to other
    adapters, recomputes with the ones its forward used (:func:`~shortft_core.memory.checkpoint_blocks`)."""
    then = [(layer, _active_of(layer)) for layer in lora_layers(block)]

    @contextlib.contextmanager
    def reinstate() -> Iterator[None]:
        before = [layer._active_adapter for layer, _ in then]
        for layer, names in then:
            layer._active_adapter = list(names)
        try:
            yield
        finally:
            for (layer, _), value in zip(then, before):
                layer._active_adapter = value

    return reinstate


LAST_SEGMENT_CHOICES = ("tuned", "base")


@dataclass(frozen=True)
class LoraSetSpec:
    """The alignment LoRA set: rank/alpha/targets and how adapters map to segments.

    ``last_segment='base'`` leaves the last (lowest-noise) segment to the bare base model: the set has no adapter
    there, at inference or in training, so the set acts only on the segments a progressive run trains for real.
    """

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = ATTENTION_FF_TARGETS
    timestep_aware: bool = True
    segments: Segments = field(default_factory=Segments)
    last_segment: str = "tuned"

    def __post_init__(self) -> None:
        if self.last_segment not in LAST_SEGMENT_CHOICES:
            raise ValueError(f"last_segment must be one of {', '.join(LAST_SEGMENT_CHOICES)}; got {self.last_segment!r}")
        if self.last_segment == "base" and self.segments.k < 2:
            raise ValueError("last_segment 'base' needs at least two segments (the last one is left to the base); "
                             f"got segments {list(self.segments.lowers)}")

    @property
    def tuned_segments(self) -> int:
        """How many segments, from the first, the set acts on (all but the last with ``last_segment='base'``)."""
        return self.segments.k - (self.last_segment == "base")

    @property
    def names(self) -> tuple[str, ...]:
        n = self.tuned_segments if self.timestep_aware else 1
        return tuple(f"align_{i}" for i in range(1, n + 1))

    def active_in_segment(self, j: int) -> tuple[str, ...]:
        """Adapters used by the fine-tuned model in segment j: ``align_1..align_j`` (stacked) or the single one;
        none in a segment left to the base."""
        if not 1 <= j <= self.segments.k:
            raise ValueError(f"segment {j} outside 1..{self.segments.k}")
        if j > self.tuned_segments:
            return ()
        return self.names[:j] if self.timestep_aware else self.names

    def active_at(self, t: int) -> tuple[str, ...]:
        return self.active_in_segment(self.segments.segment_of(t))

    def trainable_in_stage(self, i: int) -> tuple[str, ...]:
        """Progressive stage i (of one per tuned segment) trains ``align_i..`` (single mode: the one adapter)."""
        if not 1 <= i <= self.tuned_segments:
            raise ValueError(f"stage {i} outside 1..{self.tuned_segments}")
        return self.names[i - 1 :] if self.timestep_aware else self.names

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segments"] = {"lowers": list(self.segments.lowers)}
        d["targets"] = list(self.targets)
        return d

    def add_to(self, unet: torch.nn.Module, seed: int = 0,
               order: Sequence[str] | None = None) -> dict[str, list[torch.nn.Parameter]]:
        """Inject every adapter of the set (deterministic init for ``seed``; ``order``: see :func:`add_lora`)."""
        return {name: add_lora(unet, name, self.rank, self.alpha, self.targets, seed=seed * 1000 + i, order=order)
                for i, name in enumerate(self.names)}
