"""The one Segments type: a LoRA set's segments and a shortcut's grid."""


import pytest

from shortft_core.lora_set import schedule_of
from shortft_core.schedule import FINAL, leading_grid
from shortft_core.segments import Segments, check_edges


def test_lora_set_segments_on_the_50_step_grid():
    segs = Segments((761, 501, 261, 0))
    by_segment = {}
    for t in leading_grid(50):
        by_segment.setdefault(segs.segment_of(t), []).append(t)
    assert [(v[0], v[-1]) for v in by_segment.values()] == [(981, 761), (741, 501), (481, 261), (241, 1)]
    assert segs.range_of(1) == (761, 999) and segs.range_of(4) == (0, 260)
    assert segs.upper(2) == 761 and segs.upper(1) == 999
    with pytest.raises(ValueError, match="strictly descending"):
        Segments((261, 501, 761, 0))
    with pytest.raises(ValueError, match="outside"):
        segs.segment_of(1000)


def test_shortcut_grid_jumps():
    segs = Segments.from_edges((999, 749, 499, 249))
    assert segs.lowers == (749, 499, 249, 0)
    assert segs.edge_pairs() == [(999, 749), (749, 499), (499, 249), (249, FINAL)]
    # an upper edge belongs to the segment below it: from 749 a call lands on 499
    assert segs.jump_target(741) == 499 and segs.jump_target(501) == 499 and segs.jump_target(749) == 499
    assert segs.jump_target(481) == 249 and segs.jump_target(241) == FINAL
    assert segs.jump_target(999) == 749 and segs.jump_target(750) == 749
    for ok in [(741, 501), (481, 261), (241, 1), (749, 499), (999, 749), (249, FINAL)]:
        assert segs.covers(*ok), ok
    for bad in [(761, 501), (741, 481), (501, 501), (501, 741)]:
        assert not segs.covers(*bad), bad
    assert Segments.whole().covers(999, FINAL)
    with pytest.raises(ValueError, match="shortcut_edges must be strictly decreasing"):
        check_edges((749, 999), "shortcut_edges")


def test_set_schedule_reads_the_manifest(tmp_path):
    info = {"segments": [[761, 999], [501, 760], [261, 500], [0, 260]],
            "segment_files": [f"segment_{j}.safetensors" for j in range(1, 5)]}
    sched = schedule_of(tmp_path, info)
    assert [e.segment for e in sched] == [1, 2, 3, 4]
    assert sched[2].timesteps == (261, 500) and sched[2].file == tmp_path / "segment_3.safetensors"
    info["segments"][1] = [500, 760]  # overlaps segment 3
    with pytest.raises(ValueError, match="do not tile"):
        schedule_of(tmp_path, info)
