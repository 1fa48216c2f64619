"""Shared fixtures. Every test runs offline: nothing may reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    from shortft_core.loading import load_tiny_model

    return load_tiny_model()


@pytest.fixture(scope="session")
def fresh_tiny():
    """A factory: a new tiny model, by default with a random frozen rank-4 'shortcut' adapter (training tests)."""
    def make(with_shortcut: bool = True):
        from shortft_core.adapters import SHORTCUT_ADAPTER, adapter_parameters, add_lora
        from shortft_core.loading import load_tiny_model

        model = load_tiny_model()
        if with_shortcut:
            add_lora(model.unet, SHORTCUT_ADAPTER, 4, seed=7)
            for p in adapter_parameters(model.unet, SHORTCUT_ADAPTER):
                p.requires_grad_(False)
        return model

    return make


@pytest.fixture(scope="session")
def tiny_rewards():
    from shortft_core.tiny_world import load_tiny_rewards

    return load_tiny_rewards()


# Small models gain little from a second thread, and on a busy 2-core machine two threads can be 100x slower.
torch.set_num_threads(int(os.environ.get("SHORTFT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server for the session (tier 2), with this repository linked into its custom_nodes; it is
    stopped when the session ends, whatever the tests did. Skips naming what is missing."""
    from comfy_harness import ComfyServer, comfyui_or_skip

    comfy = comfyui_or_skip()
    with ComfyServer(comfy) as server:
        yield server


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory):
    """One random-weight single-file checkpoint of the full SD1.5 architecture (fp16, ~2 GB) for the session: what
    ComfyUI's CheckpointLoaderSimple and shortft_core.loading.load_model both read (about a minute to build)."""
    from shortft_core.testing import random_models

    model = random_models.random_model("sd15", dtype=torch.bfloat16, seed=21)
    path = random_models.write_ldm_checkpoint(model, tmp_path_factory.mktemp("sd15") / "sd15_random.safetensors",
                                              dtype=torch.float16)
    del model
    return path
