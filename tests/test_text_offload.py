"""Text encoders kept in host memory (``offload_text_encoders``): the same conditioning as resident encoders, an
LRU cache that spares the encoders for prompts seen before, weights that really leave the device (CUDA), and the
trainer flag that turns it on."""

import pytest
import torch

from shortft_core.testing import random_models
from shortft_core.loading import load_model

PROMPTS = ["a red circle left of a blue square on a white background", "", "a green triangle on a black background"]


class Calls:
    """Counts forward calls of every text encoder (each call is one encoding of a batch)."""

    def __init__(self, model):
        self.n = 0
        self.handles = [enc.register_forward_hook(self.hook) for enc in model.text_encoders]

    def hook(self, *_):
        self.n += 1


@pytest.fixture
def tiny():
    return load_model("tiny", "cpu", torch.float32)


@pytest.fixture(scope="module")
def small_sdxl(tmp_path_factory):
    folder = random_models.write_small_configs("sdxl", tmp_path_factory.mktemp("sdxl_cfg"))
    return random_models.random_model("sdxl", config_dir=folder)


def test_offloaded_encoding_equals_resident_and_is_cached(tiny):
    resident = tiny.encode_prompts(PROMPTS)
    assert tiny.offload_text_encoders(cache_size=2) == 0  # nothing to free on a CPU model
    calls = Calls(tiny)
    first = tiny.encode_prompts(PROMPTS)
    torch.testing.assert_close(first.hidden, resident.hidden, rtol=1e-5, atol=1e-6)
    assert calls.n == 3  # one call per distinct prompt: features never depend on their batch
    assert list(tiny.text_offload.cache) == PROMPTS[1:]  # LRU of 2: the first prompt was evicted
    again = tiny.encode_prompts([PROMPTS[2], PROMPTS[1], PROMPTS[2]])
    assert calls.n == 3  # all cached: no encoder call
    assert torch.equal(again.hidden, first.hidden[[2, 1, 2]])
    tiny.encode_prompts(PROMPTS[:1])  # evicts the least recently used: PROMPTS[2] (PROMPTS[1] was looked up after it)
    assert calls.n == 4 and list(tiny.text_offload.cache) == [PROMPTS[1], PROMPTS[0]]
    # a prompt's features do not depend on the cache: the evicted one comes back bit for bit
    assert torch.equal(tiny.encode_prompts(PROMPTS[:1]).hidden[0], first.hidden[0])


def test_weights_point_at_host_copies_and_onload_restores(tiny):
    before = [p.detach().clone() for p in tiny.text_encoders[0].parameters()]
    tiny.offload_text_encoders()
    off = tiny.text_offload
    assert off.nbytes == sum(p.numel() * p.element_size() for p in tiny.text_encoders[0].parameters()) \
        + sum(b.numel() * b.element_size() for b in tiny.text_encoders[0].buffers())
    tiny.encode_prompts(PROMPTS)
    hosts = {h.data_ptr() for h in off.host}
    assert all(p.data_ptr() in hosts for p in tiny.text_encoders[0].parameters())  # returned after the lend
    tiny.onload_text_encoders()
    assert tiny.text_offload is None
    for p, b in zip(tiny.text_encoders[0].parameters(), before):
        assert p.device == tiny.device and torch.equal(p, b)
    calls = Calls(tiny)
    tiny.encode_prompts(PROMPTS)
    tiny.encode_prompts(PROMPTS)
    assert calls.n == 2  # resident again: one batched call per encode, no cache


def test_model_to_follows_into_the_host_copies(tiny):
    tiny.offload_text_encoders()
    tiny.encode_prompts(PROMPTS[:1])
    tiny.to(dtype=torch.bfloat16)
    assert all(h.dtype == torch.bfloat16 for h in tiny.text_offload.host if h.is_floating_point())
    assert not tiny.text_offload.cache  # features of the old dtype are not served again
    c = tiny.encode_prompts(PROMPTS[:1])
    assert c.hidden.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in tiny.text_encoders[0].parameters())


def test_sdxl_pooled_and_time_ids_survive_the_cache(small_sdxl):
    m = small_sdxl
    resident = m.encode_prompts(PROMPTS, size=(64, 48))
    m.offload_text_encoders()
    try:
        for _ in range(2):  # first from the encoders, then from the cache
            c = m.encode_prompts(PROMPTS, size=(64, 48))
            torch.testing.assert_close(c.hidden, resident.hidden, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(c.added["text_embeds"], resident.added["text_embeds"], rtol=1e-5, atol=1e-5)
            assert torch.equal(c.added["time_ids"], resident.added["time_ids"])
    finally:
        m.onload_text_encoders()


def test_trainable_encoders_and_bad_cache_size_are_refused(tiny):
    with pytest.raises(ValueError, match="cache_size"):
        tiny.offload_text_encoders(cache_size=-1)
    tiny.text_encoders[0].requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters.*freeze"):
        tiny.offload_text_encoders()
    assert tiny.text_offload is None


def test_trainer_flag_offloads_and_trains_like_resident(tiny):
    from shortft_core.prompts import PromptSource
    from shortft_core.trainer import Trainer
    from shortft_core.config import TrainConfig
    from shortft_core.rewards.registry import build_reward_spec
    from shortft_core.shortcut import load_shortcut
    from shortft_core.tiny_world import tiny_shortcut_path

    losses = {}
    for offload in (False, True):
        m = load_model("tiny", "cpu", torch.float32)
        load_shortcut(m.unet, tiny_shortcut_path())
        cfg = TrainConfig(iterations=2, batch_size=2, rank=4, eval_count=0, offload_text_encoders=offload)
        tr = Trainer(m, build_reward_spec("tiny_alignment"), cfg, PromptSource(PROMPTS[:1] + PROMPTS[2:]))
        assert (m.text_offload is not None) == offload
        losses[offload] = [tr.train_step()["loss"] for _ in range(2)]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (weights leaving the GPU)")
def test_cuda_weights_leave_the_device():
    m = load_model("tiny", "cuda", torch.bfloat16)
    resident = m.encode_prompts(PROMPTS)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    freed = m.offload_text_encoders()
    torch.cuda.synchronize()
    assert freed == m.text_offload.nbytes > 0
    assert before - torch.cuda.memory_allocated() >= freed * 0.99
    assert all(p.device.type == "cpu" and p.is_pinned() for p in m.text_encoders[0].parameters())
    c = m.encode_prompts(PROMPTS)
    assert c.hidden.device.type == "cuda"
    torch.testing.assert_close(c.hidden, resident.hidden, rtol=2e-2, atol=2e-2)
    assert all(p.device.type == "cpu" for p in m.text_encoders[0].parameters())
