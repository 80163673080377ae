"""Procedural multi-task indoor scenes ("synthetic scenes") in the NYUD-v2 layout.

Each scene is a closed box-shaped room (floor, walls, ceiling) holding a few spheres, boxes and
vertical cylinders, rendered by a vectorised NumPy ray caster through a pinhole camera. All
labels come from the geometry of the nearest hit:

* ``semseg``: class per pixel (see :data:`CLASS_NAMES`, 0 is reserved for unlabeled);
* ``depth``: metres along the optical axis (camera-frame z), 0 where a Kinect-like sensor
  would report nothing (small blobs, grazing surfaces and the projector's shadow beside
  objects);
* ``normals``: unit surface normals in the OpenCV camera frame (x right, y down, z forward),
  oriented towards the camera;
* ``edge``: semantic boundaries and occlusion (depth) boundaries, marked on both sides;
* ``saliency``: object pixels (classes >= 3) versus the room.

World frame: x right, y forward (into the room), z up; the floor is the plane z = 0.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mtl.data.base import DatasetError

__all__ = [
    "CLASS_NAMES",
    "DEPTH_EDGE_REL",
    "FORMAT_VERSION",
    "WORLD_UP",
    "camera_intrinsics",
    "ensure_generated",
    "generate",
    "render_scene",
    "scene_rng",
]

CLASS_NAMES: tuple[str, ...] = ("floor", "wall", "sphere", "box", "cylinder")
FLOOR, WALL, SPHERE, BOX, CYLINDER = 1, 2, 3, 4, 5
FIRST_OBJECT_CLASS = SPHERE
FORMAT_VERSION = 1
WORLD_UP: tuple[float, float, float] = (0.0, 0.0, 1.0)
DEPTH_EDGE_REL = 0.05
"""Relative depth jump between 4-neighbours on different surfaces that counts as an edge."""

SPLITS: tuple[str, ...] = ("train", "val")
_PARAM_KEYS = ("format_version", "n_train", "n_val", "image_size", "seed")
NYUD_FX_AT_640 = 518.86  # Kinect focal length in pixels at 640 px width (~63 deg field of view)
GRAZING_COS = 0.1  # |cos(incidence)| below this gives no depth (about 84 deg)
T_MIN = 1e-6
SHADOW_OFFSET = 1e-3
PROJECTOR_BASELINE = 0.075  # metres from the camera to the depth sensor's projector, along +x

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Geometry: shapes with analytic ray intersection. Rays are o + t * d with o of shape (N, 3) or
# (1, 3) and d of shape (N, 3), not necessarily unit length. ``distance`` returns the nearest
# t > T_MIN (inf on a miss); ``normal_at`` the outward unit normal at surface points (world).
# --------------------------------------------------------------------------------------------


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of broadcastable (..., K) arrays."""
    return sum(a[..., k] * b[..., k] for k in range(a.shape[-1]))


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass(frozen=True)
class _Plane:
    """Plane ``normal . p = offset`` hit only from the side the normal points to."""

    normal: np.ndarray
    offset: float

    def distance(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        denom = d @ self.normal
        safe = np.where(denom < -T_MIN, denom, -1.0)
        t = (self.offset - o @ self.normal) / safe
        return np.where((denom < -T_MIN) & (t > T_MIN), t, np.inf)

    @property
    def bound(self) -> None:
        return None

    def normal_at(self, p: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.normal, p.shape)


@dataclass(frozen=True)
class _Sphere:
    center: np.ndarray
    radius: float

    def distance(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        oc = o - self.center
        a, b = _dot(d, d), _dot(d, oc)
        disc = b * b - a * (_dot(oc, oc) - self.radius**2)
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        return np.where((disc >= 0.0) & (t > T_MIN), t, np.inf)

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, self.radius

    def normal_at(self, p: np.ndarray) -> np.ndarray:
        return (p - self.center) / self.radius


@dataclass(frozen=True)
class _Box:
    """Box rotated by ``yaw`` about the world z axis."""

    center: np.ndarray
    half: np.ndarray
    yaw: float

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        return self.center, float(np.linalg.norm(self.half))

    def _to_local(self, v: np.ndarray) -> np.ndarray:
        return v @ _rot_z(self.yaw)  # row vectors: v @ R == R^T v

    def distance(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        o_l, d_l = self._to_local(o - self.center), self._to_local(d)
        d_l = np.where(np.abs(d_l) < 1e-12, 1e-12, d_l)
        t1, t2 = (-self.half - o_l) / d_l, (self.half - o_l) / d_l
        t_in = np.minimum(t1, t2).max(axis=1)
        t_out = np.maximum(t1, t2).min(axis=1)
        return np.where((t_in <= t_out) & (t_in > T_MIN), t_in, np.inf)

    def normal_at(self, p: np.ndarray) -> np.ndarray:
        p_l = self._to_local(p - self.center) / self.half
        axis = np.argmax(np.abs(p_l), axis=1)
        rows = np.arange(len(p))
        n_l = np.zeros_like(p_l)
        n_l[rows, axis] = np.sign(p_l[rows, axis])
        return n_l @ _rot_z(self.yaw).T


@dataclass(frozen=True)
class _Cylinder:
    """Vertical cylinder standing on the floor (side and top cap)."""

    base: np.ndarray  # (x, y) of the axis
    radius: float
    height: float

    def distance(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        o_xy, d_xy = o[:, :2] - self.base, d[:, :2]
        a = np.maximum(_dot(d_xy, d_xy), 1e-18)
        b = _dot(d_xy, o_xy)
        disc = b * b - a * (_dot(o_xy, o_xy) - self.radius**2)
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        z_side = o[:, 2] + t_side * d[:, 2]
        ok_side = (disc >= 0.0) & (t_side > T_MIN) & (z_side >= 0.0) & (z_side <= self.height)

        dz = np.where(np.abs(d[:, 2]) < 1e-12, 1e-12, d[:, 2])
        t_cap = (self.height - o[:, 2]) / dz
        xy_cap = o_xy + t_cap[:, None] * d_xy
        ok_cap = (t_cap > T_MIN) & (_dot(xy_cap, xy_cap) <= self.radius**2)
        return np.minimum(np.where(ok_side, t_side, np.inf), np.where(ok_cap, t_cap, np.inf))

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        center = np.array([self.base[0], self.base[1], self.height / 2])
        return center, float(np.hypot(self.radius, self.height / 2))

    def normal_at(self, p: np.ndarray) -> np.ndarray:
        xy = p[:, :2] - self.base
        r = np.linalg.norm(xy, axis=1, keepdims=True)
        on_cap = np.abs(p[:, 2:] - self.height) < np.abs(r - self.radius)
        side = np.concatenate([xy / np.maximum(r, 1e-12), np.zeros_like(r)], axis=1)
        return np.where(on_cap, np.array([0.0, 0.0, 1.0]), side)


_Shape = _Plane | _Sphere | _Box | _Cylinder


def _distance(shape: _Shape, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``shape.distance``, evaluated only for rays that pass through its bounding sphere."""
    if shape.bound is None:
        return shape.distance(o, d)
    center, radius = shape.bound
    oc = o - center
    a, b = _dot(d, d), _dot(d, oc)
    disc = b * b - a * (_dot(oc, oc) - radius**2)
    candidates = (disc >= 0.0) & (-b + np.sqrt(np.maximum(disc, 0.0)) > 0.0)
    t = np.full(len(d), np.inf)
    if candidates.any():
        t[candidates] = shape.distance(o if len(o) == 1 else o[candidates], d[candidates])
    return t


# --------------------------------------------------------------------------------------------
# Appearance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Texture:
    """Multiplicative albedo pattern evaluated at world points."""

    kind: str = "plain"  # plain | checker | planks | stripes
    scale: float = 1.0
    contrast: float = 0.0
    axis: int = 0
    levels: np.ndarray | None = None  # per-plank brightness offsets in [-1, 1]

    def factor(self, p: np.ndarray) -> np.ndarray:
        if self.kind == "checker":
            cells = np.floor(p[:, 0] / self.scale) + np.floor(p[:, 1] / self.scale)
            return 1.0 + self.contrast * (2.0 * (cells % 2) - 1.0)
        if self.kind == "planks":
            idx = np.floor(p[:, self.axis] / self.scale).astype(np.int64) % len(self.levels)
            return 1.0 + self.contrast * self.levels[idx]
        if self.kind == "stripes":
            along = p[:, 0] + p[:, 1]  # walls are axis aligned: one of x, y is constant
            return 1.0 + self.contrast * np.sign(np.sin(np.pi * along / self.scale))
        return np.ones(len(p))


@dataclass(frozen=True)
class _Surface:
    shape: _Shape
    label: int
    albedo: np.ndarray  # RGB in [0, 1]
    texture: _Texture = _Texture()

    @property
    def is_object(self) -> bool:
        return self.label >= FIRST_OBJECT_CLASS


# Per-class colour distributions: (hue mean, hue std, saturation range, value range). Hue spreads
# are wide enough that classes overlap in colour and only shape and context separate them.
_COLOURS: dict[int, tuple[float, float, tuple[float, float], tuple[float, float]]] = {
    FLOOR: (0.08, 0.10, (0.20, 0.70), (0.30, 0.75)),
    WALL: (0.13, 0.18, (0.05, 0.45), (0.55, 0.95)),
    SPHERE: (0.00, 0.20, (0.30, 0.90), (0.35, 0.95)),
    BOX: (0.30, 0.20, (0.30, 0.90), (0.35, 0.95)),
    CYLINDER: (0.62, 0.20, (0.30, 0.90), (0.35, 0.95)),
}


def _sample_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    hue_mean, hue_std, sat, val = _COLOURS[label]
    hue = (hue_mean + hue_std * rng.standard_normal()) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*sat), rng.uniform(*val)))


def _floor_texture(rng: np.random.Generator) -> _Texture:
    kind = ("plain", "checker", "planks")[rng.integers(3)]
    if kind == "checker":
        return _Texture("checker", rng.uniform(0.4, 1.0), rng.uniform(0.04, 0.12))
    if kind == "planks":
        levels = rng.uniform(-1.0, 1.0, size=64)
        return _Texture(
            "planks", rng.uniform(0.15, 0.35), rng.uniform(0.04, 0.12), int(rng.integers(2)), levels
        )
    return _Texture()


def _wall_texture(rng: np.random.Generator) -> _Texture:
    if rng.random() < 0.3:
        return _Texture("stripes", rng.uniform(0.1, 0.4), rng.uniform(0.02, 0.06))
    return _Texture()


# --------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Room:
    x_min: float
    x_max: float
    y_min: float
    y_max: float
    height: float


@dataclass(frozen=True)
class _Camera:
    rotation: np.ndarray  # camera-to-world rotation, columns are the camera axes in the world
    position: np.ndarray
    intrinsics: np.ndarray  # fx, fy, cx, cy

    def pixel_rays(self, size: tuple[int, int]) -> np.ndarray:
        """Camera-frame rays with unit z, one per pixel (row-major), so that t equals depth."""
        fx, fy, cx, cy = self.intrinsics
        v, u = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
        x, y = (u.ravel() - cx) / fx, (v.ravel() - cy) / fy
        return np.stack([x, y, np.ones_like(x)], axis=1)


def camera_intrinsics(size: tuple[int, int]) -> np.ndarray:
    """Pinhole intrinsics ``(fx, fy, cx, cy)`` for an image of ``size = (H, W)``.

    Square pixels with the Kinect field of view of NYUD-v2; pixel centres at integer
    coordinates (OpenCV convention).
    """
    h, w = size
    f = NYUD_FX_AT_640 * w / 640.0
    return np.array([f, f, (w - 1) / 2.0, (h - 1) / 2.0])


def _sample_room(rng: np.random.Generator) -> _Room:
    half_width = rng.uniform(2.5, 4.0)
    return _Room(-half_width, half_width, -1.5, rng.uniform(6.0, 9.0), rng.uniform(2.8, 3.4))


def _sample_camera(rng: np.random.Generator, size: tuple[int, int]) -> _Camera:
    base = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # level, facing +y
    yaw = np.deg2rad(rng.uniform(-12.0, 12.0))
    pitch = np.deg2rad(rng.uniform(12.0, 28.0))
    roll = np.deg2rad(rng.uniform(-3.0, 3.0))
    rotation = _rot_z(yaw) @ base @ _rot_x(-pitch) @ _rot_z(roll)
    position = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.3, 0.5), rng.uniform(1.1, 1.7)])
    return _Camera(rotation, position, camera_intrinsics(size))


def _room_surfaces(rng: np.random.Generator, room: _Room) -> list[_Surface]:
    wall_colour = _sample_colour(rng, WALL)
    wall_texture = _wall_texture(rng)
    ceiling_colour = np.clip(wall_colour * 1.1 + 0.05, 0.0, 1.0)
    walls = [
        (np.array([1.0, 0.0, 0.0]), room.x_min),
        (np.array([-1.0, 0.0, 0.0]), -room.x_max),
        (np.array([0.0, 1.0, 0.0]), room.y_min),
        (np.array([0.0, -1.0, 0.0]), -room.y_max),
    ]
    surfaces = [
        _Surface(
            _Plane(np.array([0.0, 0.0, 1.0]), 0.0),
            FLOOR,
            _sample_colour(rng, FLOOR),
            _floor_texture(rng),
        ),
        # The ceiling is room structure and is labelled as wall.
        _Surface(_Plane(np.array([0.0, 0.0, -1.0]), -room.height), WALL, ceiling_colour),
    ]
    surfaces += [_Surface(_Plane(n, off), WALL, wall_colour, wall_texture) for n, off in walls]
    return surfaces


def _sample_shape(rng: np.random.Generator, label: int) -> tuple[float, dict[str, float]]:
    """Size parameters of an object and the radius of its footprint on the floor."""
    if label == SPHERE:
        r = rng.uniform(0.25, 0.55)
        return r, {"radius": r}
    if label == BOX:
        a, b = rng.uniform(0.2, 0.55, size=2)
        return float(np.hypot(a, b)), {
            "a": a,
            "b": b,
            "h": rng.uniform(0.35, 1.1),
            "yaw": rng.uniform(0.0, np.pi / 2),
        }
    r = rng.uniform(0.15, 0.4)
    return r, {"radius": r, "height": rng.uniform(0.4, 1.4)}


def _make_shape(label: int, xy: np.ndarray, p: dict[str, float]) -> _Shape:
    if label == SPHERE:
        return _Sphere(np.array([xy[0], xy[1], p["radius"]]), p["radius"])
    if label == BOX:
        half = np.array([p["a"], p["b"], p["h"] / 2])
        return _Box(np.array([xy[0], xy[1], p["h"] / 2]), half, p["yaw"])
    return _Cylinder(np.array(xy), p["radius"], p["height"])


def _object_labels(rng: np.random.Generator) -> list[int]:
    """2 to 6 object classes; the first three cover every shape class once."""
    n = int(rng.choice([2, 3, 4, 5, 6], p=[0.1, 0.25, 0.3, 0.2, 0.15]))
    labels = list(rng.permutation([SPHERE, BOX, CYLINDER]))
    labels += list(rng.choice([SPHERE, BOX, CYLINDER], size=max(n - 3, 0)))
    return [int(v) for v in labels[:n]]


def _sample_floor_spot(
    rng: np.random.Generator, camera: _Camera, size: tuple[int, int]
) -> np.ndarray | None:
    """Floor point (x, y) seen by a random pixel in the lower part of the image, if any."""
    h, w = size
    u, v = rng.uniform(0.08 * w, 0.92 * w), rng.uniform(0.4 * h, 0.97 * h)
    fx, fy, cx, cy = camera.intrinsics
    d = camera.rotation @ np.array([(u - cx) / fx, (v - cy) / fy, 1.0])
    if d[2] > -1e-3:
        return None
    p = camera.position - camera.position[2] / d[2] * d
    return p[:2]


def _place_objects(
    rng: np.random.Generator, room: _Room, camera: _Camera, size: tuple[int, int]
) -> list[_Surface]:
    """Objects on the floor in view of the camera, with disjoint footprints."""
    placed: list[tuple[np.ndarray, float]] = []
    surfaces = []
    for label in _object_labels(rng):
        footprint, params = _sample_shape(rng, label)
        for _ in range(30):
            spot = _sample_floor_spot(rng, camera, size)
            if spot is None:
                continue
            away = spot - camera.position[:2]
            dist = float(np.linalg.norm(away))
            xy = spot + away / max(dist, 1e-6) * footprint  # front of the object near the spot
            if _fits(xy, footprint, dist, room, placed):
                placed.append((xy, footprint))
                shape = _make_shape(label, xy, params)
                surfaces.append(_Surface(shape, label, _sample_colour(rng, label)))
                break
    return surfaces


def _fits(
    xy: np.ndarray,
    radius: float,
    dist: float,
    room: _Room,
    placed: Sequence[tuple[np.ndarray, float]],
) -> bool:
    margin = radius + 0.05
    inside = (
        room.x_min + margin <= xy[0] <= room.x_max - margin
        and room.y_min + margin <= xy[1] <= room.y_max - margin
    )
    apart = all(np.linalg.norm(xy - c) > radius + r + 0.05 for c, r in placed)
    return inside and apart and 1.5 <= dist <= 6.5


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _cast(
    surfaces: Sequence[_Surface], o: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit per ray: distance parameter t, surface index and world normal."""
    ts = np.stack([_distance(s.shape, o, d) for s in surfaces])
    idx = np.argmin(ts, axis=0)
    t = ts[idx, np.arange(d.shape[0])]
    points = o + t[:, None] * d
    normals = np.empty_like(d)
    for i, s in enumerate(surfaces):
        mask = idx == i
        normals[mask] = s.shape.normal_at(points[mask])
    return t, idx, normals


def _in_shadow(
    objects: Sequence[_Surface], points: np.ndarray, normals: np.ndarray, light: np.ndarray
) -> np.ndarray:
    """Whether the segment from each point to the light is blocked by an object."""
    o = points + SHADOW_OFFSET * normals
    d = light - o
    blocked = np.zeros(len(points), dtype=bool)
    for s in objects:
        blocked |= _distance(s.shape, o, d) < 1.0
    return blocked


def _shade(
    rng: np.random.Generator,
    surfaces: Sequence[_Surface],
    room: _Room,
    idx: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
) -> np.ndarray:
    """Lambertian shading from a point light (with cast shadows) plus ambient light.

    Returns RGB per ray, not yet clipped to [0, 1].
    """
    light = np.array(
        [
            rng.uniform(room.x_min, room.x_max) * 0.8,
            rng.uniform(0.5, room.y_max - 1.0),
            room.height - rng.uniform(0.2, 0.6),
        ]
    )
    ambient, strength = rng.uniform(0.2, 0.4), rng.uniform(0.96, 1.44)
    falloff_dist = rng.uniform(4.0, 8.0)
    tint = 1.0 + rng.uniform(-0.08, 0.08, size=3)

    to_light = light - points
    dist = np.linalg.norm(to_light, axis=1)
    lambert = np.maximum(_dot(normals, to_light) / dist, 0.0)
    lit = ~_in_shadow([s for s in surfaces if s.is_object], points, normals, light)
    falloff = 1.0 / (1.0 + (dist / falloff_dist) ** 2)
    irradiance = ambient + strength * lambert * lit * falloff
    return _albedo(surfaces, idx, points) * irradiance[:, None] * tint


def _albedo(surfaces: Sequence[_Surface], idx: np.ndarray, points: np.ndarray) -> np.ndarray:
    colours = np.stack([s.albedo for s in surfaces])[idx]
    factor = np.ones(len(idx))
    for i, s in enumerate(surfaces):
        if s.texture.kind != "plain":
            mask = idx == i
            factor[mask] = s.texture.factor(points[mask])
    return colours * factor[:, None]


def _invalid_depth(
    rng: np.random.Generator,
    camera: _Camera,
    surfaces: Sequence[_Surface],
    points: np.ndarray,
    normals: np.ndarray,
    cos_incidence: np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """Kinect-like holes: grazing surfaces, projector shadows and a few small blobs."""
    h, w = size
    projector = camera.position + camera.rotation @ np.array([PROJECTOR_BASELINE, 0.0, 0.0])
    objects = [s for s in surfaces if s.is_object]
    invalid = (cos_incidence < GRAZING_COS) | _in_shadow(objects, points, normals, projector)
    invalid = invalid.reshape(h, w)
    v, u = np.mgrid[0:h, 0:w]
    scale = np.sqrt(h * w / (96 * 128))
    for _ in range(int(rng.integers(2, 7))):
        cu, cv = rng.uniform(0, w), rng.uniform(0, h)
        ru, rv = rng.uniform(1.5, 5.0, size=2) * scale
        invalid |= ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0
    return invalid


def _edges(
    semseg: np.ndarray, depth: np.ndarray, surface: np.ndarray, is_object: np.ndarray
) -> np.ndarray:
    """Both sides of every semantic boundary and of every occlusion boundary.

    An occlusion boundary separates 4-neighbours on different surfaces, at least one of them an
    object, whose depths differ by more than ``DEPTH_EDGE_REL`` relative to the nearer one (all
    shapes are convex, so depth is continuous within one surface).
    """
    edge = np.zeros(semseg.shape, dtype=bool)
    for axis in (0, 1):
        a, b = _neighbour_pairs(axis)
        jump = np.abs(depth[a] - depth[b]) > DEPTH_EDGE_REL * np.minimum(depth[a], depth[b])
        occlusion = (surface[a] != surface[b]) & (is_object[a] | is_object[b]) & jump
        boundary = (semseg[a] != semseg[b]) | occlusion
        edge[a] |= boundary
        edge[b] |= boundary
    return edge


def _neighbour_pairs(axis: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Index pairs selecting each pixel and its next neighbour along ``axis``."""
    full = slice(None)
    if axis == 0:
        return (slice(None, -1), full), (slice(1, None), full)
    return (full, slice(None, -1)), (full, slice(1, None))


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def render_scene(rng: np.random.Generator, size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Sample and render one scene of ``size = (H, W)`` pixels.

    Returns ``image`` (uint8 HxWx3), ``semseg`` (uint8 HxW), ``depth`` (float32 HxW, metres,
    0 = invalid), ``normals`` (float32 HxWx3, camera frame), ``edge`` and ``saliency`` (uint8
    {0, 1}), plus the camera: ``cam_to_world`` (3x3 rotation), ``cam_position`` (3,) in the
    world frame and ``intrinsics`` (fx, fy, cx, cy).
    """
    h, w = size
    room = _sample_room(rng)
    camera = _sample_camera(rng, size)
    surfaces = _room_surfaces(rng, room) + _place_objects(rng, room, camera, size)

    rays_cam = camera.pixel_rays(size)
    rays = rays_cam @ camera.rotation.T
    depth, idx, normals_world = _cast(surfaces, camera.position[None], rays)
    points = camera.position + depth[:, None] * rays

    normals = normals_world @ camera.rotation  # world -> camera: R^T n
    cos_ray = _dot(normals, rays_cam) / np.linalg.norm(rays_cam, axis=1)
    normals = np.where((cos_ray > 0.0)[:, None], -normals, normals)

    rgb = _shade(rng, surfaces, room, idx, points, normals_world)
    rgb = rgb + rng.normal(0.0, rng.uniform(0.005, 0.025), size=rgb.shape)

    labels = np.array([s.label for s in surfaces], dtype=np.uint8)
    semseg = labels[idx].reshape(h, w)
    depth = depth.reshape(h, w)
    is_object = np.array([s.is_object for s in surfaces])[idx].reshape(h, w)
    edge = _edges(semseg, depth, idx.reshape(h, w), is_object)
    invalid = _invalid_depth(rng, camera, surfaces, points, normals_world, np.abs(cos_ray), size)

    return {
        "image": _to_uint8(rgb).reshape(h, w, 3),
        "semseg": semseg,
        "depth": np.where(invalid, 0.0, depth).astype(np.float32),
        "normals": normals.reshape(h, w, 3).astype(np.float32),
        "edge": edge.astype(np.uint8),
        "saliency": (semseg >= FIRST_OBJECT_CLASS).astype(np.uint8),
        "cam_to_world": camera.rotation.copy(),
        "cam_position": camera.position.copy(),
        "intrinsics": camera.intrinsics.copy(),
    }


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator for one scene, so scenes do not depend on generation order."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _sample_id(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


def _write_sample(root: Path, sample_id: str, scene: dict[str, np.ndarray]) -> None:
    Image.fromarray(scene["image"]).save(root / "images" / f"{sample_id}.png")
    Image.fromarray(scene["semseg"]).save(root / "segmentation" / f"{sample_id}.png")
    np.save(root / "depth" / f"{sample_id}.npy", scene["depth"])
    np.save(root / "normals" / f"{sample_id}.npy", scene["normals"])
    for key, folder in (("edge", "edge"), ("saliency", "saliency")):
        mask = (scene[key] * 255).astype(np.uint8)
        Image.fromarray(mask).save(root / folder / f"{sample_id}.png")


def _params(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> dict[str, object]:
    """The parameters that identify a generated set, as stored in ``meta.json``."""
    values = (FORMAT_VERSION, int(n_train), int(n_val), [int(size[0]), int(size[1])], int(seed))
    return dict(zip(_PARAM_KEYS, values, strict=True))


def _meta(n_train: int, n_val: int, size: tuple[int, int], seed: int) -> dict[str, object]:
    fx, fy, cx, cy = (float(v) for v in camera_intrinsics(size))
    return {
        **_params(n_train, n_val, size, seed),
        "class_names": list(CLASS_NAMES),
        "num_classes": len(CLASS_NAMES),
        "ignore_index": 0,
        "intrinsics": {"fx": fx, "fy": fy, "cx": cx, "cy": cy},
        "depth_unit": "m",
        "normals_frame": "camera, x right, y down, z forward",
    }


def _validate(n_train: int, n_val: int, size: Sequence[int], seed: int) -> tuple[int, int]:
    if n_train < 0 or n_val < 0:
        raise ValueError(f"n_train and n_val must be >= 0, got {n_train} and {n_val}")
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"size must be (H, W) with H, W >= 8, got {tuple(size)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return int(size[0]), int(size[1])


def _write_all(root: Path, n_train: int, n_val: int, size: tuple[int, int], seed: int) -> None:
    for folder in ("images", "segmentation", "depth", "normals", "edge", "saliency", "gt_sets"):
        (root / folder).mkdir()
    for split, n in zip(SPLITS, (n_train, n_val), strict=True):
        ids = [_sample_id(split, i) for i in range(n)]
        for i, sample_id in enumerate(ids):
            _write_sample(root, sample_id, render_scene(scene_rng(seed, split, i), size))
        (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{s}\n" for s in ids))
    meta = json.dumps(_meta(n_train, n_val, size, seed), indent=2, sort_keys=True)
    (root / "meta.json").write_text(meta + "\n")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def generate(
    out: str | Path,
    n_train: int,
    n_val: int,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Render ``n_train + n_val`` scenes into ``out`` in the NYUD-v2 layout and return ``out``.

    Files are written to a temporary sibling folder that is renamed into place once complete
    (``meta.json`` last). An existing non-empty ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    size = _validate(n_train, n_val, size, seed)
    if out.exists() and not _is_empty_dir(out) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _write_all(tmp, n_train, n_val, size, seed)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``out``.

    If another process has meanwhile published an identical set at ``out``, keep that one.
    """
    if _is_empty_dir(out):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    if _read_params(out) == _read_params(tmp):
        shutil.rmtree(tmp)
        return
    if not overwrite:
        raise FileExistsError(f"{out} appeared during generation with different contents")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old)


def _read_params(root: Path) -> dict[str, object] | None:
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return {key: meta.get(key) for key in _PARAM_KEYS}


def ensure_generated(
    root: str | Path, n_train: int, n_val: int, size: tuple[int, int] = (96, 128), seed: int = 0
) -> Path:
    """Return ``root`` holding the requested set, generating it first if it is missing.

    Raises `DatasetError` (a ``ValueError``) naming the config keys that differ if
    ``root/meta.json`` exists with other parameters.
    """
    root = Path(root)
    requested = _params(n_train, n_val, _validate(n_train, n_val, size, seed), seed)
    stored = _read_params(root)
    if stored == requested:
        return root
    if stored is not None:
        keys = {"n_train": "data.generate.n_train", "n_val": "data.generate.n_val",
                "image_size": "data.image_size", "seed": "data.generate.seed"}  # fmt: skip
        differ = [keys.get(k, k) for k in _PARAM_KEYS if stored.get(k) != requested.get(k)]
        raise DatasetError(
            f"data.root: the synthetic scenes at {root} were generated with {stored}, but the "
            f"config asks for {requested}; set {', '.join(differ)} to the generated values, "
            "or point data.root to another folder (or delete this one)"
        )
    _log.info(
        "No synthetic dataset at %s: generating %d train + %d val scenes of %dx%d (seed %d)",
        root,
        n_train,
        n_val,
        size[0],
        size[1],
        seed,
    )
    return generate(root, n_train, n_val, size, seed)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n-train", type=int, default=795, help="number of training scenes")
    parser.add_argument("--n-val", type=int, default=654, help="number of validation scenes")
    parser.add_argument("--size", type=int, nargs=2, default=[96, 128], metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parse_args(argv)
    out = generate(
        args.out, args.n_train, args.n_val, tuple(args.size), args.seed, overwrite=args.overwrite
    )
    _log.info("Wrote %d train + %d val scenes to %s", args.n_train, args.n_val, out)


if __name__ == "__main__":
    main()
