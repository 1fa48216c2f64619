"""LoRA import/export: every published key layout loads with zero unused keys, exports round-trip exactly, and
diffusers' own loader reads our files to the same outputs.

Tier 1 uses reduced SD1.5/SDXL-shaped UNets (and full-size UNets on the meta device for the key maps); the slow
tier repeats the forward checks on the full-size random-weight architectures.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from shortft_core import ldm_keys, lora_io
from shortft_core.lora_io import LoraFormatError, LoraModule
from shortft_core.testing.random_models import SMALL_CONFIGS, random_unet
from shortft_core.families import bundled_config

ALIGN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
LAYOUTS = ["kohya", "kohya_sgm", "diffusers_old", "diffusers_old_alpha", "attn_procs", "peft", "peft_metadata"]


# ----- helpers -------------------------------------------------------------------------------------------------
def small_unet_config(family: str) -> dict:
    return {**bundled_config(family, "unet"), **SMALL_CONFIGS[family]["unet"]}


def meta_unet(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def linear_conv_modules(unet) -> dict[str, torch.nn.Module]:
    """Linear/Conv2d layers by diffusers path (peft-wrapped layers under their own path)."""
    return lora_io._base_layers(unet)


def random_lora(unet, seed: int = 0, names=None, scale: float = 1.0) -> dict[str, LoraModule]:
    """Random LoRA modules (ranks 2 or 4, alphas varying) for every Linear/Conv2d of ``unet`` (or ``names``)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, mod) in enumerate(sorted(linear_conv_modules(unet).items())):
        if names is not None and name not in names:
            continue
        rank = 2 if i % 3 == 0 else 4
        alpha = float(rank * (0.5, 1.0, 2.0)[i % 3])
        if isinstance(mod, torch.nn.Linear):
            down = torch.randn(rank, mod.in_features, generator=g) / math.sqrt(mod.in_features)
            up = torch.randn(mod.out_features, rank, generator=g) * scale / math.sqrt(rank)
        else:
            down = torch.randn(rank, mod.in_channels, *mod.kernel_size, generator=g) / math.sqrt(mod.in_channels * 9)
            up = torch.randn(mod.out_channels, rank, 1, 1, generator=g) * scale / math.sqrt(rank)
        out[name] = LoraModule(down, up, alpha)
    return out


def write_layout(modules: dict[str, LoraModule], layout: str, unet_config) -> tuple[dict, dict]:
    """The tensors (and safetensors metadata) a published file of ``layout`` would hold for ``modules``.

    kohya: sd-scripts / Hyper-SD / PCM "converted" files (``lora_unet_`` + diffusers path, ``.alpha``);
    kohya_sgm: sd-scripts SDXL files and ComfyUI-style names (``lora_unet_`` + ldm path);
    diffusers_old: LCM-LoRA / TCD / PCM diffusers files (``unet.<path>.lora.down.weight``), optionally ``.alpha``;
    attn_procs: the old LoRAAttnProcessor naming (``attn1.processor.to_q_lora.down.weight``);
    peft: diffusers >= 0.26 ``save_lora_weights`` (``unet.<path>.lora_A.weight``), alpha via lora_adapter_metadata.
    """
    sd, meta = {}, {}
    for name, m in modules.items():
        if layout in ("kohya", "kohya_sgm"):
            path = name if layout == "kohya" else ldm_keys.unet_name_to_ldm(name, unet_config)
            key = "lora_unet_" + path.replace(".", "_")
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = m.down, m.up
            sd[key + ".alpha"] = torch.tensor(m.alpha)
        elif layout.startswith("diffusers_old") or layout == "attn_procs":
            base = "unet." + name
            if layout == "attn_procs" and re.search(r"\.attn[12]\.to_(q|k|v|out\.0)$", name):
                attn, proj = name.rsplit(".to_", 1)
                base = f"unet.{attn}.processor.to_{proj.replace('out.0', 'out')}_lora"
                sd[base + ".down.weight"], sd[base + ".up.weight"] = m.down, m.up
            else:
                sd[base + ".lora.down.weight"], sd[base + ".lora.up.weight"] = m.down, m.up
            if layout != "diffusers_old":
                sd["unet." + name + ".alpha"] = torch.tensor(m.alpha)
        elif layout.startswith("peft"):
            sd["unet." + name + ".lora_A.weight"], sd["unet." + name + ".lora_B.weight"] = m.down, m.up
        else:
            raise ValueError(layout)
    if layout == "peft_metadata":
        cfg = lora_io._lora_config_kwargs(modules)
        meta["lora_adapter_metadata"] = json.dumps({f"unet.{k}": v for k, v in cfg.items()})
    return sd, meta


