import numpy as np
import pytest

from shortft_core.tiny_world import scenes as S


def test_scenes_are_deterministic_per_seed_and_index():
    a, sa = S.make_scene(3, 17)
    b, sb = S.make_scene(3, 17)
    assert sa == sb and np.array_equal(a, b)
    c, _ = S.make_scene(4, 17)
    assert not np.array_equal(a, c)
    batch, scs = S.scene_batch(3, [5, 17])  # position in a batch does not matter
    assert np.array_equal(batch[1], a) and scs[1] == sa


def test_caption_round_trip_and_splits():
    for i in range(400):
        for split in ("train", "held_out"):
            s = S.sample_scene(11, i, split)
            assert S.parse_caption(s.caption) == s
            assert s.is_held_out == (split == "held_out")
            if split == "train":
                assert not any(o.pair in S.HELD_OUT_PAIRS for o in s.objects)


def test_caption_grammar_uses_articles_and_rejects_foreign_text():
    s = S.Scene((S.SceneObject("orange", "circle"), S.SceneObject("red", "square")), "white", relation="above")
    assert s.caption == "an orange circle above a red square on a white background"
    with pytest.raises(ValueError, match="not a tiny-world caption"):
        S.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="must differ"):
        S.Scene((S.SceneObject("red", "square"),) * 2, "white", relation="above")


def _object_mask(img: np.ndarray, colour: str) -> np.ndarray:
    ref = np.array(S.COLOURS[colour], dtype=np.int32)
    return np.abs(img.astype(np.int32) - ref).max(-1) < 40


def test_pictures_match_their_captions():
    """Colour present, single-object position and two-object relation are visible in the pixels."""
    checked_one = checked_two = 0
    for i in range(300):
        img, s = S.make_scene(5, i, "any")
        if len(s.objects) == 1:
            mask = _object_mask(img, s.objects[0].colour)
            assert mask.sum() >= 12, s.caption
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean(), ys.mean()
            expect = {"left": cx < 13, "right": cx > 18, "top": cy < 13, "bottom": cy > 18,
                      "center": 12 < cx < 20 and 12 < cy < 20}[s.position]
            assert expect, (s.caption, cx, cy)
            big = mask.sum()
            checked_one += 1
            if s.size == "small":
                assert big < 110, s.caption
            else:
                assert big > 110, s.caption
        elif s.objects[0].colour != s.objects[1].colour:
            (ya, xa), (yb, xb) = [np.nonzero(_object_mask(img, o.colour)) for o in s.objects]
            a, b = (xa.mean(), ya.mean()), (xb.mean(), yb.mean())
            expect = {"left of": a[0] < b[0] - 6, "right of": a[0] > b[0] + 6,
                      "above": a[1] < b[1] - 6, "below": a[1] > b[1] + 6}[s.relation]
            assert expect, (s.caption, a, b)
            checked_two += 1
    assert checked_one > 50 and checked_two > 50


def test_variants_change_exactly_one_attribute():
    s = S.sample_scene(0, 1, "train")
    for attr in ("colour", "shape", "position", "background"):
        vs = S.variants(s, attr)
        assert vs and all(v != s for v in vs)
        assert len({v.caption for v in vs}) == len(vs)
    with pytest.raises(ValueError, match="unknown attribute"):
        S.variants(s, "mood")


def test_held_out_prompts_are_distinct_and_held_out():
    ps = S.held_out_prompts(40, seed=2)
    assert len(set(ps)) == 40
    assert all(S.parse_caption(p).is_held_out for p in ps)
    assert ps == S.held_out_prompts(40, seed=2)
    assert not any(S.parse_caption(p).is_held_out for p in S.train_prompts(40))


def test_every_caption_word_is_in_the_vocabulary_list():
    words = set(S.vocabulary())
    for i in range(200):
        assert set(S.sample_scene(1, i, "any").caption.split()) <= words
