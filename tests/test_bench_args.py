"""The bench scripts' configuration specs: a bad --only row is refused with a message that names the fix."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_only_rows_parse_and_bad_ones_name_the_fix():
    from bench_gpu import parse_row

    assert parse_row("sd15:shortft:none:2") == ("sd15", "shortft", "none", 2)
    assert parse_row("sdxl:draft-1:unet:1:peft") == ("sdxl", "draft-1", "unet", 1, "peft")
    for bad in ("sd21:shortft:none:2", "sd15:bogus:none:2", "sd15:shortft:half:2", "sd15:shortft:none:x",
                "sd15:shortft:none:0", "sd15:shortft:none:2:fp8", "sd15:shortft:none"):
        with pytest.raises(ValueError, match="FAMILY sd15 or sdxl.*BATCH a positive integer"):
            parse_row(bad)
