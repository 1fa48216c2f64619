"""Aligned LoRA sets as files: exact segment stacks, a merged LoRA, and inference that matches the trainer's."""

import json

import pytest
import torch

from shortft_core.adapters import AdapterSwitch, adapter_parameters
from shortft_core.cli import main as cli_main
from shortft_core.lora_io import adapter_modules, read_lora
from shortft_core.lora_set import load_lora_set, segment_weights, set_inference_plan, stack_modules
from shortft_core.sampling import sample
from shortft_core.tiny_world import held_out_prompts, load_tiny_rewards
from shortft_core.loading import load_tiny_model
from shortft_core.prompts import PromptSource
from shortft_core.trainer import Trainer
from shortft_core.config import TrainConfig


@pytest.fixture(scope="module")
def trained_set(tmp_path_factory, fresh_tiny):
    model = fresh_tiny()
    cfg = TrainConfig(iterations=1, rank=4, eval_count=0, guidance=1.0,  # unguided, as the tiny preset
                      last_segment="tuned")  # a LoRA on every segment
    tr = Trainer(model, load_tiny_rewards()[0], cfg, PromptSource(["a small red circle on the left on a white background"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct non-zero adapters, so every segment's network differs
        for n in cfg.lora.names:
            for p in adapter_parameters(model.unet, n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    out = tmp_path_factory.mktemp("set") / "lora"
    files = tr.save_lora_set(out)
    return tr, out, files


def test_segment_files_are_the_exact_stacks(trained_set):
    tr, out, files = trained_set
    info = json.loads((out / "set.json").read_text())
    assert info["segments"] == [[761, 999], [501, 760], [261, 500], [0, 260]]
    assert [f.name for f in files] == [f"segment_{j}.safetensors" for j in (1, 2, 3, 4)] + ["merged.safetensors", "set.json"]
    unet = tr.model.unet
    per = {n: adapter_modules(unet, n) for n in tr.lora.names}
    x = torch.randn(3, 64)
    for j in (1, 2, 3, 4):
        sd, meta = read_lora(out / f"segment_{j}.safetensors")
        assert json.loads(meta["shortft"])["segment"] == j
        key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        down, up, alpha = sd[key + ".lora_down.weight"].float(), sd[key + ".lora_up.weight"].float(), float(sd[key + ".alpha"])
        assert down.shape[0] == 4 * j and alpha == 4 * j  # ranks concatenated, scale 1
        name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        want = sum(per[f"align_{i}"][name].up @ per[f"align_{i}"][name].down * per[f"align_{i}"][name].scale
                   for i in range(1, j + 1))
        torch.testing.assert_close(x @ (up @ down).T, x @ want.T, rtol=2e-3, atol=2e-3)  # fp16 file


def test_merged_is_the_step_weighted_average(trained_set):
    tr, out, _ = trained_set
    w = segment_weights(tr.lora.segments)
    assert w == [12 / 50, 13 / 50, 12 / 50, 13 / 50]
    sd, _ = read_lora(out / "merged.safetensors")
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    key = "lora_unet_" + name.replace(".", "_")
    got = sd[key + ".lora_up.weight"].float() @ sd[key + ".lora_down.weight"].float()
    per = {n: adapter_modules(tr.model.unet, n)[name] for n in tr.lora.names}
    want = sum(sum(w[j - 1] for j in range(i, 5)) * (per[f"align_{i}"].up @ per[f"align_{i}"].down) * per[f"align_{i}"].scale
               for i in range(1, 5))
    torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-4)


def test_a_single_lora_run_writes_that_lora_in_every_file(tmp_path, fresh_tiny):
    model = fresh_tiny()
    cfg = TrainConfig(method="draft", iterations=1, rank=4, eval_count=0)
    tr = Trainer(model, load_tiny_rewards()[0], cfg, PromptSource(["a small red circle on the left on a white background"]))
    assert tr.lora.names == ("align_1",)
    with torch.no_grad():
        for p in adapter_parameters(model.unet, "align_1"):
            p.normal_(0, 0.08)
    tr.save_lora_set(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "set.json").read_text())["kind"] == "single"
    first, _ = read_lora(tmp_path / "lora" / "segment_1.safetensors")
    assert first and any(float(v.abs().max()) > 0 for k, v in first.items() if k.endswith("lora_up.weight"))
    for name in ("segment_2", "segment_3", "segment_4", "merged"):
        sd, _ = read_lora(tmp_path / "lora" / f"{name}.safetensors")
        assert sd.keys() == first.keys() and all(torch.equal(sd[k], first[k]) for k in first), name


def test_applying_the_set_reproduces_the_trainers_inference(trained_set, tmp_path):
    tr, out, _ = trained_set
    prompts = held_out_prompts(2)
    ref = tr.sample(prompts, seed=5)
    fresh = load_tiny_model()
    names, segments = load_lora_set(fresh.unet, out)
    plan = set_inference_plan(names, segments, tr.cfg.guidance)
    got = sample(fresh, prompts, seed=5, plan=plan, switch=AdapterSwitch(fresh.unet))
    torch.testing.assert_close(got, ref, atol=3e-3, rtol=0)  # the files are fp16
    base = sample(fresh, prompts, seed=5, guidance=tr.cfg.guidance)
    assert (got - base).abs().max() > 1e-2  # and the set does change the pictures
    # the CLI samples a set at the CFG scale it was trained for unless told otherwise, so it shows what training saw
    rc = cli_main(["sample", "--lora-set", str(out), "--prompts", *prompts, "--seed", "5", "--out", str(tmp_path)])
    meta = json.loads((tmp_path / "samples.json").read_text())
    assert rc == 0 and meta["lora_set"] == str(out) and meta["guidance"] == tr.cfg.guidance == 1.0
    import numpy as np
    from PIL import Image

    with Image.open(tmp_path / "0000.png") as im:
        png = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(png, ref[0], atol=3e-3 + 1 / 255, rtol=0)
    rc = cli_main(["sample", "--lora-set", str(out), "--prompts", *prompts, "--seed", "5", "--guidance", "3",
                   "--out", str(tmp_path / "cfg3")])
    assert json.loads((tmp_path / "cfg3" / "samples.json").read_text())["guidance"] == 3.0
    assert cli_main(["sample", "--lora", str(out / "merged.safetensors"), "--prompts", *prompts, "--steps", "4",
                     "--out", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "samples.json").read_text())["guidance"] == 1.0


def test_export_converts_a_whole_set_that_then_samples_the_same(trained_set, tmp_path):
    """`export --lora run/lora --layout diffusers --out DIR` re-writes every segment file and the merged file and
    the manifest; the converted set loads as a set and gives the same pictures; nothing is overwritten unasked."""
    from shortft_core.lora_set import read_set_manifest

    tr, out, _ = trained_set
    dst = tmp_path / "diffusers_set"
    assert cli_main(["export", "--lora", str(out), "--layout", "diffusers", "--out", str(dst)]) == 0
    info = read_set_manifest(dst)
    assert info["layout"] == "diffusers" and info["segments"] == read_set_manifest(out)["segments"]
    for name in info["segment_files"] + [info["merged_file"]]:
        tensors, meta = read_lora(dst / name)
        assert all(k.startswith("unet.") for k in tensors), name  # the diffusers layout
        assert json.loads(meta["shortft"])["segment"] == json.loads(read_lora(out / name)[1]["shortft"])["segment"]
    prompts = held_out_prompts(2)
    images = []
    for folder in (out, dst):
        fresh = load_tiny_model()
        names, segments = load_lora_set(fresh.unet, folder)
        plan = set_inference_plan(names, segments, tr.cfg.guidance)
        images.append(sample(fresh, prompts, seed=5, plan=plan, switch=AdapterSwitch(fresh.unet)))
    torch.testing.assert_close(images[1], images[0], atol=1e-5, rtol=0)
    before = (dst / "segment_1.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="already exists"):
        cli_main(["export", "--lora", str(out), "--layout", "kohya", "--out", str(dst)])
    assert (dst / "segment_1.safetensors").stat().st_mtime_ns == before
    assert cli_main(["export", "--lora", str(out), "--layout", "kohya", "--out", str(dst), "--overwrite"]) == 0
    assert read_set_manifest(dst)["layout"] == "kohya"
    assert not any(k.startswith("unet.") for k in read_lora(dst / "merged.safetensors")[0])
    with pytest.raises(SystemExit, match="own folder"):
        cli_main(["export", "--lora", str(out), "--out", str(out), "--overwrite"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="without set.json"):
        cli_main(["export", "--lora", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])

def test_a_set_that_leaves_the_last_segment_to_the_base(trained_set, tmp_path, fresh_tiny):
    """last_segment 'base': no file for segment 4 (null in set.json; one left by an earlier set in the folder is
    removed when overwriting), the merged LoRA averages the three segment networks over segments 1-3 only, and the
    set samples (core sampler, CLI export) exactly what the trainer's inference chain does, the base on segment 4."""
    import shutil

    from shortft_core.lora_set import LoraSet, convert_lora_set, sample_aligned

    _, tuned_folder, _ = trained_set
    folder = tmp_path / "lora"
    shutil.copytree(tuned_folder, folder)  # a 4-segment set from an earlier run, to be replaced
    model = fresh_tiny()
    cfg = TrainConfig(iterations=1, rank=4, eval_count=0, guidance=1.0, last_segment="base")
    tr = Trainer(model, load_tiny_rewards()[0], cfg, PromptSource(["a small red circle on the left on a white background"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in tr.lora.names:
            for p in adapter_parameters(model.unet, n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    with pytest.raises(FileExistsError, match="already exists"):
        tr.save_lora_set(folder)
    files = tr.save_lora_set(folder, overwrite=True)
    assert [f.name for f in files] == [f"segment_{j}.safetensors" for j in (1, 2, 3)] + ["merged.safetensors", "set.json"]
    assert not (folder / "segment_4.safetensors").exists()
    info = json.loads((folder / "set.json").read_text())
    assert info["segment_files"] == ["segment_1.safetensors", "segment_2.safetensors", "segment_3.safetensors", None]
    assert info["lora"]["last_segment"] == "base"
    lset = LoraSet.open(folder)
    assert [e.file.name if e.file else None for e in lset.schedule] == info["segment_files"]
    w = segment_weights(tr.lora.segments)
    sd, _ = read_lora(folder / "merged.safetensors")
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    key = "lora_unet_" + name.replace(".", "_")
    per = {n: adapter_modules(model.unet, n)[name] for n in tr.lora.names}
    want = sum(sum(w[j - 1] for j in range(i, 4)) * (per[f"align_{i}"].up @ per[f"align_{i}"].down) * per[f"align_{i}"].scale
               for i in range(1, 4))
    torch.testing.assert_close(sd[key + ".lora_up.weight"].float() @ sd[key + ".lora_down.weight"].float(), want,
                               rtol=5e-3, atol=5e-4)
    prompts = held_out_prompts(2)
    ref = tr.sample(prompts, seed=5)
    fresh = load_tiny_model()
    got = sample_aligned(fresh, prompts, lora_set=lset, seed=5, guidance=1.0)
    torch.testing.assert_close(got, ref, atol=3e-3, rtol=0)  # the files are fp16
    assert "sample_segment_1" not in (getattr(fresh.unet, "peft_config", {}) or {})  # removed again afterwards
    names, segments = load_lora_set(fresh.unet, folder)
    assert names == ["segment_1", "segment_2", "segment_3", None]
    steps = set_inference_plan(names, segments, 1.0).steps
    assert [s.net for s in steps if s.segment == 4] == ["base"] * 13
    # the set with the base on segment 4 differs from the same adapters with segment 3's stack carried on
    carried = sample(fresh, prompts, seed=5, plan=set_inference_plan(names[:3] + ["segment_3"], segments, 1.0),
                     switch=AdapterSwitch(fresh.unet))
    assert (carried - got).abs().max() > 1e-2
    converted = convert_lora_set(folder, tmp_path / "diffusers", load_tiny_model().unet, layout="diffusers")
    assert len(converted) == 5 and json.loads((tmp_path / "diffusers" / "set.json").read_text())["segment_files"][3] is None
    torch.testing.assert_close(sample_aligned(load_tiny_model(), prompts, lora_set=tmp_path / "diffusers", seed=5,
                                              guidance=1.0), got, atol=1e-5, rtol=0)


def test_stack_of_nothing_and_wrong_set_folder(tmp_path):
    assert stack_modules([]) == {}
    with pytest.raises(FileNotFoundError, match="set.json"):
        load_lora_set(load_tiny_model().unet, tmp_path)


def test_sample_cli_applies_one_lora_everywhere_and_refuses_both_options(trained_set, tmp_path, capsys):
    from PIL import Image

    _, out, _ = trained_set
    prompt = held_out_prompts(1)
    common = ["sample", "--prompts", *prompt, "--seed", "5", "--steps", "8"]
    assert cli_main(common + ["--out", str(tmp_path / "base")]) == 0
    assert cli_main(common + ["--lora", str(out / "merged.safetensors"), "--out", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "samples.json").read_text())["lora"] == str(out / "merged.safetensors")
    with Image.open(tmp_path / "base" / "0000.png") as a, Image.open(tmp_path / "merged" / "0000.png") as b:
        assert a.tobytes() != b.tobytes()
    with pytest.raises(SystemExit):
        cli_main(common + ["--lora", "x.safetensors", "--lora-set", str(out), "--out", str(tmp_path / "both")])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()
