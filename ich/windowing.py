"""Display windows, the model's 3-window input, the brain-pixel filter and head cropping.

Everything here works on Hounsfield-unit arrays (``float32`` or ``int16``) as produced by
:mod:`ich.dicom`; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "Window",
    "BRAIN",
    "SUBDURAL",
    "BONE",
    "STROKE",
    "SOFT_TISSUE",
    "PRESETS",
    "MODEL_WINDOWS",
    "InputSpec",
    "BRAIN_INPUT",
    "THREE_WINDOW_INPUT",
    "INPUTS",
    "apply_window",
    "window_to_hu",
    "stack_windows",
    "brain_fraction",
    "BRAIN_FRACTION_THRESHOLD",
    "head_bbox",
    "crop_square",
    "CropHead",
    "Resize",
    "WindowStack",
    "Preprocess",
    "overlay",
    "render",
]


@dataclass(frozen=True)
class Window:
    """A display window: HU ``level`` (centre) and ``width``."""

    name: str
    level: float
    width: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2


BRAIN = Window("brain", 40, 80)
SUBDURAL = Window("subdural", 80, 200)
BONE = Window("bone", 600, 2800)
STROKE = Window("stroke", 40, 40)
SOFT_TISSUE = Window("soft tissue", 40, 350)
PRESETS: dict[str, Window] = {w.name: w for w in (BRAIN, SUBDURAL, BONE, STROKE, SOFT_TISSUE)}

# Channel order of the model input (R, G, B): the three windows radiologists read bleeds in.
MODEL_WINDOWS: tuple[Window, ...] = (BRAIN, SUBDURAL, BONE)


@dataclass(frozen=True)
class InputSpec:
    """What the network sees, recorded in every checkpoint so prediction rebuilds it exactly.

    ``clip``: HU are clipped to the windows' span before cropping and resizing, so a DICOM slice
    and its pre-windowed 8-bit rendering (the real training PNGs) give the same tensor: nothing
    outside the span survives in a PNG, so nothing outside it may reach the model from HU either.
    The head crop then finds the body just above the span's floor, the only edge a PNG keeps.
    """

    name: str
    windows: tuple[Window, ...]
    clip: bool

    @property
    def span(self) -> tuple[float, float]:
        return min(w.low for w in self.windows), max(w.high for w in self.windows)


# The real training sets are brain-window (40/80) images only: one channel, repeated so any
# torchvision backbone takes it unchanged. RSNA files carry 30/80, 36/80 or 40/80 in their
# headers; the fixed 40/80 in HU is used at prediction, whatever a file's header says.
BRAIN_INPUT = InputSpec("brain", (BRAIN, BRAIN, BRAIN), clip=True)
# Checkpoints from before the real training sets: brain, subdural and bone windows from full HU.
THREE_WINDOW_INPUT = InputSpec("three-window", MODEL_WINDOWS, clip=False)
INPUTS: dict[str, InputSpec] = {spec.name: spec for spec in (BRAIN_INPUT, THREE_WINDOW_INPUT)}

# The paper drops slices with less than 20 % brain pixels before training.
BRAIN_FRACTION_THRESHOLD = 0.20

# Anything above this is inside the patient (or the table); air is about -1000 HU.
_BODY_HU = -500.0


def apply_window(hu: np.ndarray, window: Window, dtype: type = np.float32) -> np.ndarray:
    """Map HU to [0, 1] (float dtypes) or [0, 255] (``np.uint8``) through ``window``."""
    scaled = (np.asarray(hu, dtype=np.float32) - window.low) * (1.0 / window.width)
    np.clip(scaled, 0.0, 1.0, out=scaled)
    if np.dtype(dtype) == np.uint8:
        return (scaled * 255.0 + 0.5).astype(np.uint8)
    return scaled.astype(dtype, copy=False)


def window_to_hu(image: np.ndarray, window: Window = BRAIN) -> np.ndarray:
    """Invert :func:`apply_window` for a pre-windowed 8-bit image: float32 HU within ``window``.

    0 and 255 stand for everything at or beyond the window's ends; with :attr:`InputSpec.clip`
    that is exactly what the model sees from real HU too.
    """
    return np.asarray(image, dtype=np.float32) * np.float32(window.width / 255.0) + np.float32(window.low)


def stack_windows(hu: np.ndarray, windows: tuple[Window, ...] = MODEL_WINDOWS) -> np.ndarray:
    """``(H, W)`` HU -> ``(H, W, len(windows))`` uint8, one channel per window."""
    return np.stack([apply_window(hu, w, np.uint8) for w in windows], axis=-1)


def brain_fraction(hu: np.ndarray, window: Window = BRAIN, sigma: float = 1.0) -> float:
    """Fraction of the slice's pixels that look like brain (the paper's "brain pixel percentage").

    As in fastai's ``mask_from_blur``: window to the brain window, blur, keep pixels strictly
    inside the window (neither air/fat at 0 nor bone/contrast saturated at 1).
    """
    img = apply_window(hu, window)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma)
    mask = (img > 0.05) & (img < 0.95)
    return float(mask.mean())


def head_bbox(hu: np.ndarray, step: int = 4, body_hu: float = _BODY_HU) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` of the largest connected body region, or ``None`` for an empty slice.

    The largest component is the head: the patient table is a thin arc that an opening removes
    or, if it touches nothing, a smaller separate component. Labelling runs on every ``step``-th
    pixel (16x fewer pixels at the default): the box is then exact to ``step`` pixels, which the
    crop margin absorbs.
    """
    hu = np.asarray(hu)
    body = cv2.morphologyEx((hu[::step, ::step] > body_hu).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=8)
    if n <= 1:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) * step for v in stats[biggest, :4])
    if w * h < 64:  # a few noisy pixels are not a head
        return None
    return y, min(y + h, hu.shape[0]), x, min(x + w, hu.shape[1])


