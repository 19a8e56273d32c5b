"""A font that draws kana and kanji, for the montage and the plots' labels.

Out of the box this is IPAex Gothic, which the ``matplotlib-fontja`` dependency ships (IPA
Font License: free to use and redistribute unchanged). ``$KMNIST_TORCH_FONT`` names another,
and the usual system CJK fonts are tried after the bundled one. Torch-free.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

# Where Debian, Ubuntu, Fedora, macOS and Windows put fonts with the kana and kanji glyphs.
SYSTEM_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf",
    "/usr/share/fonts/truetype/fonts-japanese-gothic.ttf",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/Hiragino Sans GB.ttc",
    "/System/Library/Fonts/ヒラギノ角ゴシック W3.ttc",
    "C:/Windows/Fonts/msgothic.ttc",
    "C:/Windows/Fonts/YuGothR.ttc",
)


def bundled_font() -> Path | None:
    """IPAex Gothic as the ``matplotlib-fontja`` package ships it (found without importing
    the package, which would change matplotlib's settings), or None if it is not installed."""
    spec = importlib.util.find_spec("matplotlib_fontja")
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "fonts" / "ipaexg.ttf"
    return path if path.is_file() else None


def cjk_font_path() -> Path | None:
    """The first usable CJK font: ``$KMNIST_TORCH_FONT``, the bundled IPAex Gothic, then the
    system fonts; None where there is none."""
    env = os.environ.get("KMNIST_TORCH_FONT", "")
    candidates = [env] if env else []
    bundled = bundled_font()
    candidates += [str(bundled)] if bundled else []
    candidates += list(SYSTEM_FONTS)
    for path in candidates:
        if os.path.isfile(path):
            return Path(path)
    return None


@functools.lru_cache(maxsize=8)
def _charmap(path: str) -> frozenset[int] | None:
    try:
        from matplotlib.ft2font import FT2Font
    except ImportError:  # no way to ask: assume the CJK font has it
        return None
    try:
        return frozenset(FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return None


def has_glyphs(path: str | os.PathLike | None, text: str) -> bool:
    """Whether the font at ``path`` draws every character of ``text``."""
    if path is None:
        return False
    charmap = _charmap(str(path))
    return charmap is None or all(ord(c) in charmap for c in text)


def label(char: str, codepoint: str, path: str | os.PathLike | None) -> str:
    """``char`` where the font draws it, else its codepoint (``"U+304A"``)."""
    return char if has_glyphs(path, char) else codepoint
