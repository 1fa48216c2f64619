"""Code run inside ComfyUI's Python world, in a subprocess of the test interpreter: ComfyUI's source on ``sys.path``
(as ``main.py --cpu`` would parse its arguments), this pack imported as the package ``shortft_pack`` without its
server routes, one torch thread. ComfyUI's module globals (model management, folder paths) so stay out of the pytest
process, and a test reads what the script wrote.

A script is a body of Python run after :data:`PREAMBLE`; it finds its own arguments in ``ARGS``, imports the pack's
node modules with ``pack_module("tiny_world")`` and the library as the pack holds it (``from shortft_pack.shortft_core
import ...``: the nodes' own copy, so classes and module state are the ones the nodes see, as in a ComfyUI server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from comfy_harness import REPO, comfyui_or_skip

PREAMBLE = textwrap.dedent(r'''
    import importlib, importlib.util, sys, types
    comfy_root, repo, *ARGS = sys.argv[1:]
    sys.path.insert(0, comfy_root)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    torch.set_num_threads(1)

    spec = importlib.util.spec_from_file_location("shortft_pack", repo + "/__init__.py",
                                                  submodule_search_locations=[repo])
    _pack = importlib.util.module_from_spec(spec)
    sys.modules["shortft_pack"] = _pack
    spec.loader.exec_module(_pack)
    _nodes = types.ModuleType("shortft_pack.nodes")
    _nodes.__path__ = [repo + "/nodes"]
    sys.modules["shortft_pack.nodes"] = _nodes

    def pack_module(name):
        """A module of the pack's nodes/ (imported as ComfyUI imports the pack)."""
        return importlib.import_module("shortft_pack.nodes." + name)

    def tiny_train_node(out_dir, **widgets):
        """ShortFTTrain as ComfyUI runs it, with its files (its run, its LoRA set, the preview ComfyUI saves for its
        image) under ``out_dir``: the node, the tiny world's alignment reward, and its widgets for a short tiny run
        (``widgets`` override them)."""
        import folder_paths
        folder_paths.set_output_directory(str(out_dir / "output"))
        folder_paths.set_temp_directory(str(out_dir / "temp"))
        folder_paths.add_model_folder_path("loras", str(out_dir / "loras"), is_default=True)
        with torch.inference_mode():
            reward = pack_module("reward").RewardModel.execute(reward="tiny_alignment", spec="", device="cpu").result[0]
        defaults = dict(prompt_source="tiny-world captions", prompts="", method="shortft", iterations=1,
                        time_budget_s=0.0, batch_size=1, lr=0.005, rank=2, guidance=1.0, seed=0, stage_fractions="",
                        checkpoint_every=1, resume=True, eval_every=0, preview_every=0,
                        eval_prompts="a small red circle on the left on a white background")
        return pack_module("train").ShortFTTrain.PREPARE_CLASS_CLONE(None), reward, {**defaults, **widgets}
''')


# What the scripts that sample a MODEL both ways use: a body starts with it where it needs it.
SAMPLING_HELPERS = textwrap.dedent(r'''
    import comfy.sample
    import comfy.samplers


    def rel(a, b):
        """The relative max-abs difference of ``a`` from ``b``."""
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())


    def comfy_conditioning(clip, text):
        """``text`` as CLIP Text Encode gives it."""
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        return [[out.pop("cond"), out]]


    def euler_on(patcher, clip, noise, sigmas, guidance, prompt):
        """ComfyUI's euler sampler on ``sigmas`` from ``noise`` (a LATENT) at CFG ``guidance`` against the empty
        prompt."""
        with torch.inference_mode():
            return comfy.sample.sample_custom(patcher, noise, guidance, comfy.samplers.sampler_object("euler"),
                                              torch.tensor(sigmas), comfy_conditioning(clip, prompt),
                                              comfy_conditioning(clip, ""), torch.zeros_like(noise),
                                              disable_pbar=True, seed=0).float()


    def lora_b_grads(net):
        """Per alignment adapter on ``net``: [its lora_B tensors, those with a finite non-zero gradient]."""
        grads = {}
        for n, p in net.named_parameters():
            if ".lora_B." in n and ".shortcut." not in n:
                adapter = n.split(".lora_B.")[1].split(".")[0]
                ok = p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0
                grads.setdefault(adapter, [0, 0])
                grads[adapter][0] += 1
                grads[adapter][1] += ok
        return grads


    def sampled_and_saved_set(trainer, state, guidance, grid, noise, cond, uncond):
        """The trainer's alignment set moved (fresh lora_B are zero: moved so that the set visibly changes a sample),
        rounded to the fp16 it is saved in, sampled by the chain's original plan, and written to a folder of its own;
        then the trainer dropped and the MODEL restored (``state``: a ModelState). Returns (the chain's sample, the
        set's folder)."""
        import tempfile
        from pathlib import Path

        from shortft_pack.shortft_core.chain import run_plan
        from shortft_pack.shortft_core.plans import original_chain

        model = trainer.model
        with torch.no_grad():
            for n, p in model.unet.named_parameters():
                if ".lora_" in n and ".shortcut." not in n:
                    if ".lora_B." in n:
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
                    p.copy_(p.half().float())
            sample = run_plan(model, original_chain(trainer.lora, guidance, grid), noise, cond, uncond,
                              trainer.switch)[-1]
        folder = Path(tempfile.mkdtemp()) / "set"
        trainer.save_lora_set(folder)
        state.restore()
        return sample, folder