def expected_alpha(m: LoraModule, layout: str) -> float:
    """diffusers-old and plain peft files carry no alpha: the convention is scale 1 (alpha = rank)."""
    return float(m.rank) if layout in ("diffusers_old", "peft") else m.alpha


def merged_forward(unet, modules: dict[str, LoraModule], x, t, c, added=None):
    """Reference output: the LoRA merged by hand into the weights (W + alpha/rank * up @ down), adapters off."""
    params = dict(unet.named_parameters())
    new = {}
    for name, m in modules.items():
        key = name + ".base_layer.weight" if name + ".base_layer.weight" in params else name + ".weight"
        w = params[key]
        delta = (m.up.flatten(1).double() @ m.down.flatten(1).double()).reshape(w.shape) * m.scale
        new[key] = (w.double() + delta).to(w.dtype)
    kwargs = {} if added is None else {"added_cond_kwargs": added}
    has_adapters = bool(getattr(unet, "peft_config", None))
    if has_adapters:
        unet.disable_adapters()
    try:
        with torch.no_grad():
            return torch.func.functional_call(unet, new, (x, t), {"encoder_hidden_states": c, **kwargs},
                                              strict=False).sample
    finally:
        if has_adapters:
            unet.enable_adapters()


def inputs(config: dict, batch: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    t = torch.tensor([999, 261][:batch])
    c = torch.randn(batch, 7, config["cross_attention_dim"], generator=g)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": torch.randn(batch, pooled, generator=g),
                 "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch)}
    return x, t, c, added


def forward(unet, x, t, c, added=None):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c, added_cond_kwargs=added).sample


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def small_unets():
    return {f: random_unet(small_unet_config(f), seed=1) for f in ("sd15", "sdxl")}


# ----- published layouts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_published_layouts_map_every_key_full_size(family, layout):
    """Full-size SD1.5 / SDXL key maps (meta UNets): every key of every layout lands on its module and alpha."""
    unet = meta_unet(bundled_config(family, "unet"))
    g = torch.Generator().manual_seed(0)
    modules = {}
    for i, (name, mod) in enumerate(sorted(linear_conv_modules(unet).items())):
        down_shape, up_shape = lora_io._expected_shapes(mod, 1)
        modules[name] = LoraModule(torch.randn(down_shape, generator=g), torch.randn(up_shape, generator=g),
                                   float(1 + i % 3))
    sd, meta = write_layout(modules, layout, unet.config)
    got, detected = lora_io.lora_modules(sd, unet, meta, f"{family}/{layout}")
    assert set(got) == set(modules)
    for name, m in modules.items():
        assert got[name].down is sd_value(sd, name, m.down) and torch.equal(got[name].up, m.up), name
        assert got[name].alpha == expected_alpha(m, layout), name
    assert detected == {"kohya": "kohya", "kohya_sgm": "kohya_sgm", "peft": "peft",
                        "peft_metadata": "peft"}.get(layout, "diffusers")
    assert lora_io.lora_base_family(got) == family


