import json

import pytest
import torch

from shortft_core.tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer, write_clip_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_clip_tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


TEXTS = ["a red circle left of a blue square on a white background", "Hello, World! ümlauts 123 #tags",
         "a photo of an astronaut riding a horse on mars, trending on artstation"]


def test_vocabulary_is_full_clip(tok):
    assert tok.vocab_size == CLIP_VOCAB_SIZE > 0
    assert tok.model_max_length == 77
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 49407


def test_ids_equal_open_clip(tok):
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    ids = tok(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for r, i in zip(ref, ids):
        n = int((r != 0).sum())  # open_clip pads with 0, SD1.5's tokenizer with <|endoftext|>
        assert torch.equal(r[:n], i[:n])
        assert (i[n:] == 49407).all()


def test_round_trip(tok):
    for t in TEXTS:  # CLIP decodes punctuation as separate words; re-encoding the decoded text is exact
        ids = tok(t).input_ids
        assert tok(tok.decode(ids, skip_special_tokens=True)).input_ids == ids
    plain = TEXTS[0]
    assert tok.decode(tok(plain).input_ids, skip_special_tokens=True).strip() == plain


def test_missing_and_damaged_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_clip_tokenizer(tmp_path)
    folder = write_clip_tokenizer(tmp_path / "t")
    (folder / "vocab.json").write_text(json.dumps({"a": 0, "<|endoftext|>": 1}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(RuntimeError, match="expected 49408"):
        load_clip_tokenizer(folder)
