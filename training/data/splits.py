"""Which real-image sources train and which are held out, by package: no file of a held-out package is ever trained on.

Judging the encoder on images from packages it never saw (and under transforms it never saw) is what makes the
held-out benchmark (bench/heldout_real.py) a measure of real photos rather than of the training set. The reserved
packages of training.data.realdata (emoji, wallpapers, ...) are neither: they are never fetched at all.
"""

from __future__ import annotations

# Sources whose images the pair generator may use (names as in the realdata manifest's "source").
# scikit-image is here because the procedural generator (training/data/procedural_assets.py) renders its subjects
# and backgrounds from its bundled photos; the few that bench/heldout_photos.py holds out are not in the manifest.
TRAIN_SOURCES = frozenset({"gcompris-qt-data", "scratch", "openclipart-png", "gimp-data", "scikit-image"})

# Held out for evaluation: real photos of other origins (classic CV samples, texture and scene photos, the
# photos bundled with Python packages), real art in many cultural styles (Stellarium's sky cultures: one
# style per culture) and photo cut-outs grouped by what they show (Tux Paint stamps).
HELDOUT_SOURCES = frozenset(
    {
        "opencv-doc",
        "tuxpaint-data",
        "scribus-template",
        "stellarium-data",
        "tuxpaint-stamps-default",
        "scikit-learn",
        "matplotlib",
        "pywavelets",
        "mahotas",
    }
)


def split_of(source: str) -> str:
    """'train' or 'heldout' for a manifest source; an unknown source is an error (decide its split first)."""
    if source in TRAIN_SOURCES:
        return "train"
    if source in HELDOUT_SOURCES:
        return "heldout"
    raise ValueError(
        f"source {source!r} has no split; add it to TRAIN_SOURCES or HELDOUT_SOURCES in training/data/splits.py"
    )