def sd_value(sd, name, tensor):
    """The file's own tensor object for ``tensor`` (the import must hand the file's tensors through)."""
    return next(v for v in sd.values() if v is tensor)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_published_layouts_load_and_match_merged_weights(small_unets, family, layout):
    """A random shortcut LoRA in each layout loads as a frozen adapter whose output equals hand-merged weights."""
    unet = small_unets[family]
    modules = random_lora(unet, seed=3)
    sd, meta = write_layout(modules, layout, unet.config)
    x, t, c, added = inputs(dict(unet.config))
    base = forward(unet, x, t, c, added)
    loaded = lora_io.load_lora_adapter(unet, sd, "shortcut", metadata=meta)
    try:
        assert set(loaded.modules) == set(modules)
        assert all(not p.requires_grad for n, p in unet.named_parameters() if ".shortcut." in n)
        out = forward(unet, x, t, c, added)
        ref_modules = {n: LoraModule(m.down, m.up, expected_alpha(m, layout)) for n, m in modules.items()}
        ref = merged_forward(unet, ref_modules, x, t, c, added)
        assert rel_err(out, ref) < 1e-4
        assert rel_err(out, base) > 0.05  # the LoRA really acts
    finally:
        unet.delete_adapters("shortcut")
    assert torch.equal(forward(unet, x, t, c, added), base)


# ----- export / import of our own adapters ------------------------------------------------------------------------
def add_align_adapter(unet, name="align", hetero=False, targets=None):
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets or ALIGN_TARGETS, init_lora_weights=False,
                     alpha_pattern={"attn1.to_q": 2.0, "conv1": 1.0} if hetero else {},
                     rank_pattern={"attn2.to_k": 2} if hetero else {})
    unet.add_adapter(cfg, adapter_name=name)
    return unet


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kohya_export_round_trip(tmp_path, dtype):
    """Export -> import gives the adapter back exactly (fp16: the fp16-rounded tensors), every module has .alpha."""
    src = add_align_adapter(random_unet(small_unet_config("sd15"), seed=1), hetero=True,
                            targets=ALIGN_TARGETS + ["proj_in", "conv1", "conv_shortcut", "time_emb_proj"])
    path = lora_io.export_lora(src, "align", tmp_path / "a.safetensors", dtype=dtype,
                               metadata={"plan": "shortft-k4", "segments": [[999, 761], [741, 1]]})
    sd, meta = lora_io.read_lora(path)
    want = lora_io.adapter_modules(src, "align")
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert stems == {"lora_unet_" + n.replace(".", "_") for n in want}
    assert all(s + ".alpha" in sd and s + ".lora_down.weight" in sd and s + ".lora_up.weight" in sd for s in stems)
    assert all(v.dtype == dtype for k, v in sd.items() if k.endswith(".weight"))
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 8.0
    assert meta["shortft_adapter"] == "align" and json.loads(meta["shortft"])["plan"] == "shortft-k4"
    dst = random_unet(small_unet_config("sd15"), seed=1)
    loaded = lora_io.load_lora_adapter(dst, path, "align", trainable=True, dtype=torch.float32)
    assert loaded.shortft["segments"] == [[999, 761], [741, 1]]
    got = lora_io.adapter_modules(dst, "align")
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n].down, want[n].down.to(dtype).float()) and torch.equal(got[n].up, want[n].up.to(dtype).float())
        assert got[n].alpha == want[n].alpha
    assert all(p.requires_grad for n, p in dst.named_parameters() if ".align." in n)
    x, t, c, _ = inputs(dict(src.config))
    if dtype == torch.float32:
        assert torch.equal(forward(dst, x, t, c), forward(src, x, t, c))
    # export of the re-imported adapter is byte-identical in its tensors
    again = lora_io.export_lora(dst, "align", tmp_path / "b.safetensors", dtype=dtype)
    sd2 = load_file(str(again))
    assert set(sd2) == set(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)