def crop_square(hu: np.ndarray, margin: int, body_hu: float = _BODY_HU) -> tuple[int, int, int] | None:
    """``(top, left, side)`` of the square around the head plus ``margin``, in the slice's pixels.

    The square may run past the image edge; ``None`` for a slice with no head.
    """
    box = head_bbox(hu, body_hu=body_hu)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0) + 2 * margin
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    return cy - side // 2, cx - side // 2, side


class CropHead:
    """Crop to the head's bounding box plus ``margin`` pixels, made square so resizing keeps aspect."""

    def __init__(
        self, margin: int = 8, body_hu: float = _BODY_HU, air_hu: float = -1024.0, levels: Window | None = None
    ) -> None:
        self.margin, self.body_hu, self.air_hu, self.levels = margin, body_hu, air_hu, levels

    def square(self, hu: np.ndarray) -> tuple[int, int, int] | None:
        """``(top, left, side)`` this crop takes from ``hu`` (see :func:`crop_square`).

        With ``levels`` the body is found on the slice rounded to that window's 8 bits, so a slice
        and its 8-bit rendering in that window get exactly the same box.
        """
        if self.levels is not None:
            hu = window_to_hu(apply_window(hu, self.levels, np.uint8), self.levels)
        return crop_square(hu, self.margin, self.body_hu)

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        square = self.square(hu)
        if square is None:
            return hu
        top, left, side = square
        # Pad with air where the square runs past the image edge.
        pad = max(0, -top, -left, top + side - hu.shape[0], left + side - hu.shape[1])
        if pad:
            hu = np.pad(hu, pad, mode="constant", constant_values=np.float32(self.air_hu))
            top, left = top + pad, left + pad
        return hu[top : top + side, left : left + side]


class Resize:
    """Resize a 2-D (or HxWxC) array to ``size`` x ``size`` (area filter when shrinking)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if img.shape[0] == self.size and img.shape[1] == self.size:
            return img
        shrink = img.shape[0] > self.size
        interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        return cv2.resize(img, (self.size, self.size), interpolation=interp)


class WindowStack:
    """HU ``(H, W)`` -> uint8 ``(H, W, C)`` with one channel per window."""

    def __init__(self, windows: tuple[Window, ...] = MODEL_WINDOWS) -> None:
        self.windows = tuple(windows)

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        return stack_windows(hu, self.windows)


class Preprocess:
    """The model's input pipeline for one slice: (clip) -> crop head -> resize -> window stack.

    Returns uint8 ``(C, size, size)``. Resizing happens in HU (float) before windowing so the
    narrow brain window is not quantised twice. Training and inference share this object.
    With ``clip`` (see :class:`InputSpec`) HU are first clipped to the windows' span.
    """

    def __init__(
        self, size: int = 256, windows: tuple[Window, ...] = MODEL_WINDOWS, crop: bool = True, clip: bool = False
    ) -> None:
        self.stack = WindowStack(windows)
        low, high = min(w.low for w in windows), max(w.high for w in windows)
        self.clip = (low, high) if clip else None
        # Clipped, the body is what rises clearly above the floor: a tenth of the span keeps JPEG
        # noise in the background of pre-windowed images (a few grey levels) out of the head box.
        body = low + 0.1 * (high - low)
        self.crop = (CropHead(body_hu=body, air_hu=low, levels=windows[0]) if clip else CropHead()) if crop else None
        self.resize = Resize(size)

    @classmethod
    def from_spec(cls, spec: InputSpec, size: int, crop: bool = True) -> Preprocess:
        return cls(size, spec.windows, crop, spec.clip)

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        img = np.asarray(hu, dtype=np.float32)
        if self.clip is not None:
            img = np.clip(img, *self.clip)
        if self.crop is not None:
            img = self.crop(img)
        img = self.resize(img)
        return np.ascontiguousarray(self.stack(img).transpose(2, 0, 1))


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.5, floor: float = 0.2) -> np.ndarray:
    """RGB uint8 of a windowed uint8 slice with ``cam`` in a jet colour map where it exceeds ``floor``.

    Below the floor the slice stays plain grey, so weak, diffuse attention does not hide anatomy.
    """
    colour = cv2.cvtColor(
        cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB
    )
    weight = np.where(cam > floor, alpha * cam, 0.0).astype(np.float32)[..., None]
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    return (rgb * (1 - weight) + colour * weight + 0.5).astype(np.uint8)


def render(hu: np.ndarray, window: Window, cam: np.ndarray | None = None) -> np.ndarray:
    """What a reader sees of one slice: uint8 grey through ``window``, or RGB with ``cam`` over it."""
    grey = apply_window(hu, window, np.uint8)
    return grey if cam is None else overlay(grey, cam)
