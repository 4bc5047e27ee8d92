"""Evaluation: protocol, captions, generation (seeds, resume, batch size, processes), FID, patch-FID, CLIP score.

Offline: a tiny pipeline, a tiny captioned image set, and tiny stand-ins for Inception and CLIP
(`diffusers_disback.testing`). clean-fid's own resizer runs; the published networks do not (no downloads here).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_disback import DisBackPipeline, DisBackScheduler
from diffusers_disback.evaluation import (
    PROTOCOLS,
    CaptionSet,
    EvalProtocol,
    ReferenceImages,
    ReferenceStatistics,
    center_crop,
    compute_features,
    evaluate,
    feature_statistics,
    fid_transform,
    frechet_distance,
    generate_images,
    get_protocol,
    patch_fid_transform,
)
from diffusers_disback.testing import (
    TinyFeatureExtractor,
    get_sdxl_components,
    get_tiny_clip_scorer,
    save_tiny_teacher,
    write_tiny_caption_set,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pipe():
    components = get_sdxl_components("tiny")
    components["scheduler"] = DisBackScheduler()
    pipeline = DisBackPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory):
    return write_tiny_caption_set(str(tmp_path_factory.mktemp("captions")), num=24)


@pytest.fixture(scope="module")
def extractor():
    return TinyFeatureExtractor(dim=16)


def _tiny_protocol(**kw):
    return EvalProtocol(**{"name": "tiny", "num_prompts": 8, "resolution": 64, "fid_resolution": 64,
                           "patch_fid": False, **kw})  # fmt: skip


def _arrays(folder, n):
    return [np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png"))).astype(int) for i in range(n)]


# --------------------------------------------------------------------------------------------------- protocol
def test_presets_are_the_published_protocol():
    sdxl = get_protocol("sdxl-coco10k")
    assert (sdxl.num_prompts, sdxl.resolution, sdxl.fid_resolution, sdxl.patch_fid) == (10_000, 1024, 512, True)
    assert (sdxl.clip_model, sdxl.clip_pretrained, sdxl.clip_resolution) == ("ViT-g-14", "laion2b_s12b_b42k", 256)
    assert sdxl.clip_prefix == "A photo depicts " and (sdxl.num_inference_steps, sdxl.guidance_scale) == (1, 0.0)
    sd15 = PROTOCOLS["sd15-coco30k"]
    assert (sd15.num_prompts, sd15.resolution, sd15.fid_resolution) == (30_000, 512, 256)
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("coco")


def test_protocol_rejects_bad_settings():
    with pytest.raises(ValueError, match="divisible by 8.*1016 or 1024"):
        EvalProtocol(resolution=1020)
    with pytest.raises(ValueError, match="patch-FID.*299"):
        EvalProtocol(resolution=256, patch_fid=True)
    assert get_protocol("sdxl-coco10k").replace(num_prompts=100).num_prompts == 100


# ------------------------------------------------------------------------------------------------- transforms
def test_center_crop_rounds_like_torchvision():
    # pixel (y, x) holds (y % 256, x % 256, 0): the crop's first pixel tells its offset
    h, w = 480, 641
    yy, xx = np.mgrid[0:h, 0:w]
    image = Image.fromarray(np.stack([yy % 256, xx % 256, 0 * yy], -1).astype(np.uint8))
    crop = np.asarray(center_crop(image, 299))
    # (480 - 299) / 2 = 90.5 -> 90 (round half to even), (641 - 299) / 2 = 171
    assert crop.shape == (299, 299, 3) and (crop[0, 0, 0], crop[0, 0, 1]) == (90, 171)
    square = np.asarray(fid_transform(None)(np.asarray(image)))
    assert square.shape == (480, 480, 3) and square[0, 0, 1] == 80  # (641 - 480) / 2 = 80.5 -> 80
    assert fid_transform(512)(np.asarray(image)).shape == (512, 512, 3)
    with pytest.raises(ValueError, match="at least 299x299"):
        patch_fid_transform(299)(np.zeros((200, 400, 3), np.uint8))


# ------------------------------------------------------------------------------------------------------ FID
def test_frechet_distance_matches_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(mu1, np.diag(a), mu1[:2], np.diag(a[:2]))


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(caption_dir, extractor):
    images = [np.asarray(im) for im in CaptionSet.from_dataset(caption_dir, "train").images()]
    stats = feature_statistics(compute_features(images, extractor, fid_transform(64)))
    assert frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-6)
    rng = np.random.default_rng(0)
    fids = []
    for sigma in (8, 24, 64):
        noisy = [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8) for im in images]
        fids.append(
            frechet_distance(*feature_statistics(compute_features(noisy, extractor, fid_transform(64))), *stats)
        )
    assert 0 < fids[0] < fids[1] < fids[2]


def test_feature_networks_are_told_apart_by_their_weights():
    from diffusers_disback.evaluation import extractor_id

    assert extractor_id(TinyFeatureExtractor(seed=0)) == extractor_id(TinyFeatureExtractor(seed=0))
    assert extractor_id(TinyFeatureExtractor(seed=0)) != extractor_id(TinyFeatureExtractor(seed=1))
    unnamed = TinyFeatureExtractor(seed=0)
    del unnamed.name
    other = TinyFeatureExtractor(seed=2)
    del other.name
    assert extractor_id(unnamed) != extractor_id(other)  # same class, other weights


def test_reference_statistics_are_computed_once_and_reused(caption_dir, extractor, tmp_path):
    captions = CaptionSet.from_dataset(caption_dir, "train", num=12)
    first, cached = ReferenceStatistics.get_or_compute(
        str(tmp_path), "key", captions.images, extractor, fid_transform(64), metadata={"source": "test"}
    )
    assert not cached and first.count == 12 and os.path.exists(first.path)

    def must_not_load():
        raise AssertionError("the cache should have answered")

    again, cached = ReferenceStatistics.get_or_compute(
        str(tmp_path), "key", must_not_load, extractor, fid_transform(64)
    )
    assert cached and again.count == 12
    np.testing.assert_array_equal(again.mu, first.mu)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    with open(first.path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="not a reference-statistics file.*delete it"):
        ReferenceStatistics.load(first.path)


# ------------------------------------------------------------------------------------------------ CLIP score
def test_clip_score_plumbing():
    scorer = get_tiny_clip_scorer()
    captions = ["a cat on the table", "two dogs"]
    assert torch.equal(scorer.tokenize(captions), scorer.tokenizer(["A photo depicts " + c for c in captions]))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(5)]
    texts = ["a cat", "the red bus", "a dog with a tree", "two men", "blue street"]
    sims = scorer.similarities(images, texts)
    assert sims.shape == (5,) and bool(((sims >= -1) & (sims <= 1)).all())
    assert scorer.score(images, texts, batch_size=2) == pytest.approx(float(sims.mean()), abs=1e-6)
    assert scorer.score(images, texts, batch_size=5) == pytest.approx(float(sims.mean()), abs=1e-6)
    unprefixed = get_tiny_clip_scorer(prefix="")
    assert unprefixed.score(images, texts) != pytest.approx(float(sims.mean()), abs=1e-6)
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        scorer.similarities(images, texts[:4])


# -------------------------------------------------------------------------------------------------- captions
def test_coco_captions_one_per_image(caption_dir):
    everything = CaptionSet.from_coco(os.path.join(caption_dir, "captions.json"), caption_dir)
    assert len(everything) == 24 and not any(c.startswith("another") for c in everything.captions)
    rows = [json.loads(line) for line in open(os.path.join(caption_dir, "metadata.jsonl"))]
    assert everything.captions == [r["text"] for r in rows]  # the lowest annotation id, images in id order
    subset = CaptionSet.from_coco(os.path.join(caption_dir, "captions.json"), caption_dir, num=10, seed=3)
    again = CaptionSet.from_coco(os.path.join(caption_dir, "captions.json"), caption_dir, num=10, seed=3)
    assert subset.captions == again.captions and subset.fingerprint == again.fingerprint
    assert set(subset.captions) <= set(everything.captions)
    assert len(list(subset.images())) == 10
    with pytest.raises(FileNotFoundError, match="not in"):
        CaptionSet.from_coco(os.path.join(caption_dir, "captions.json"), "/nonexistent")


def test_caption_sources_and_their_errors(caption_dir, tmp_path):
    ds = CaptionSet.from_dataset(caption_dir, num=5)  # a local folder's split is "train" by default
    assert len(ds) == 5 and ds.has_images and next(ds.images()).size == (320, 304)
    txt = tmp_path / "captions.txt"
    txt.write_text("a cat\n\nthe dog\n")
    text = CaptionSet.from_text_file(str(txt))
    assert text.captions == ["a cat", "the dog"] and not text.has_images
    with pytest.raises(ValueError, match="only 2"):
        CaptionSet.from_text_file(str(txt), num=3)
    with pytest.raises(ValueError, match="no caption column 'title'.*columns are"):
        CaptionSet.from_dataset(caption_dir, "train", caption_column="title")
    with pytest.raises(ValueError, match="FID needs reference images"):
        evaluate(None, text, str(tmp_path / "out"), _tiny_protocol(num_prompts=2))
    with pytest.raises(ValueError, match="no metric left"):
        evaluate(None, ds, str(tmp_path / "out"), _tiny_protocol(num_prompts=2), metrics=["patch_fid"])
    # the references of exactly the prompts used, whatever the caption set's length
    first3 = ReferenceImages.from_caption_set(ds, 3)
    assert first3.count == 3 and len(list(first3.loader())) == 3 and first3.fingerprint != ds.fingerprint


# ------------------------------------------------------------------------------------------------ generation
def test_generation_is_seeded_resumable_and_independent_of_batch_size(pipe, tmp_path):
    captions = [f"a photo number {i}" for i in range(5)]
    common = dict(seed=7, resolution=64, num_inference_steps=1, progress=False)
    first = generate_images(pipe, captions, str(tmp_path / "a"), batch_size=1, **common)
    assert first == {"generated": 5, "skipped": 0}
    generate_images(pipe, captions, str(tmp_path / "b"), batch_size=3, **common)
    a, b = _arrays(tmp_path / "a", 5), _arrays(tmp_path / "b", 5)
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b)) <= 1  # batch size: at most fp rounding of one level
    assert all(not np.array_equal(a[0], x) for x in a[1:])  # each image has its own seed

    again = generate_images(pipe, captions, str(tmp_path / "c"), batch_size=1, **common)
    assert again["generated"] == 5 and all(np.array_equal(x, y) for x, y in zip(a, _arrays(tmp_path / "c", 5)))

    # resume: only the missing images are generated, and they come out the same
    kept = os.path.getmtime(tmp_path / "a" / "00000.png")
    os.remove(tmp_path / "a" / "00002.png")
    os.remove(tmp_path / "a" / "00004.png")
    resumed = generate_images(pipe, captions, str(tmp_path / "a"), batch_size=2, **common)
    assert resumed == {"generated": 2, "skipped": 3}
    assert os.path.getmtime(tmp_path / "a" / "00000.png") == kept
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, _arrays(tmp_path / "a", 5))) <= 1
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp.png")]

    with pytest.raises(ValueError, match="other settings.*seed: 7 -> 8"):
        generate_images(pipe, captions, str(tmp_path / "a"), batch_size=2, **{**common, "seed": 8})
    # a setting that is dropped, or another dtype, is a change too (no mixed image sets)
    generate_images(pipe, captions[:2], str(tmp_path / "n"), negative_prompt="blurry", **common)
    os.remove(tmp_path / "n" / "00001.png")
    with pytest.raises(ValueError, match="negative_prompt: 'blurry' -> None"):
        generate_images(pipe, captions[:2], str(tmp_path / "n"), **common)
    settings = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert settings["dtype"] == "torch.float32" and settings["scheduler"] == "DisBackScheduler"


# ------------------------------------------------------------------------------------------------ end to end
def test_evaluate_end_to_end_with_patch_fid(pipe, caption_dir, extractor, tmp_path):
    captions = CaptionSet.from_dataset(caption_dir, "train", num=6)
    protocol = _tiny_protocol(num_prompts=6, resolution=304, fid_resolution=128, patch_fid=True)
    kwargs = dict(
        batch_size=3, feature_extractor=extractor, clip_scorer=get_tiny_clip_scorer(), stats_cache=str(tmp_path / "c"),
        model_id="tiny", progress=False,
    )  # fmt: skip
    record = evaluate(pipe, captions, str(tmp_path / "run"), protocol, **kwargs)
    assert set(record["metrics"]) == {"fid", "patch_fid", "clip_score"}
    assert record["metrics"]["fid"] > 0 and record["metrics"]["patch_fid"] > 0
    assert record["details"]["fid"]["reference_stats_reused"] is False
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(record["metrics"])
    assert saved["protocol"]["resolution"] == 304 and saved["seeds"]["base"] == 0
    assert saved["versions"]["torch"] and saved["versions"]["clean-fid"] == "0.1.35"
    assert Image.open(tmp_path / "run" / "grid.png").size == (1024, 512)  # 6 images, 4 columns of 256

    # again: nothing regenerated, the reference statistics reused, the same numbers
    again = evaluate(pipe, captions, str(tmp_path / "run"), protocol, **kwargs)
    assert again["generation"]["generated"] == 0 and again["details"]["patch_fid"]["reference_stats_reused"]
    assert again["metrics"] == pytest.approx(record["metrics"], rel=1e-12)

    # a separate reference folder (the caption set's own images copied) gives the same FID
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, im in enumerate(captions.images()):
        im.save(ref / f"{i:02d}.png")
    other = evaluate(pipe, captions, str(tmp_path / "run"), protocol, reference=ReferenceImages.from_folder(str(ref)),
                     metrics=["fid"], **kwargs)  # fmt: skip
    assert other["metrics"]["fid"] == pytest.approx(record["metrics"]["fid"], rel=1e-9)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "teacher"))


def _cli(args, launcher=None):
    cmd = [sys.executable, "-m", "diffusers_disback.cli", "evaluate", *args]
    if launcher:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "diffusers_disback.cli",
               "evaluate", *args]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_cli_evaluate_single_and_data_parallel(teacher_dir, caption_dir, tmp_path):
    """FID through the CLI with a feature network given as a TorchScript file (the tiny stand-in, saved); the CLIP
    score's plumbing is tested through the API (`clip_scorer=`), since open_clip models cannot be made offline."""
    from diffusers_disback.testing import TinyFeatureExtractor

    extractor = str(tmp_path / "features.pt")
    torch.jit.trace(TinyFeatureExtractor(), torch.zeros(1, 3, 299, 299)).save(extractor)
    common = ["--dataset", caption_dir, "--dataset-split", "train", "--num-prompts", "6", "--resolution", "64",
              "--no-patch-fid", "--feature-extractor", extractor, "--clip-model", "none", "--steps", "2",
              "--batch-size", "2", "--stats-cache", str(tmp_path / "cache")]  # fmt: skip
    single = _cli([teacher_dir, "--output", str(tmp_path / "one"), *common])
    assert single.returncode == 0, single.stderr[-3000:]
    assert "fid:" in single.stdout and "clip_score:" not in single.stdout
    record = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert record["details"]["feature_extractor"].startswith("torchscript features.pt sha256:")
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
    multi = _cli([teacher_dir, "--output", str(tmp_path / "two"), *common], launcher)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["generation"]["processes"] == 2
    assert max(int(np.abs(x - y).max()) for x, y in zip(_arrays(tmp_path / "one" / "images", 6),
                                                          _arrays(tmp_path / "two" / "images", 6))) <= 1  # fmt: skip
    assert two["metrics"]["fid"] == pytest.approx(one["metrics"]["fid"], rel=1e-3)

    bad = _cli([teacher_dir, "--output", str(tmp_path / "bad"), "--num-prompts", "2"])
    assert bad.returncode != 0 and "exactly one caption source" in bad.stderr