def test_export_refuses_overwrite_and_bad_input(tmp_path):
    unet = add_align_adapter(random_unet(small_unet_config("sd15"), seed=1))
    path = lora_io.export_lora(unet, "align", tmp_path / "a.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        lora_io.export_lora(unet, "align", path)
    assert path.read_bytes() == before
    lora_io.export_lora(unet, "align", path, overwrite=True, metadata={"step": 2})
    assert json.loads(lora_io.read_lora(path)[1]["shortft"]) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary files left
    with pytest.raises(ValueError, match="layout"):
        lora_io.export_lora(unet, "align", tmp_path / "c.safetensors", layout="a1111")
    with pytest.raises(ValueError, match="no LoRA adapter 'nope'"):
        lora_io.export_lora(unet, "nope", tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match="JSON"):
        lora_io.export_lora(unet, "align", tmp_path / "c.safetensors", metadata={"x": object()})
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_loads_our_export_to_the_same_outputs(tmp_path, family, layout):
    """Parity (a), reduced architectures: diffusers' own lora_state_dict + load_lora_into_unet of our file."""
    from diffusers import StableDiffusionPipeline

    src = add_align_adapter(random_unet(small_unet_config(family), seed=1), targets=ALIGN_TARGETS + ["proj_in"])
    path = lora_io.export_lora(src, "align", tmp_path / "a.safetensors", layout=layout, dtype=torch.float32)
    x, t, c, added = inputs(dict(src.config))
    ours = forward(src, x, t, c, added)
    dst = random_unet(small_unet_config(family), seed=1)
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path.parent), weight_name=path.name,
                                                               unet_config=dst.config, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, dst, adapter_name="d", metadata=meta)
    theirs = forward(dst, x, t, c, added)
    assert rel_err(theirs, ours) < 1e-6
    assert rel_err(forward(random_unet(small_unet_config(family), seed=1), x, t, c, added), ours) > 0.05


def test_per_module_alphas_survive_our_import(tmp_path):
    """kohya files with per-module alphas: we apply each (diffusers 0.42 drops the attention ones, see log)."""
    src = add_align_adapter(random_unet(small_unet_config("sd15"), seed=1), hetero=True)
    path = lora_io.export_lora(src, "align", tmp_path / "a.safetensors", dtype=torch.float32)
    dst = random_unet(small_unet_config("sd15"), seed=1)
    lora_io.load_lora_adapter(dst, path, "align")
    x, t, c, _ = inputs(dict(src.config))
    assert torch.equal(forward(dst, x, t, c), forward(src, x, t, c))
    scales = {layer.scaling["align"] for layer in lora_io._adapter_layers(dst, "align").values()}
    assert scales == {2.0, 0.5, 4.0}  # 8/4, 2/4 (attn1.to_q), 8/2 (attn2.to_k)