''')


# Small transformer MODELs for the scripts: random weights a MODEL family's own loader detects, the tiny world's CLIP
# (64 wide: the networks' text and pooled inputs) and a small 16-channel VAE (2x; random weights).
TRANSFORMER_WORLD = textwrap.dedent(r'''
    import comfy.ops
    import comfy.sd
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT


    def initialised(module, seed):
        """The module's state with torch's default initialisation (ComfyUI's layers skip it), RMS norms' scales 1
        and a position embedding drawn: a random network that computes finite, varied outputs."""
        torch.manual_seed(seed)
        with torch.no_grad():
            for m in module.modules():
                for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm):
                    if isinstance(m, cls):
                        cls.reset_parameters(m)
                        break
                if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
            for name, p in [*module.named_parameters(), *module.named_buffers()]:
                if name == "pos_embed":
                    p.normal_(0, 0.5)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


    def transformer_network(family, **sizes):
        """A small network of ``family``'s architecture: SD3.5's MMDiT (RMS q/k norms, a second image attention in
        block 1) or FLUX.1 dev's (the guidance embedding), 128 wide, two blocks; ``sizes`` replace FLUX's widths
        and depths (hidden_size, num_heads, depth, depth_single_blocks)."""
        ops = dict(operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
        if family == "sd3":
            return MMDiT(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=64,
                         context_embedder_config={"target": "torch.nn.Linear",
                                                  "params": {"in_features": 64, "out_features": 128}},
                         pos_embed_max_size=16, num_patches=256, qk_norm="rms", x_block_self_attn_layers=[1], **ops)
        shape = {"hidden_size": 128, "num_heads": 1, "depth": 1, "depth_single_blocks": 1, **sizes}
        return Flux(in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64, mlp_ratio=4.0,
                    axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                    txt_ids_dims=[], **shape, **ops)


    def transformer_world(family, clip, **sizes):
        """(MODEL, VAE) of ``family`` as ComfyUI's loaders make them (the MODEL detected from its weights)."""
        weights = initialised(transformer_network(family, **sizes), 0)
        ddconfig = {"double_z": True, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
        autoencoder = initialised(AutoencoderKL(ddconfig=ddconfig, embed_dim=16), 1)
        with torch.inference_mode():
            model = comfy.sd.load_diffusion_model_state_dict(weights)
            vae = comfy.sd.VAE(sd=autoencoder, config={"params": {"ddconfig": ddconfig, "embed_dim": 16}},
                               dtype=torch.float32)
        vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio = 16, 2, 2
        return model, vae
''')


def run_in_comfyui(comfy: Path, body: str, script: Path, *args: str, timeout: float = 600) -> str:
    """Run :data:`PREAMBLE` + ``body`` (written to ``script``) with ``args``; returns its stdout, or fails the test
    with the end of its output."""
    import pytest

    script.write_text(PREAMBLE + "\n" + textwrap.dedent(body))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, str(script), str(comfy), str(REPO), *map(str, args)], check=False,
                       capture_output=True, text=True, timeout=timeout, cwd=comfy, env=env)
    if r.returncode != 0:
        pytest.fail(f"the ComfyUI-side script {script.name} failed (exit status {r.returncode}):\n{r.stdout[-3000:]}\n"
                    f"{r.stderr[-4000:]}")
    return r.stdout


def script_result(out: str) -> dict:
    """The JSON object a script printed on its ``RESULT`` line (also printed indented, for the test's log)."""
    import pytest

    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        pytest.fail(f"the ComfyUI-side script printed no RESULT line:\n{out[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    print(json.dumps(res, indent=1))
    return res


def script_in_comfyui(tmp_path_factory, name: str, body: str, timeout: float = 900) -> dict:
    """Run ``body`` in ComfyUI's Python world (skipped, saying so, without a ComfyUI checkout) in a folder of its own
    and return what it printed on its ``RESULT`` line: the body of a module fixture of a tier-2 test."""
    comfy = comfyui_or_skip()
    tmp = tmp_path_factory.mktemp(name)
    return script_result(run_in_comfyui(comfy, body, tmp / f"{name}_side.py", timeout=timeout))
