"""The shapes world: captions read back exactly, a compositional split, deterministic renders, and data the training
script reads through its normal paths."""

import json

import pytest

from diffusers_disback.shapes import (
    ATTRIBUTES,
    HELD_OUT_PAIRS,
    Scene,
    all_scenes,
    render,
    write_imagefolder,
    write_prompts,
)


def test_captions_round_trip_and_the_split_is_compositional():
    scenes = all_scenes()
    assert len(scenes) == 6 * 3 * 4 * 2 and len({s.caption for s in scenes}) == len(scenes)
    assert all(Scene.from_caption(s.caption) == s for s in scenes)
    train, held_out = all_scenes("train"), all_scenes("held_out")
    assert len(train) == 120 and len(held_out) == 24 and not set(train) & set(held_out)
    assert {(s.colour, s.shape) for s in held_out} == set(HELD_OUT_PAIRS)
    # every attribute value is still seen in training, only the pairs are new
    for name, values in ATTRIBUTES.items():
        assert {getattr(s, name) for s in train} == set(values)
    with pytest.raises(ValueError, match="not a caption of the shapes world"):
        Scene.from_caption("a cat on a mat")


def test_renders_are_deterministic_and_show_the_scene():
    scene = Scene("blue", "square", "bottom right", "gray")
    a, b, c = render(scene, 1), render(scene, 1), render(scene, 2)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    assert a.getpixel((2, 2)) == (128, 128, 128) and a.getpixel((48, 48)) == (50, 90, 230)  # its quadrant
    assert a.getpixel((16, 16)) == (128, 128, 128)


def test_imagefolder_and_prompts_are_what_the_script_reads(tmp_path):
    from diffusers_disback.training import ImageStream, PromptStream

    folder = write_imagefolder(str(tmp_path / "real"), 6, seed=3)
    lines = [json.loads(x) for x in (tmp_path / "real" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(not Scene.from_caption(x["text"]).held_out for x in lines)
    stream = ImageStream(64, data_dir=folder, shuffle_buffer=0)
    pixels, caption = stream.take(1)[0]
    assert pixels.shape == (3, 64, 64) and caption == lines[0]["text"]
    prompts = PromptStream(data_files=write_prompts(str(tmp_path / "p.txt")), shuffle_buffer=0).take(120)
    assert len(set(prompts)) == 120