# ----- refusals -----------------------------------------------------------------------------------------------------
def test_refuses_text_encoder_unknown_and_damaged_files(small_unets):
    unet = small_unets["sd15"]
    good, _ = write_layout(random_lora(unet, names={"conv_in", "down_blocks.0.attentions.0.proj_in"}), "kohya",
                           unet.config)
    cases = {
        "text-encoder LoRA keys": {**good, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)},
        "DoRA": {**good, "lora_unet_conv_in.dora_scale": torch.zeros(1)},
        "LoHa": {"lora_unet_conv_in.hada_w1_a": torch.zeros(1)},
        "both lora_down and lora_up": {k: v for k, v in good.items() if "conv_in.lora_up" not in k},
        "unrecognised kohya keys": {**good, "lora_unet_conv_in.weird": torch.zeros(1)},
        "mixes kohya keys": {**good, "unet.conv_in.lora_A.weight": torch.zeros(1, 1)},
        "unrecognised LoRA keys": {"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3), "unet.conv_in.foo": torch.zeros(1)},
        "only one of the two": {"unet.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)},
        "do not exist": {"unet.down_blocks.9.proj.lora_A.weight": torch.zeros(2, 4), "unet.down_blocks.9.proj.lora_B.weight": torch.zeros(4, 2)},
        "shapes do not fit": {"unet.conv_in.lora_A.weight": torch.zeros(2, 5, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(32, 2, 1, 1)},
    }
    mixed = dict(good)
    mixed.update(write_layout(random_lora(unet, names={"down_blocks.1.resnets.0.conv1"}), "kohya_sgm", unet.config)[0])
    cases["mixes ldm names"] = mixed
    for match, sd in cases.items():
        with pytest.raises(LoraFormatError, match=match):
            lora_io.load_lora_adapter(unet, sd, "bad")
        assert "bad" not in lora_io._adapter_names(unet)
    lora_io.load_lora_adapter(unet, good, "ok")
    with pytest.raises(ValueError, match="already loaded"):
        lora_io.load_lora_adapter(unet, good, "ok")
    unet.delete_adapters("ok")


@pytest.mark.parametrize("lora_family,model_family", [("sdxl", "sd15"), ("sd15", "sdxl")])
def test_lora_for_another_architecture_is_refused(lora_family, model_family):
    """An SDXL LoRA on SD1.5 (and the reverse) names the two architectures, before anything is injected."""
    src = meta_unet(bundled_config(lora_family, "unet"))
    names = {n for n in linear_conv_modules(src) if n.endswith(("attn2.to_k", "attn1.to_q"))}
    modules = {}
    for n in sorted(names):
        down_shape, up_shape = lora_io._expected_shapes(linear_conv_modules(src)[n], 2)
        modules[n] = LoraModule(torch.zeros(down_shape), torch.zeros(up_shape), 2.0)
    for layout in ("kohya", "peft"):
        sd, _ = write_layout(modules, layout, src.config)
        with pytest.raises(LoraFormatError, match=f"LoRA for {'SDXL' if lora_family == 'sdxl' else 'SD1.x'}.*model is"):
            lora_io.lora_modules(sd, meta_unet(bundled_config(model_family, "unet")), source="x")


def test_load_keeps_other_adapters_and_activation(small_unets):
    unet = small_unets["sd15"]
    add_align_adapter(unet, "align")
    try:
        sd, _ = write_layout(random_lora(unet, seed=5), "kohya", unet.config)
        lora_io.load_lora_adapter(unet, sd, "shortcut", activate=False)
        assert lora_io._active(unet) == ["align"]
        assert all(p.requires_grad for n, p in unet.named_parameters() if ".align." in n)
        assert not any(p.requires_grad for n, p in unet.named_parameters() if ".shortcut." in n)
        lora_io._set_active(unet, ["align", "shortcut"])
        assert set(lora_io._active(unet)) == {"align", "shortcut"}
        assert all(p.requires_grad for n, p in unet.named_parameters() if ".align." in n)
        assert not any(p.requires_grad for n, p in unet.named_parameters() if ".shortcut." in n)
    finally:
        unet.delete_adapters(["align", "shortcut"])


# ----- the tiny world --------------------------------------------------------------------------------------------
def test_tiny_world_adapter_round_trip(tmp_path):
    from shortft_core.tiny_world import weights_dir
    from shortft_core.loading import load_tiny_model

    try:
        weights_dir()
    except FileNotFoundError as e:
        pytest.skip(f"tiny-world weights not built yet: {e}")
    model = load_tiny_model()
    unet = add_align_adapter(model.unet)
    path = lora_io.export_lora(unet, "align", tmp_path / "tiny.safetensors", family="tiny", dtype=torch.float32)
    assert lora_io.read_lora(path)[1]["ss_base_model_version"] == "tiny"
    fresh = load_tiny_model().unet
    lora_io.load_lora_adapter(fresh, path, "align")
    cond = model.encode_prompts(["a red circle"])
    x = torch.randn(1, *model.latent_shape())
    with torch.no_grad():
        assert torch.equal(model.eps(x, 500, cond, unet=fresh), model.eps(x, 500, cond))


# ----- full size (slow) -------------------------------------------------------------------------------------------
def _diffusers_load(unet, path, name):
    from diffusers import StableDiffusionPipeline

    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path.parent), weight_name=path.name,
                                                               unet_config=unet.config, return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet, adapter_name=name, metadata=meta)


