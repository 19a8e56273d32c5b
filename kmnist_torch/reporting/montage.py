"""The montage: a grid of random images per class, labelled with the characters (drawn with
PIL; the font comes from :mod:`kmnist_torch.reporting.fonts`)."""

from __future__ import annotations

import os
from pathlib import Path


def find_cjk_font(size: int):
    """A PIL font that can draw kana and kanji, or None where none is installed: the
    bundled IPAex Gothic, $KMNIST_TORCH_FONT or a system CJK font
    (:mod:`kmnist_torch.reporting.fonts`)."""
    from PIL import ImageFont

    from .fonts import cjk_font_path

    path = cjk_font_path()
    if path is None:
        return None
    try:
        return ImageFont.truetype(os.fspath(path), size)
    except OSError:
        return None


MONTAGE_GAP = 4  # pixels between tiles, rows and the margins


def montage_size(n_classes: int, per_class: int, cell: int = 32) -> tuple[int, int]:
    """Width and height in pixels of a montage of ``n_classes`` rows of ``per_class`` tiles."""
    gap = MONTAGE_GAP
    width = 2 * gap + 3 * cell + per_class * (cell + gap)
    height = 2 * gap + cell + n_classes * (cell + gap)  # the title takes one row
    return width, height


def montage(
    dataset,
    out: Path,
    per_class: int = 10,
    max_classes: int = 49,
    cell: int = 32,
    seed: int = 0,
    title: str = "",
):
    """Draw ``per_class`` images of each class, drawn at random by ``seed``, in a row with
    gaps between them, labelled with the character and its romaji (the codepoint where no
    font has the glyph), under ``title`` (two short lines fit). Returns whether a CJK font
    was used."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    from .fonts import cjk_font_path, has_glyphs

    gap = MONTAGE_GAP
    n_classes = min(len(dataset.classes), max_classes)
    # No wider than the largest class can fill: blank tiles are no use to anyone.
    counts = np.bincount(np.asarray(torch.as_tensor(dataset.targets)), minlength=n_classes)
    per_class = max(1, min(per_class, int(counts[:n_classes].max(initial=1))))
    font = find_cjk_font(int(cell * 0.75))
    small = find_cjk_font(int(cell * 0.4)) or ImageFont.load_default()
    path = cjk_font_path() if font is not None else None
    codepoints = getattr(dataset, "codepoints", None) or [
        f"U+{ord(c):04X}" for c in dataset.classes
    ]
    romaji = getattr(dataset, "romaji", None) or [""] * len(dataset.classes)
    img = Image.new("L", montage_size(n_classes, per_class, cell), 255)
    draw = ImageDraw.Draw(img)
    draw.multiline_text((gap, gap), title, fill=0, font=small, spacing=2)
    targets = torch.as_tensor(dataset.targets).numpy()
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        members = np.flatnonzero(targets == c)
        idx = rng.choice(members, size=min(per_class, len(members)), replace=False)
        y = gap + cell + gap + c * (cell + gap)
        for j, i in enumerate(idx.tolist()):
            tile = Image.fromarray(np.asarray(dataset.data[i]), mode="L").resize((cell, cell))
            img.paste(tile, (gap + 3 * cell + j * (cell + gap), y))
        if font is not None and has_glyphs(path, dataset.classes[c]):
            draw.text((gap, y), dataset.classes[c], fill=0, font=font)
            draw.text((gap + cell, y + cell // 3), romaji[c] or "", fill=0, font=small)
        else:
            draw.text((gap, y + cell // 3), codepoints[c], fill=0, font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return font is not None
