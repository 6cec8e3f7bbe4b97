"""A small real image-folder dataset written to disk for the vision tests (PIL, JPEG and PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_image_folder(
    root: Path, *, classes: int = 3, train_per_class: int = 20, val_per_class: int = 6, size: int = 32, seed: int = 0
) -> Path:
    """``root/train/<class>/*`` and ``root/val/<class>/*``: tiny RGB images, each class its own tint.

    Half the files are JPEG, half PNG, and the sizes vary a little, as in a real folder.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 216, size=(classes, 3))
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                side = size + int(rng.integers(0, 9))
                noise = rng.normal(0, 30, size=(side, side, 3))
                pixels = np.clip(tints[c] + noise, 0, 255).astype(np.uint8)
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(pixels).save(folder / f"img_{i:03d}.{ext}")
    return root
