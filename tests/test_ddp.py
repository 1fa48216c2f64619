"""Multi-process training (DDP over gloo on CPU): gradients are averaged across ranks."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_ddp_worker.py")
ROOT = str(Path(__file__).resolve().parents[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(folder, batch, iterations, env, ranks, *extra):
    folder.mkdir()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(folder), str(batch), str(iterations), *extra],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)} if ranks > 1 else env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(ranks)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


def test_two_gloo_ranks_average_gradients(tmp_path):
    """Two ranks with batch 2 each: identical adapters on both ranks after training, and their first-iteration
    gradient equals a single process's with the doubled batch (the same prompts and noise)."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    ddp_env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    a, b = _run(tmp_path / "ddp3", 2, 3, ddp_env, 2)
    assert a["world"] == 2
    for name in a["adapters"]:
        for key in a["adapters"][name]:
            assert torch.equal(a["adapters"][name][key], b["adapters"][name][key]), (name, key)
    moved = any(v.abs().sum() > 0 for n in a["adapters"] for k, v in a["adapters"][n].items() if "lora_B" in k)
    assert moved  # training changed the adapters

    ddp_env["MASTER_PORT"] = str(_free_port())
    g2 = _run(tmp_path / "ddp1", 2, 1, ddp_env, 2)
    (one,) = _run(tmp_path / "single", 4, 1, base, 1)
    assert one["world"] == 1
    for name, grads in one["grads"].items():
        assert grads, name
        for r in g2:
            for g_ddp, g_one in zip(r["grads"][name], grads):
                torch.testing.assert_close(g_ddp, g_one, rtol=1e-4, atol=1e-7)
    # and the ranks' own halves differ, so the agreement above is the averaging, not identical local batches
    alone = _run(tmp_path / "half", 2, 1, base, 1)[0]
    assert any(not torch.allclose(x, y, rtol=1e-3, atol=1e-6)
               for n in alone["grads"] for x, y in zip(alone["grads"][n], one["grads"][n]))


def test_a_stop_request_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    """Ctrl-C (or a time budget) reaches ranks at different moments; if only the rank that saw it stopped, the
    other would wait forever in its next all-reduce. Rank 1 alone asks at iteration 1 of 4: both end there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    a, b = _run(tmp_path / "stop", 2, 4, env, 2, "1")
    assert a["iteration"] == b["iteration"] == 1
