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
TITLE_SPACING = 2  # pixels between the title's lines


def _title_font(cell: int):
    from PIL import ImageFont

    return find_cjk_font(int(cell * 0.4)) or ImageFont.load_default()


def _fit(text: str, font, width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels: at its newlines, then
    between words, and inside a word only where the word alone is too wide."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            joined = f"{line} {word}" if line else word
            if font.getlength(joined) <= width:
                line = joined
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # the word starts a line; cut it only if it is too wide alone
                if line and font.getlength(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def title_lines(title: str, width: int, cell: int = 32) -> tuple[list[str], int]:
    """The title's lines as they fit a montage ``width`` pixels wide, and their height."""
    if not title:
        return [], 0
    font = _title_font(cell)
    lines = _fit(title, font, width - 2 * MONTAGE_GAP)
    ascent, descent = font.getmetrics()
    return lines, len(lines) * (ascent + descent) + (len(lines) - 1) * TITLE_SPACING


def montage_size(
    n_classes: int, per_class: int, cell: int = 32, title: str = ""
) -> tuple[int, int]:
    """Width and height in pixels of a montage of ``n_classes`` rows of ``per_class`` tiles
    under ``title``: the title takes one row of tiles, or more where it wraps."""
    gap = MONTAGE_GAP
    width = 2 * gap + 3 * cell + per_class * (cell + gap)
    header = max(cell, title_lines(title, width, cell)[1])
    return width, 2 * gap + header + n_classes * (cell + gap)


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
    font has the glyph), under ``title``, wrapped to the montage's width. Returns whether
    a CJK font was used."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from .fonts import cjk_font_path, has_glyphs

    gap = MONTAGE_GAP
    n_classes = min(len(dataset.classes), max_classes)
    # No wider than the largest class can fill: blank tiles are no use to anyone.
    counts = np.bincount(np.asarray(torch.as_tensor(dataset.targets)), minlength=n_classes)
    per_class = max(1, min(per_class, int(counts[:n_classes].max(initial=1))))
    font = find_cjk_font(int(cell * 0.75))
    small = _title_font(cell)
    path = cjk_font_path() if font is not None else None
    codepoints = getattr(dataset, "codepoints", None) or [
        f"U+{ord(c):04X}" for c in dataset.classes
    ]
    romaji = getattr(dataset, "romaji", None) or [""] * len(dataset.classes)
    size = montage_size(n_classes, per_class, cell, title)
    img = Image.new("L", size, 255)
    draw = ImageDraw.Draw(img)
    lines, height = title_lines(title, size[0], cell)
    y = gap
    for line in lines:  # one at a time: the same line height as title_lines counts
        draw.text((gap, y), line, fill=0, font=small)
        y += sum(small.getmetrics()) + TITLE_SPACING
    top = gap + max(cell, height) + gap
    targets = torch.as_tensor(dataset.targets).numpy()
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        members = np.flatnonzero(targets == c)
        idx = rng.choice(members, size=min(per_class, len(members)), replace=False)
        y = top + c * (cell + gap)
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
