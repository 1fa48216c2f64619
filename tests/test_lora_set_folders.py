"""Finding LoRA set folders under a LoRA folder (what the ComfyUI set combos list) and resolving a listed name."""

import pytest

from shortft_core.lora_set import find_lora_sets, lora_set_folder


def _set(folder):
    folder.mkdir(parents=True)
    (folder / "set.json").write_text("{}")
    return folder


def test_find_lora_sets_lists_set_folders_relative_to_the_root(tmp_path):
    root = tmp_path / "loras"
    _set(root / "runA")
    _set(root / "team" / "runB")
    _set(root / "runA" / "nested")  # inside a set: not searched
    _set(root / ".hidden" / "runC")
    (root / "plain").mkdir()
    (root / "plain" / "style.safetensors").write_bytes(b"")
    (root / "team" / "loop").symlink_to(root, target_is_directory=True)  # a link back up the tree is not followed
    assert find_lora_sets(root) == ["runA", "team/runB"]
    assert find_lora_sets(tmp_path / "missing") == []


def test_find_lora_sets_follows_links_to_other_folders(tmp_path):
    _set(tmp_path / "store" / "runD")
    root = tmp_path / "loras"
    root.mkdir()
    (root / "shared").symlink_to(tmp_path / "store", target_is_directory=True)
    assert find_lora_sets(root) == ["shared/runD"]


def test_lora_set_folder_resolves_in_root_order(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _set(second / "team" / "run")
    assert lora_set_folder([first, second], "team/run") == second / "team" / "run"
    _set(first / "team" / "run")
    assert lora_set_folder([first, second], "team/run") == first / "team" / "run"


@pytest.mark.parametrize("name", ["", "/abs/run", "../run", "team/../../run"])
def test_lora_set_folder_refuses_names_outside_the_roots(tmp_path, name):
    with pytest.raises(ValueError, match="relative to a LoRA folder"):
        lora_set_folder([tmp_path], name)


def test_lora_set_folder_names_the_roots_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no LoRA set 'run'.*{tmp_path}"):
        lora_set_folder([tmp_path], "run")
