"""Checks that `diffusers_disback.evaluation` computes what the published protocol's code computes, bit for bit
where that is the claim. Needs an environment where clean-fid, torchvision and open_clip import (no weights are
downloaded: a tiny feature extractor stands in for Inception, and only open_clip's tokenizer is used).

    pip install clean-fid open-clip-torch torchvision   # with a torch that torchvision matches
    python benchmarks/eval_protocol_check.py [--output benchmarks/results/eval_protocol_check.md]

1. Crops: our `center_crop` against torchvision's `center_crop` (which DMD2's transforms call) on odd and even size
   differences: identical pixels.
2. FID pipeline: our `compute_features` + `frechet_distance` against `cleanfid.fid.compute_fid(mode="clean")` on two
   folders, with the same custom feature extractor and the same crop/resize transform (FID at 512 and patch-FID):
   file loading, the custom transform, clean-fid's resize, the tensor layout, statistics and the distance.
3. Fréchet distance: ours against `cleanfid.fid.frechet_distance` on random statistics.
4. CLIP tokens: `prefix + caption` through open_clip's tokenizer against DMD2's splice (tokenise the caption, insert
   the prefix's three tokens after the start token, cut to 77, force the end token last).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from diffusers_disback.evaluation import (
    center_crop,
    compute_features,
    feature_statistics,
    fid_transform,
    frechet_distance,
    patch_fid_transform,
)
from diffusers_disback.testing import TinyFeatureExtractor, write_tiny_caption_set

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "two dogs   playing with a frisbee in the park",
    "A kitchen with wooden cabinets, a stove and a refrigerator that has many magnets on it and a table " * 3,
    "Ünïcödé café — a plate of food",
]


def check_crops() -> tuple[str, bool]:
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(0)
    worst = 0
    for w, h, size in [(640, 480, 299), (641, 480, 299), (640, 481, 300), (500, 375, 299), (1024, 1024, 299),
                       (300, 299, 299), (640, 427, 427), (427, 640, 427)]:  # fmt: skip
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = np.asarray(center_crop(im, size)).astype(int)
        theirs = np.asarray(TF.center_crop(im, size)).astype(int)
        worst = max(worst, int(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else 999)
    return f"centre crops vs torchvision (8 size pairs): max |Δ| = {worst}", worst == 0


def check_fid(tmp: str) -> list[tuple[str, bool]]:
    from cleanfid import fid as cfid

    a = write_tiny_caption_set(os.path.join(tmp, "a"), num=40, size=(640, 480), seed=0)
    b = write_tiny_caption_set(os.path.join(tmp, "b"), num=40, size=(512, 512), seed=1)
    extractor = TinyFeatureExtractor(dim=16)
    rows = []
    for name, transform in (("FID @512", fid_transform(512)), ("patch-FID 299", patch_fid_transform(299))):

        def images(folder):
            for f in sorted(os.listdir(folder)):
                if f.endswith(".png"):
                    yield Image.open(os.path.join(folder, f))

        fa = compute_features(images(a), extractor, transform, batch_size=16)
        fb = compute_features(images(b), extractor, transform, batch_size=16)
        ours = frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
        theirs = cfid.compute_fid(
            a, b, mode="clean", custom_feat_extractor=extractor, custom_image_tranform=transform,
            num_workers=0, batch_size=16, device=torch.device("cpu"), verbose=False,
        )  # fmt: skip
        rel = abs(ours - theirs) / max(abs(theirs), 1e-12)
        rows.append(
            (f"{name}: ours {ours:.10f}, clean-fid compute_fid {theirs:.10f}, relative Δ {rel:.1e}", rel < 1e-9)
        )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 32)), rng.normal(0.3, 1.2, size=(200, 32))
    sx, sy = feature_statistics(x), feature_statistics(y)
    ours, theirs = frechet_distance(*sx, *sy), cfid.frechet_distance(sx[0], sx[1], sy[0], sy[1])
    rows.append((f"frechet_distance on random statistics: |Δ| = {abs(ours - theirs):.1e}", abs(ours - theirs) < 1e-9))
    return rows


def check_clip_tokens() -> tuple[str, bool]:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-g-14")
    prefix = "A photo depicts "
    ours = tok([prefix + c for c in CAPTIONS])
    tokens = tok(CAPTIONS)  # DMD2's splice, with the same BPE tokenizer
    pre = tok([prefix])[:, 1:4].expand(len(CAPTIONS), -1)
    spliced = torch.cat([tokens[:, :1], pre, tokens[:, 1:]], dim=1)[:, :77]
    last = spliced[:, 76:77].clone()
    last[last > 0] = 49407
    spliced = torch.cat([spliced[:, :76], last], dim=1)
    same = bool(torch.equal(ours, spliced))
    return (
        f"CLIP tokens, prefix + caption vs DMD2's splice ({len(CAPTIONS)} captions, one over 77 tokens): equal = {same}",
        same,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check_crops(), *check_fid(tmp), check_clip_tokens()]
    import cleanfid
    import open_clip
    import torchvision

    versions = (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"clean-fid {getattr(cleanfid, '__version__', '0.1.35')}, open_clip {open_clip.__version__}"
    )
    lines = ["| check | passed |", "| --- | --- |"] + [f"| {text} | {'yes' if ok else 'NO'} |" for text, ok in rows]
    report = "\n".join([f"eval protocol check ({versions})", "", *lines])
    print(report)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("# benchmarks/eval_protocol_check.py\n\n" + report + "\n")
    return 0 if all(ok for _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
