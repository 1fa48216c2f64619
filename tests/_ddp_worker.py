"""Run by tests/test_ddp.py in each of two gloo processes (or alone with the doubled batch)."""

import os
import sys

import torch

torch.set_num_threads(1)
from shortft_core.adapters import SHORTCUT_ADAPTER, adapter_parameters, adapter_state, add_lora  # noqa: E402
from shortft_core.tiny_world import load_tiny_rewards  # noqa: E402
from shortft_core.loading import load_tiny_model  # noqa: E402
from shortft_core.loop import Callback  # noqa: E402
from shortft_core.prompts import PromptSource  # noqa: E402
from shortft_core.trainer import Trainer  # noqa: E402
from shortft_core.config import TrainConfig  # noqa: E402

out, batch = sys.argv[1], int(sys.argv[2])
model = load_tiny_model()
add_lora(model.unet, SHORTCUT_ADAPTER, 4, seed=7)
for p in adapter_parameters(model.unet, SHORTCUT_ADAPTER):
    p.requires_grad_(False)
alignment, _ = load_tiny_rewards()
cfg = TrainConfig(iterations=int(sys.argv[3]), batch_size=batch, rank=4, eval_count=0, lr=5e-3)
rank = int(os.environ.get("RANK", 0))


class StopOnRank1(Callback):
    """A stop request seen by rank 1 only (as a Ctrl-C reaching the ranks at different moments)."""

    def should_stop(self, trainer):
        return rank == 1 and len(sys.argv) > 4 and trainer.iteration >= int(sys.argv[4])


tr = Trainer(model, alignment, cfg, PromptSource.tiny(300), callbacks=[StopOnRank1()])
tr.fit()
grads = {n: [p.grad.clone() for p in adapter_parameters(model.unet, n) if p.grad is not None] for n in cfg.lora.names}
torch.save({"adapters": {n: adapter_state(model.unet, n) for n in cfg.lora.names}, "grads": grads,
            "world": tr.acc.num_processes, "iteration": tr.iteration}, os.path.join(out, f"rank{rank}.pt"))
