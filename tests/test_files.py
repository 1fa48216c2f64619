import json
import os
import stat

import pytest

from shortft_core.files import atomic_path, atomic_write_text, refuse_overwrite


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


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["022", "077", "002"])
def test_written_files_get_the_mode_of_the_users_umask(tmp_path, umask, mode):
    import torch
    from safetensors.torch import load_file, save_file

    from shortft_core.images import save_png
    from shortft_core.files import atomic_save, atomic_write_json, current_umask

    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_json(tmp_path / "history.json", {"a": 1})
        atomic_save(tmp_path / "x.safetensors", lambda p: save_file({"t": torch.ones(2)}, p))
        save_png(torch.rand(3, 8, 8), tmp_path / "img.png")
        atomic_write_json(tmp_path / "history.json", {"a": 2})  # replacing a file gives the same mode
    finally:
        os.umask(previous)
    for name in ("history.json", "x.safetensors", "img.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert json.loads((tmp_path / "history.json").read_text()) == {"a": 2}
    assert load_file(str(tmp_path / "x.safetensors"))["t"].tolist() == [1.0, 1.0]


def test_umask_fallback_is_the_import_time_value(monkeypatch):
    """Where /proc/self/status has no Umask line, the value read once at import is used."""
    import builtins

    from shortft_core import files

    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path) == "/proc/self/status":
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(files, "_IMPORT_UMASK", 0o027)
    assert files.current_umask() == 0o027 and files.new_file_mode() == 0o640
