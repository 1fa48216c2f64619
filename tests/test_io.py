import pytest

from shortft_core.io import atomic_path, atomic_write_text, refuse_overwrite


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_refuse_overwrite(tmp_path):
    p = tmp_path / "x"
    refuse_overwrite(p, False)
    p.write_text("user")
    with pytest.raises(FileExistsError, match="overwrite"):
        refuse_overwrite(p, False)
    refuse_overwrite(p, True)