def _only(unet, name):
    lora_io._set_active(unet, [name])
    return unet


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype", [("sd15", torch.float32), ("sdxl", torch.bfloat16)])
def test_full_size_export_matches_diffusers_and_layouts(tmp_path, family, dtype):
    """Full-size random UNets: (a) our kohya export loaded by diffusers computes what our adapter computes;
    (b) a random shortcut LoRA on every Linear/Conv2d, written in every published layout, loads with zero
    unused keys to identical outputs; SD1.5 also against the LoRA merged into the weights by hand (fp32)."""
    unet = random_unet(family, dtype=dtype, seed=5)
    x, t, c, added = inputs(dict(unet.config), batch=1)
    x, c = x.to(dtype), c.to(dtype)
    added = None if added is None else {k: v.to(dtype) for k, v in added.items()}
    base = forward(unet, x, t, c, added)

    # (a) alignment adapter -> kohya file -> ours vs diffusers' loader, same fp16 tensors on both sides
    add_align_adapter(unet, "align")
    path = lora_io.export_lora(unet, "align", tmp_path / "align.safetensors", family=family)
    unet.delete_adapters("align")
    lora_io.load_lora_adapter(unet, path, "ours")
    _diffusers_load(unet, path, "theirs")
    ours, theirs = forward(_only(unet, "ours"), x, t, c, added), forward(_only(unet, "theirs"), x, t, c, added)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    print(f"{family} {dtype}: diffusers vs ours {rel_err(theirs, ours):.2e}, LoRA effect {rel_err(ours, base):.2e}")
    assert rel_err(theirs, ours) <= tol and rel_err(ours, base) > 0.05
    unet.delete_adapters(["ours", "theirs"])

    # (b) every published layout of one random shortcut LoRA -> the same outputs
    modules = random_lora(unet, seed=9, scale=0.5)
    outs = {}
    for layout in ("kohya", "kohya_sgm", "diffusers_old_alpha", "peft_metadata"):
        sd, meta = write_layout(modules, layout, unet.config)
        loaded = lora_io.load_lora_adapter(unet, sd, "shortcut", metadata=meta)
        assert set(loaded.modules) == set(modules)
        outs[layout] = forward(unet, x, t, c, added)
        unet.delete_adapters("shortcut")
    first = outs["kohya"]
    assert all(torch.equal(o, first) for o in outs.values()) and rel_err(first, base) > 0.05
    if dtype == torch.float32:  # hand-merged reference, in place (last use of the UNet)
        layers = lora_io._base_layers(unet)
        with torch.no_grad():
            for name, m in modules.items():
                w = layers[name].weight
                w += ((m.up.flatten(1).double() @ m.down.flatten(1).double()).reshape(w.shape) * m.scale).to(w.dtype)
        assert not lora_io._adapter_names(unet)  # every adapter deleted: the UNet computes its (merged) weights
        merged = forward(unet, x, t, c, added)
        print(f"{family}: published layouts vs hand-merged weights {rel_err(first, merged):.2e}")
        assert rel_err(first, merged) < 1e-4


def test_peft_file_with_regex_patterns_in_adapter_metadata(small_unets):
    """diffusers save_lora_weights files carry the training LoraConfig: unanchored patterns and rslora apply."""
    unet = small_unets["sd15"]
    names = {n for n in linear_conv_modules(unet) if n.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_k"))}
    layers, modules = linear_conv_modules(unet), {}
    for n in sorted(names):  # alphas come from the metadata only
        down, up = lora_io._expected_shapes(layers[n], 2 if n.endswith("attn2.to_k") else 4)
        modules[n] = LoraModule(torch.randn(down), torch.randn(up), 0.0)
    sd, _ = write_layout(modules, "peft", unet.config)
    cfg = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn1.to_q": 2.0}, "rank_pattern": {"attn2.to_k": 2}}
    meta = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in cfg.items()})}
    got, _ = lora_io.lora_modules(sd, unet, meta)
    for n, m in got.items():
        assert m.alpha == (2.0 if n.endswith("attn1.to_q") else 8.0) and m.rank == (2 if n.endswith("attn2.to_k") else 4)
    meta = {"lora_adapter_metadata": json.dumps({**cfg, "rank_pattern": {}, "use_rslora": True})}
    with pytest.raises(LoraFormatError, match="rank 2, its adapter metadata says 4"):
        lora_io.lora_modules(sd, unet, meta)
    sd4 = {k: v for k, v in sd.items() if "attn2.to_k" not in k}
    got, _ = lora_io.lora_modules(sd4, unet, meta)
    assert {m.scale for m in got.values()} == {8.0 / 2.0, 2.0 / 2.0}  # rslora: alpha / sqrt(4)
