"""Image operations for the real-content pair generator: lighting, colour palettes, art-style filters, textures.

Only the TRAINING column of the agreed split (issue 17, transform families) lives here: the held-out benchmark
(bench/heldout_real.py) has its own, different operations and ranges, so it measures generalisation rather
than a memorised filter. Every function is pure: float32 arrays in [0, 1], images (H, W, 3) in display (sRGB)
values unless a name says linear; parameters are plain numbers the caller draws (training/data/realpairs.py
draws them inside the ranges given in each docstring and in RANGES).
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from scipy import ndimage

# Display <-> linear light is a gamma-2 power curve: close enough to sRGB for gains and blends, and a square and
# a square root cost a tenth of a general power.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)

# The training ranges of transforms.md, (low, high) per parameter; callers draw uniformly inside them.
RANGES: dict[str, tuple[float, float]] = {
    "exposure_dark": (0.35, 0.65),  # linear-light gain
    "exposure_bright": (1.4, 1.9),
    "direction_strength": (0.5, 0.8),  # ramp: gain 1 - s on the far side, 1 + s on the lit side (linear light)
    "temperature": (0.10, 0.25),  # white-balance shift of R and B
    "contrast": (0.3, 0.6),  # S-curve (hard) or flattening (soft) strength
    "golden_warmth": (0.18, 0.25),
    "golden_strength": (0.5, 0.7),
    "night_gain": (0.2, 0.35),
    "fog": (0.30, 0.55),  # share of light grey blended in
    "backlight": (0.6, 0.9),
}

# Unit vectors (x to the right, y downwards) from the image centre towards the light.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "top": (0.0, -1.0), "bottom": (0.0, 1.0),
    "top-left": (-1.0, -1.0), "top-right": (1.0, -1.0), "bottom-left": (-1.0, 1.0), "bottom-right": (1.0, 1.0),
}  # fmt: skip

# Named palettes: gradient stops (position in luminance, RGB) that recolour an image by its luminance.
PALETTES: dict[str, tuple[tuple[float, tuple[float, float, float]], ...]] = {
    "sepia": ((0.0, (0.16, 0.09, 0.04)), (0.5, (0.62, 0.45, 0.28)), (1.0, (0.98, 0.92, 0.78))),
    "sunset": ((0.0, (0.18, 0.05, 0.25)), (0.45, (0.85, 0.25, 0.3)), (0.75, (0.98, 0.6, 0.2)), (1.0, (1.0, 0.93, 0.6))),
    "ocean": ((0.0, (0.02, 0.06, 0.2)), (0.5, (0.05, 0.45, 0.6)), (1.0, (0.7, 0.97, 0.95))),
    "forest": ((0.0, (0.03, 0.12, 0.05)), (0.5, (0.3, 0.5, 0.15)), (1.0, (0.88, 0.93, 0.6))),
    "neon": ((0.0, (0.05, 0.0, 0.12)), (0.4, (0.9, 0.05, 0.75)), (0.75, (0.1, 0.85, 0.95)), (1.0, (0.9, 1.0, 0.9))),
    "pastel": ((0.0, (0.45, 0.42, 0.62)), (0.5, (0.95, 0.68, 0.78)), (1.0, (1.0, 0.97, 0.85))),
    "grayscale": ((0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
    "earth": ((0.0, (0.18, 0.1, 0.05)), (0.5, (0.62, 0.42, 0.2)), (1.0, (0.9, 0.82, 0.62))),
    "ice": ((0.0, (0.03, 0.08, 0.25)), (0.5, (0.45, 0.7, 0.92)), (1.0, (0.96, 0.99, 1.0))),
    "fire": ((0.0, (0.05, 0.0, 0.0)), (0.4, (0.75, 0.08, 0.02)), (0.75, (1.0, 0.55, 0.05)), (1.0, (1.0, 0.95, 0.55))),
}

# ---------------------------------------------------------------------------------------------------------
# Helpers


def to_linear(image: np.ndarray) -> np.ndarray:
    """Display values -> linear light, same shape."""
    clipped = np.clip(image, 0.0, 1.0)
    return clipped * clipped


def to_display(linear: np.ndarray) -> np.ndarray:
    """Linear light -> display values in [0, 1], same shape (light above 1 clips)."""
    return np.sqrt(np.clip(linear, 0.0, 1.0))


def luminance(image: np.ndarray) -> np.ndarray:
    """Luma (H, W) of an (H, W, 3) image."""
    return image @ LUMA


@functools.cache
def _axes(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates y (H, 1) and x (1, W), each in [-1, 1]."""
    y = (np.arange(height, dtype=np.float32) + 0.5) / height * 2.0 - 1.0
    x = (np.arange(width, dtype=np.float32) + 0.5) / width * 2.0 - 1.0
    return y[:, None], x[None, :]


