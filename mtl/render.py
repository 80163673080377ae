"""Pictures of predictions and targets for people (W&B, TensorBoard, exported visuals), drawn
by the kind of map each task predicts (`mtl.tasks.KINDS`), so a new task needs no code here."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from mtl.tasks import get_task

#: Viridis at 5 stops, interpolated linearly: a perceptually ordered map without matplotlib.
VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)
#: Width in pixels of the colour bar next to colour-mapped pictures.
COLOUR_BAR_WIDTH = 44
#: Colour of ignored pixels in class maps.
IGNORE_COLOUR = (40, 40, 110)


def colourise(values: np.ndarray, low: float, high: float, valid: np.ndarray | None = None):
    """uint8 RGB [H,W,3] of a scalar map through viridis on [low, high]; invalid pixels black."""
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1) * (len(VIRIDIS) - 1)
    scaled = np.nan_to_num(scaled)
    index = np.minimum(scaled.astype(np.int64), len(VIRIDIS) - 2)
    frac = (scaled - index)[..., None]
    rgb = VIRIDIS[index] * (1 - frac) + VIRIDIS[index + 1] * frac
    if valid is not None:
        rgb[~valid] = 0
    return rgb.astype(np.uint8)


def palette(num_colours: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), [num_colours, 3] uint8."""
    colours = np.zeros((num_colours, 3), dtype=np.uint8)
    for index in range(num_colours):
        label, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((label >> channel) & 1) << shift
            label >>= 3
        colours[index] = colour
    return colours


def class_colours(labels: np.ndarray) -> np.ndarray:
    """uint8 RGB of class ids: palette entry ``id % 255 + 1`` (entry 0, black, is no class)."""
    return palette()[np.asarray(labels, dtype=np.int64) % 255 + 1]


def decoded(task: str, pred: Tensor) -> np.ndarray:
    """A raw prediction [C,H,W] decoded by the registry (class map as [1,H,W]), float32."""
    out = get_task(task).decode(pred[None].detach().float())[0].cpu().numpy()
    return out.reshape(-1, *out.shape[-2:]).astype(np.float32)


def as_map(target: Tensor) -> np.ndarray:
    """A target ([H,W] or [C,H,W]) as float32 [C,H,W]."""
    values = target.detach().float().cpu().numpy()
    return values.reshape(-1, *values.shape[-2:])


def valid_pixels(task: str, target: np.ndarray) -> np.ndarray:
    """Pixels of a target [C,H,W] that are not the task's invalid marker, bool [H,W]."""
    return (target != get_task(task).ignore_value).any(axis=0)


def colour_range(task: str, pred: np.ndarray, target: np.ndarray | None) -> tuple[float, float]:
    """The values the colour map spans: [0, 1] for probabilities, [0, largest valid target]
    for scalar maps (the prediction's largest value without a target), min to max for raw
    maps."""
    kind = get_task(task).kind
    if kind == "probability":
        return 0.0, 1.0
    if kind == "scalar":
        valid = valid_pixels(task, target) if target is not None else None
        if valid is not None and valid.any():
            return 0.0, float(target[:, valid].max())
        return 0.0, float(max(pred.max(), 1e-6))
    return float(pred.min()), float(pred.max())


def picture(
    task: str, values: np.ndarray, scale: tuple[float, float], is_target: bool
) -> np.ndarray:
    """uint8 RGB [H,W,3] of a decoded prediction or a target ([C,H,W], see `decoded`, `as_map`):
    classes in palette colours, vectors as (n + 1) / 2, anything else through viridis on
    `scale`; a target's invalid pixels dark."""
    kind = get_task(task).kind
    valid = valid_pixels(task, values) if is_target else np.ones(values.shape[-2:], dtype=bool)
    if kind == "labels":
        labels = values[0].astype(np.int64)
        rgb = class_colours(labels)
        rgb[~valid] = IGNORE_COLOUR
        return rgb
    if kind == "vector":
        rgb = np.round((np.moveaxis(values[:3], 0, -1) + 1) * 127.5).clip(0, 255)
        return np.where(valid[..., None], rgb, 0).astype(np.uint8)
    return colourise(values[0], scale[0], scale[1], valid)


def colour_bar(height: int, low: float, high: float, width: int = COLOUR_BAR_WIDTH) -> np.ndarray:
    """uint8 RGB [height, width, 3]: the viridis scale from `high` (top) to `low` (bottom)
    with both values written next to it."""
    ramp = np.linspace(high, low, height)[:, None].repeat(8, axis=1)
    bar = Image.new("RGB", (width, height), (255, 255, 255))
    bar.paste(Image.fromarray(colourise(ramp, low, high)), (0, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((10, 0), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((10, max(height - 11, 11)), f"{low:.3g}", fill=(0, 0, 0))
    return np.asarray(bar)


def prediction_and_target(task: str, pred: Tensor, target: Tensor | None) -> tuple[np.ndarray, str]:
    """Prediction | target (uint8 RGB), with a colour bar for colour-mapped kinds, and a
    caption that gives the colour scale."""
    values = decoded(task, pred)
    truth = as_map(target) if target is not None else None
    scale = colour_range(task, values, truth)
    panels = [picture(task, values, scale, is_target=False)]
    if truth is not None:
        panels.append(picture(task, truth, scale, is_target=True))
    caption = "prediction | target" if truth is not None else "prediction"
    if get_task(task).kind in ("scalar", "probability", "raw"):
        panels.append(colour_bar(values.shape[-2], *scale))
        caption += f"; colour scale {scale[0]:.3g} (dark) to {scale[1]:.3g} (yellow)"
    return np.concatenate(panels, axis=1), caption
