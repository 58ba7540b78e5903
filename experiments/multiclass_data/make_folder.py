"""Builds a 5-class photo folder from Debian's ``tuxpaint-stamps-default`` package.

    apt-get download tuxpaint-stamps-default              # or: apt-get install it
    dpkg-deb -x tuxpaint-stamps-default_*_all.deb /tmp/tuxpaint-stamps
    python experiments/multiclass_data/make_folder.py \\
        --stamps /tmp/tuxpaint-stamps/usr/share/tuxpaint/stamps --out /tmp/tuxpaint_photos

Tux Paint's stamps are photographs of single objects cut out on a transparent background
(its ``cartoon/`` subfolders and SVG files are drawings and are left out). Each is composited
on white and saved as a JPEG, ``OUT/train/<class>/*.jpg`` and ``OUT/validation/<class>/*.jpg``,
the same share of every class held out (seeded), the layout ``flaxcnn.data`` reads. See the
README beside this script for the counts and why this folder is smaller than the issue asked.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
from PIL import Image

# Class -> stamp folders (recursively, without cartoon/ and toys/ subfolders).
CLASSES = {
    "bird": ["animals/birds"],
    "flower": ["plants/flowers"],
    "fruit": ["food/fruit"],
    "mammal": ["animals/mammals"],
    "vegetable": ["food/vegetables"],
}
EXCLUDED_PARTS = {"cartoon", "toys"}


def stamp_photos(stamps: pathlib.Path, folders: list[str]) -> list[pathlib.Path]:
    """The photographic stamps (PNG) under ``folders``, sorted."""
    found = []
    for folder in folders:
        for path in sorted((stamps / folder).rglob("*.png")):
            if EXCLUDED_PARTS.isdisjoint(path.relative_to(stamps).parts):
                found.append(path)
    return found


def on_white(path: pathlib.Path) -> Image.Image:
    """The stamp composited on a white background (RGB)."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stamps", type=pathlib.Path, default="/usr/share/tuxpaint/stamps",
                        help="the package's stamps folder (default: the installed one)")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder to create")
    parser.add_argument("--validation-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.stamps.is_dir():
        parser.error(f"--stamps {args.stamps} is not a folder: extract tuxpaint-stamps-default "
                     "(see the usage above)")  # fmt: skip
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} exists and is not empty: pass a new folder")
    rng = np.random.default_rng(args.seed)
    counts = {}
    for name, folders in CLASSES.items():
        photos = stamp_photos(args.stamps, folders)
        held_out = set(rng.permutation(len(photos))[: round(args.validation_fraction
                                                             * len(photos))].tolist())  # fmt: skip
        for i, path in enumerate(photos):
            split = "validation" if i in held_out else "train"
            target = args.out / split / name / (path.stem + ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # the same stem in two subfolders
                target = target.with_name(f"{path.parent.name}_{path.stem}.jpg")
            on_white(path).save(target, quality=95)
        counts[name] = {"train": len(photos) - len(held_out), "validation": len(held_out)}
    (args.out / "SOURCE.json").write_text(json.dumps({
        "source": "Debian package tuxpaint-stamps-default (Tux Paint stamps), GPL-2",
        "classes": CLASSES, "counts": counts, "seed": args.seed,
        "validation_fraction": args.validation_fraction,
        "note": "photographic cut-outs composited on white; far fewer than ~100 training "
                "images per class",
    }, indent=1) + "\n")  # fmt: skip
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