def ramp(height: int, width: int, direction: str) -> np.ndarray:
    """Position along a light direction (H, W) in [-1, 1]: 1 on the lit side, -1 on the far side."""
    y, x = _axes(height, width)
    dx, dy = DIRECTIONS[direction]
    return ((x * dx + y * dy) / (abs(dx) + abs(dy))).astype(np.float32)


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8))


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (h, w, 3) image resized to (height, width, 3), each channel in float (no 8-bit rounding)."""
    channels = [
        np.asarray(Image.fromarray(image[:, :, c], mode="F").resize((width, height), Image.Resampling.BILINEAR))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=2)


def _half_res_smooth(image: np.ndarray, passes: int) -> np.ndarray:
    """Bilateral smoothing done at half resolution (4x cheaper, and a wider reach) and scaled back; (H, W, 3)."""
    rows, columns = image.shape[:2]
    small = _resize(image, max(1, rows // 2), max(1, columns // 2))
    for _ in range(passes):
        small = bilateral(small, radius=2, step=1)
    return _resize(small, rows, columns)


# ---------------------------------------------------------------------------------------------------------
# Lighting


def exposure(image: np.ndarray, gain: float) -> np.ndarray:
    """Exposure: a linear-light gain (dark 0.35-0.65, bright 1.4-1.9); (H, W, 3) -> (H, W, 3)."""
    return to_display(to_linear(image) * gain)


def direction_light(image: np.ndarray, direction: str, strength: float) -> np.ndarray:
    """Light from one of 8 directions: a multiplicative linear-light ramp, 1 +- strength (0.5-0.8); (H, W, 3)."""
    gain = 1.0 + strength * ramp(image.shape[0], image.shape[1], direction)  # (H, W)
    return to_display(to_linear(image) * gain[:, :, None])


def shade_subject(image: np.ndarray, alpha: np.ndarray, direction: str, strength: float) -> np.ndarray:
    """Shading of a composited subject: its side facing away from the light darkens (alpha (H, W) in [0, 1]).

    The subject's surface is read as a dome over its silhouette: the normal follows the gradient of the
    blurred alpha, and a Lambert term against the light direction darkens the far side; (H, W, 3).
    """
    height = ndimage.gaussian_filter(alpha, sigma=max(1.0, alpha.shape[0] / 40))  # (H, W)
    grad_y, grad_x = np.gradient(height)
    dx, dy = DIRECTIONS[direction]
    norm = np.hypot(dx, dy)
    # Inward-pointing gradient: pixels whose outward normal (-gradient) faces the light stay lit.
    facing = -(grad_x * dx + grad_y * dy) / norm
    facing = facing / max(float(np.abs(facing).max()), 1e-6)  # (H, W) in [-1, 1]
    gain = 1.0 + strength * 0.6 * facing * alpha
    return to_display(to_linear(image) * gain[:, :, None])


def white_balance(image: np.ndarray, warmth: float) -> np.ndarray:
    """Colour temperature: white-balance gains, warm (warmth > 0: R up, B down) or cool (< 0), |warmth| 0.1-0.25."""
    gains = np.array([1.0 + warmth, 1.0, 1.0 - warmth], np.float32)
    return to_display(to_linear(image) * gains)


def contrast_curve(image: np.ndarray, strength: float) -> np.ndarray:
    """Hard (strength > 0: S-curve around mid-grey) or soft (< 0: flattened) light, |strength| 0.3-0.6; (H, W, 3)."""
    if strength >= 0:
        s_curve = image * image * (3.0 - 2.0 * image)
        s_curve = s_curve * s_curve * (3.0 - 2.0 * s_curve)  # smoothstep twice: slope 2.25 at mid-grey
        return (1.0 - strength) * image + strength * s_curve
    return 0.5 + (image - 0.5) * (1.0 + strength)


def golden_hour(image: np.ndarray, side: str, warmth: float, strength: float) -> np.ndarray:
    """Golden hour: warm orange gain plus a low-angle ramp from the left or right side; (H, W, 3)."""
    linear = to_linear(image) * np.array([1.0 + warmth, 1.0 + 0.25 * warmth, 1.0 - 1.3 * warmth], np.float32)
    position = ramp(image.shape[0], image.shape[1], side)  # (H, W), 1 towards the sun
    gain = 1.0 + strength * position
    glow = np.clip(position, 0.0, 1.0)[:, :, None] * np.array([0.12, 0.06, 0.0], np.float32) * strength
    return to_display(linear * gain[:, :, None] + glow)


def night(image: np.ndarray, gain: float) -> np.ndarray:
    """Night / low key: a dark linear gain (0.2-0.35), a blue cast and crushed blacks; (H, W, 3)."""
    linear = to_linear(image) * gain * np.array([0.7, 0.85, 1.25], np.float32)
    display = to_display(linear)
    return np.clip((display - 0.04) / 0.96, 0.0, 1.0)


def fog(image: np.ndarray, amount: float) -> np.ndarray:
    """Fog / haze: contrast loss and a blend toward a light grey by `amount` (0.30-0.55); (H, W, 3)."""
    mean = image.mean(axis=(0, 1), keepdims=True)
    flattened = mean + (image - mean) * (1.0 - 0.5 * amount)
    grey = np.array([0.8, 0.81, 0.82], np.float32)
    return (1.0 - amount) * flattened + amount * grey


def backlight(image: np.ndarray, subject: np.ndarray | None, strength: float) -> np.ndarray:
    """Backlight: a bright halo behind the centre and a darkened subject (strength 0.6-0.9); (H, W, 3).

    `subject` (H, W) is the subject's alpha; without one the central region stands for the subject.
    """
    rows, columns = image.shape[:2]
    y, x = _axes(rows, columns)
    distance = x * x + (y + 0.15) ** 2  # (H, W), the halo sits a little above the centre
    halo = np.exp(-distance / 0.28)
    if subject is None:
        subject = np.exp(-(x * x + (y - 0.1) ** 2) / 0.12) * 0.8
    linear = to_linear(image) * (1.0 - 0.6 * strength * subject)[:, :, None]
    light = (strength * 1.0 * halo * (1.0 - subject))[:, :, None]
    return to_display(linear + light * np.array([1.0, 0.97, 0.9], np.float32))


# ---------------------------------------------------------------------------------------------------------
# Colour palette


@functools.cache
def palette_lut(name: str) -> np.ndarray:
    """The gradient of a named palette as a lookup table (256, 3)."""
    stops = PALETTES[name]
    positions = np.array([position for position, _ in stops], np.float32)
    colours = np.array([colour for _, colour in stops], np.float32)
    levels = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    return np.stack([np.interp(levels, positions, colours[:, c]) for c in range(3)], axis=1).astype(np.float32)


def recolor(image: np.ndarray, name: str) -> np.ndarray:
    """Colour palette: map each pixel's (contrast-stretched) luminance onto a named palette's gradient; (H, W, 3)."""
    luma = luminance(image)  # (H, W)
    low, high = np.percentile(luma, (2, 98))
    stretched = np.clip((luma - low) / max(float(high - low), 0.05), 0.0, 1.0)
    mapped = palette_lut(name)[np.round(stretched * 255.0).astype(np.int32)]  # (H, W, 3)
    return 0.9 * mapped + 0.1 * image


# ---------------------------------------------------------------------------------------------------------
# Art-style filters


def bilateral(image: np.ndarray, radius: int = 2, step: int = 2, sigma_range: float = 0.12) -> np.ndarray:
    """Edge-preserving smoothing: a (2r+1)^2 window of offsets `step` apart, weighted by colour distance."""
    reach = radius * step
    padded = np.pad(image, ((reach, reach), (reach, reach), (0, 0)), mode="edge")
    rows, columns = image.shape[:2]
    total = np.zeros_like(image)
    weights = np.zeros(image.shape[:2], np.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[
                reach + dy * step : reach + dy * step + rows, reach + dx * step : reach + dx * step + columns
            ]
            difference = shifted - image
            squared = difference[:, :, 0] ** 2 + difference[:, :, 1] ** 2 + difference[:, :, 2] ** 2  # (H, W)
            spatial = (dx * dx + dy * dy) / (2.0 * radius * radius)
            weight = np.exp(-(squared * (0.5 / sigma_range**2) + spatial))  # (H, W)
            total += shifted * weight[:, :, None]
            weights += weight
    return total / weights[:, :, None]


def edges(gray: np.ndarray) -> np.ndarray:
    """Edge strength (H, W) of a grey image (H, W): Sobel gradient magnitude."""
    return np.hypot(ndimage.sobel(gray, axis=0), ndimage.sobel(gray, axis=1))


def oil_paint(image: np.ndarray, radius: int) -> np.ndarray:
    """Oil paint: a Kuwahara filter (each pixel takes the mean of its least-varied quadrant, radius 3-6); (H, W, 3)."""
    size = radius + 1
    luma = luminance(image)
    best_mean = np.zeros_like(image)
    best_variance = np.full(luma.shape, np.inf, np.float32)
    # The two extreme origins put the pixel at either end of the uniform window: its four quadrants.
    extremes = (-(size // 2), (size - 1) // 2)
    for origin_y in extremes:
        for origin_x in extremes:
            origin = (origin_y, origin_x)
            mean_luma = ndimage.uniform_filter(luma, size, origin=origin, mode="nearest")
            variance = ndimage.uniform_filter(luma * luma, size, origin=origin, mode="nearest") - mean_luma**2
            mean = np.stack(
                [ndimage.uniform_filter(image[:, :, c], size, origin=origin, mode="nearest") for c in range(3)], axis=2
            )
            better = variance < best_variance
            best_variance = np.where(better, variance, best_variance)
            best_mean = np.where(better[:, :, None], mean, best_mean)
    # A light blur rounds off the square quadrant seams that would otherwise read as pixel blocks.
    strokes = ndimage.gaussian_filter(best_mean, sigma=(0.8, 0.8, 0.0))
    grey = luminance(strokes)[:, :, None]
    return np.clip(grey + (strokes - grey) * 1.25, 0.0, 1.0).astype(np.float32)  # oil reads more saturated


def watercolor(image: np.ndarray, paper_seed: int) -> np.ndarray:
    """Watercolour: bilateral wash, darkened pigment edges, pale tones and paper grain; (H, W, 3)."""
    wash = _half_res_smooth(image, passes=2)
    wash = np.round(wash * 6.0) / 6.0 * 0.6 + wash * 0.4  # pigment pools into flatter areas
    rim = np.clip(edges(luminance(wash)) * 1.5, 0.0, 1.0)  # (H, W)
    paper = ndimage.gaussian_filter(np.random.default_rng(paper_seed).random(image.shape[:2], np.float32), 0.8)
    paper = 0.93 + 0.14 * (paper - paper.mean())
    pale = 0.78 * wash + 0.22
    return np.clip(pale * (1.0 - 0.35 * rim)[:, :, None] * paper[:, :, None], 0.0, 1.0)


def pencil(image: np.ndarray, blur: float) -> np.ndarray:
    """Pencil: a grey sketch by colour-dodging the grey image with its blurred negative (blur 2-4 px); (H, W, 3)."""
    gray = luminance(image)
    blurred = ndimage.gaussian_filter(1.0 - gray, blur)
    sketch = np.clip(gray / np.maximum(1.0 - blurred, 1e-3), 0.0, 1.0) ** 2.5
    return np.repeat(sketch[:, :, None], 3, axis=2).astype(np.float32)


def cartoon(image: np.ndarray, levels: int) -> np.ndarray:
    """Cartoon: bilateral smoothing, flat tone bands (`levels` 4-6 over the image's own range), black edges; (H, W, 3).

    Banding the luminance within the image's own range (not fixed steps of each channel) keeps a dark or hazy
    picture from collapsing into one or two flat colours; the colour keeps its hue in coarse steps.
    """
    smooth = _half_res_smooth(image, passes=2)
    luma = luminance(smooth)  # (H, W)
    low, high = np.percentile(luma, (2, 98))
    span = max(float(high - low), 0.05)
    position = np.clip((luma - low) / span, 0.0, 0.999)
    banded = low + (np.floor(position * levels) + 0.5) / levels * span  # (H, W)
    flat = np.clip(smooth * (banded / np.maximum(luma, 1e-3))[:, :, None], 0.0, 1.0)
    flat = np.round(flat * 7.0) / 7.0
    outline = edges(ndimage.gaussian_filter(luma, 0.7)) > 0.5  # (H, W)
    return np.where(outline[:, :, None], 0.05, flat).astype(np.float32)


def halftone(image: np.ndarray, cell: int) -> np.ndarray:
    """Halftone: one dot screen per ink (cyan, magenta, yellow), dot area following the ink (cell 4-7 px); (H, W, 3)."""
    rows, columns = image.shape[:2]
    cells = _from_pil(
        _to_pil(image)
        .resize((max(1, columns // cell), max(1, rows // cell)), Image.Resampling.BOX)
        .resize((columns, rows), Image.Resampling.BILINEAR)
    )
    out = np.empty_like(image)
    for channel, shift in enumerate((0, cell // 3, 2 * cell // 3)):
        across = (np.arange(columns) + shift) % cell - (cell - 1) / 2
        down = (np.arange(rows) + shift) % cell - (cell - 1) / 2
        distance = np.sqrt(across[None, :] ** 2 + down[:, None] ** 2) / cell  # (H, W)
        ink = 1.0 - cells[:, :, channel]
        out[:, :, channel] = np.where(distance < 0.62 * np.sqrt(ink), 0.08, 0.97)
    return out


def pixel_art(image: np.ndarray, block: int, colors: int) -> np.ndarray:
    """Pixel art: block-average down by `block` (4-8), keep `colors` (8-16) colours, scale up nearest; (H, W, 3)."""
    rows, columns = image.shape[:2]
    small = _to_pil(image).resize((max(1, columns // block), max(1, rows // block)), Image.Resampling.BOX)
    reduced = small.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).convert("RGB")
    return _from_pil(reduced.resize((columns, rows), Image.Resampling.NEAREST))


# ---------------------------------------------------------------------------------------------------------
# Texture / material


def tile(swatch: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w, 3) swatch repeated to cover (height, width, 3)."""
    reps_y = -(-height // swatch.shape[0])
    reps_x = -(-width // swatch.shape[1])
    return np.tile(swatch, (reps_y, reps_x, 1))[:height, :width]


def apply_texture(image: np.ndarray, alpha: np.ndarray, texture: np.ndarray, strength: float) -> np.ndarray:
    """Material: the subject (alpha (H, W)) re-surfaced with a texture (H, W, 3), keeping the subject's shading.

    The texture's colour replaces the subject's by `strength` (0.55-0.75); the subject's own light and shade
    (luminance relative to its mean) modulate it, so it still reads as the same shape; (H, W, 3).
    """
    luma = luminance(image)
    covered = alpha > 0.5
    mean = float(luma[covered].mean()) if covered.any() else 0.5
    shading = np.clip(luma / max(mean, 0.05), 0.3, 1.8)[:, :, None]  # (H, W, 1)
    surfaced = np.clip(texture * shading, 0.0, 1.0)
    mix = (strength * alpha)[:, :, None]
    return (1.0 - mix) * image + mix * surfaced
