"""The bench scripts' configuration specs: a bad --only row is refused with a message that names the fix."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_only_rows_parse_and_bad_ones_name_the_fix():
    from bench_gpu import parse_row

    assert parse_row("sd15:shortft:none:2") == ("sd15", "shortft", "none", 2, False, None, False)
    assert parse_row("sdxl:draft-1:unet:1:peft") == ("sdxl", "draft-1", "unet", 1, True, None, False)
    te = parse_row("sdxl:shortft-cfg1:all:1:te:r32")
    assert (te.te_offload, te.rank) == (True, 32) and parse_row(te.spec()) == te
    assert te.label() == "shortft-cfg1 (rank 32) (text encoders offloaded)"
    row = parse_row("sdxl:shortft-cfg1:all:1:r32")
    assert (row.rank, row.peft) == (32, False) and parse_row(row.spec()) == row
    both = parse_row("sd15:shortft:none:2:r16:peft")
    assert (both.rank, both.peft) == (16, True) and parse_row(both.spec()) == both
    for bad in ("sd21:shortft:none:2", "sd15:bogus:none:2", "sd15:shortft:half:2", "sd15:shortft:none:x",
                "sd15:shortft:none:0", "sd15:shortft:none:2:fp8", "sd15:shortft:none", "sd15:shortft:none:2:r0",
                "sd15:shortft:none:2:r", "sd15:shortft:none:2:r8:r16", "sd15:shortft:none:2:peft:peft",
                "sd15:shortft:none:2:te:te"):
        with pytest.raises(ValueError, match="FAMILY sd15 or sdxl.*BATCH a positive integer.*RANK.*te for text"):
            parse_row(bad)


def test_rank_prediction_carries_pixels_then_rank_and_names_the_peak_op():
    """bench_peak_cpu --ranks: four synthetic runs with memory a + b p + c r + d p r per moment (plus weights
    affine in the rank) give the exact total at the predicted size and rank, and the op where it peaks."""
    from bench_peak_cpu import predict_rank

    coef = [(5, 1, 0, 0), (1, 0, 3, 0), (0, 1, 1, 2)]
    ops = ["aten.mm", "aten.add", "aten.silu_backward"]

    def run(size, rank):
        p = size ** 2
        return {"size": size, "rank": rank, "weights": 1000 + 7 * rank, "ops": ops,
                "trace": [a + b * p + c * rank + d * p * rank for a, b, c, d in coef]}

    total, where = predict_rank((run(2, 4), run(4, 4)), (run(2, 8), run(4, 8)), 8, 128)
    assert total == 1000 + 7 * 128 + max(a + b * 64 + c * 128 + d * 64 * 128 for a, b, c, d in coef)
    assert where == "aten.silu_backward at 67%"
    bad = dict(run(4, 4), ops=["x", "y", "z"])
    with pytest.raises(RuntimeError, match="different ops"):
        predict_rank((run(2, 4), bad), (run(2, 8), run(4, 8)), 8, 128)


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "8", "8"], "two different positive ranks"),
    (["--ranks", "0", "8"], "two different positive ranks"),
    (["--rank", "32"], "--rank needs --ranks"),
    (["--sizes", "128", "130"], "two different positive multiples of 8"),
    (["--only", "sdxl:shortft:all:1:r-4"], "RANK the alignment set's rank"),
])
def test_peak_bench_refuses_bad_arguments_before_building_a_model(monkeypatch, capsys, argv, message):
    import bench_peak_cpu

    monkeypatch.setattr(sys, "argv", ["bench_peak_cpu.py", *argv])
    monkeypatch.setattr(bench_peak_cpu, "build", lambda *a, **k: pytest.fail("built a model despite bad arguments"))
    with pytest.raises(SystemExit) as exc:
        bench_peak_cpu.main()
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_shortcut_worth_in_base_steps():
    from bench_shortcut import equivalent_steps

    naive = {1: 0.08, 2: 0.04, 4: 0.01}
    assert equivalent_steps(0.08, naive) == pytest.approx(1.0)
    assert equivalent_steps(0.04, naive) == pytest.approx(2.0)
    assert equivalent_steps(0.02, naive) == pytest.approx(3.0)  # halfway between 2 and 4 in log error
    assert equivalent_steps(0.1, naive) is None and equivalent_steps(0.005, naive) is None


def _run(variant, seed, sym, align, stage_sym=None):
    evals = [{"iteration": 0, "seconds": 0.0, "symmetry": -0.07, "alignment": 0.84, "aesthetic": 9.2},
             {"iteration": 10, "seconds": 60.0, "symmetry": sym - 0.01, "alignment": align, "aesthetic": 9.0},
             {"iteration": 20, "seconds": 120.0, "symmetry": sym, "alignment": align, "aesthetic": 9.0}]
    rows = [] if stage_sym is None else [{"iteration": 10, "seconds": 60.0, "stage": 3,
                                          **{f"{c}/{k}": v for c in ("stage-chain", "stage-chain-no-anchors")
                                             for k, v in (("symmetry", stage_sym), ("alignment", align),
                                                          ("aesthetic", 9.0))}}]
    return {"variant": variant, "seed": seed, "reward": "symmetry", "reg_weight": 0.5, "budget_s": 120.0,
            "eval_prompts": 128, "iterations": 20, "evals": evals, "stage_chain_evals": rows,
            "efficiency_ratio": 1.0, "sec_per_iteration": 6.0, "peak_rss_mib": 1000.0}


def test_symmetry_tables_rank_by_the_trained_mix_with_welch_t(tmp_path):
    """The symmetry comparison ranks by symmetry + w * alignment, not symmetry alone: a variant with the best
    symmetry but a worse mix is behind; the difference to the best baseline and its Welch t are exact; the
    stage-chain evaluations get their own table, one row per reward; the plot is written."""
    import numpy as np
    from bench_methods import aggregate

    results = [_run("shortft", s, -0.03 + 0.001 * s, 0.60, stage_sym=-0.05) for s in range(3)]
    results += [_run("drtune", s, -0.045 + 0.002 * s, 0.82) for s in range(3)]
    results += [_run("refl", s, -0.046, 0.80 + 0.001 * s) for s in range(3)]
    table = aggregate(results, tmp_path)
    assert "best baseline: drtune" in table and "held-out symmetry + 0.5 x alignment (trained)" in table
    a = np.array([-0.03 + 0.001 * s + 0.5 * 0.60 for s in range(3)])
    b = np.array([-0.045 + 0.002 * s + 0.5 * 0.82 for s in range(3)])
    t = (a.mean() - b.mean()) / np.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 3)
    row = next(line for line in table.splitlines() if line.startswith("| shortft |"))
    assert f"{a.mean() - b.mean():+.4f} ({t:+.1f})" in row and "not reached" in row
    stage = {line.split(" | ")[2]: line.split(" | ")[3:] for line in table.splitlines()
             if line.startswith("| shortft | 60 s, stage 3")}
    assert set(stage) == {"objective", "symmetry", "alignment", "aesthetic"}
    assert stage["objective"][1].startswith(f"{-0.05 + 0.5 * 0.60:.4f} +- 0.0000")  # the stage chain's mix
    assert stage["symmetry"][0].startswith(f"{np.mean([-0.04 + 0.001 * s for s in range(3)]):.4f}")  # full chain
    assert stage["symmetry"][1].startswith("-0.0500")
    assert (tmp_path / "table.md").read_text().strip() == table.strip()
    assert (tmp_path / "reward_vs_time.png").stat().st_size > 10_000