def test_load_pipeline_from_a_folder_a_hub_id_or_a_raw_checkpoint(hub_server, teacher_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from diffusers_disback.evaluation import load_pipeline

    teacher = load_pipeline(teacher_dir)
    assert type(teacher) is StableDiffusionXLPipeline  # the saved scheduler, stock classes
    HfApi().create_repo("user/eval-teacher", exist_ok=True)
    HfApi().upload_folder(folder_path=teacher_dir, repo_id="user/eval-teacher")
    from_hub = load_pipeline("user/eval-teacher")
    assert torch.equal(from_hub.unet.conv_in.weight, teacher.unet.conv_in.weight)
    raw = tmp_path / "SDXL_DisBack.safetensors"
    save_file({f"module.{k}": v for k, v in teacher.unet.state_dict().items()}, str(raw))
    converted = load_pipeline(teacher_dir, checkpoint=str(raw))
    assert isinstance(converted, DisBackPipeline) and isinstance(converted.scheduler, DisBackScheduler)
    assert torch.equal(converted.unet.conv_in.weight, teacher.unet.conv_in.weight)


def test_a_disback_folder_is_evaluated_at_its_own_timesteps(pipe, caption_dir, extractor, tmp_path):
    """A DisBack folder names a stock LCMScheduler, whose one-step rule alone would sample t = 999: `load_pipeline`
    samples it as DisBackPipeline does (t = 399), so `disback evaluate` scores the generator as it is used."""
    from diffusers_disback.evaluation import load_pipeline

    pipe.save_pretrained(tmp_path / "disback")
    loaded = load_pipeline(str(tmp_path / "disback"))
    assert isinstance(loaded, DisBackPipeline) and type(loaded.scheduler).__name__ == "LCMScheduler"
    loaded.set_progress_bar_config(disable=True)
    captions = CaptionSet.from_dataset(caption_dir, "train", 2)
    evaluate(loaded, captions, str(tmp_path / "eval"), _tiny_protocol(num_prompts=2), metrics=["fid"],
             feature_extractor=extractor, stats_cache=str(tmp_path / "cache"), progress=False)  # fmt: skip
    for i, caption in enumerate(captions.captions):
        expected = pipe(caption, generator=torch.Generator().manual_seed(i), height=64, width=64).images[0]
        got = Image.open(tmp_path / "eval" / "images" / f"{i:05d}.png")
        assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_captions_and_images_stream_from_a_hub_dataset(hub_server, caption_dir):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("user/tiny-coco", repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=caption_dir, repo_id="user/tiny-coco", repo_type="dataset",
                      allow_patterns=["*.png", "metadata.jsonl"])  # fmt: skip
    hub = CaptionSet.from_dataset("user/tiny-coco", split="train", num=6)
    local = CaptionSet.from_dataset(caption_dir, split="train", num=6)
    assert hub.captions == local.captions and hub.source == "dataset:user/tiny-coco[train]"
    for a, b in zip(hub.images(), local.images()):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a new commit on the dataset gives new reference statistics (the fingerprint holds the commit)
    api.upload_file(path_or_fileobj=b"# tiny", path_in_repo="README.md", repo_id="user/tiny-coco", repo_type="dataset")
    assert CaptionSet.from_dataset("user/tiny-coco", split="train", num=6).fingerprint != hub.fingerprint
