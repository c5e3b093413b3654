"""Vectorised numpy drawing for the synthetic benchmark: backgrounds, objects, compositing.

Shapes are drawn from (approximate) signed distances d (negative inside, in object units),
antialiased by ``coverage = clip(0.5 - d / pixel_size, 0, 1)``; only the bounding box of each
shape is evaluated. An object is rendered into premultiplied colour + alpha, its alpha is
quantised to 8 bits and composited so that where the 8-bit mask is 0 the output pixel is the
background pixel bit for bit: a view and its distractor, drawn on the same background with
the same lighting, are identical outside the union of their two masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .synth_specs import RGB, BodySpec, DecalSpec, ObjectSpec, PartSpec, PatternSpec, hsv

F32 = np.float32
TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class Pose:
    """Where an object sits: centre in pixels, ``scale`` pixels per object unit, rotation."""

    cx: float
    cy: float
    scale: float
    angle: float

    def to_dict(self) -> dict[str, float]:
        return {"cx": round(self.cx, 2), "cy": round(self.cy, 2), "scale": round(self.scale, 3),
                "angle_deg": round(math.degrees(self.angle), 2)}


@dataclass(frozen=True)
class Lighting:
    """Mild lighting of one view: global gain and tint, and directional shading on the object."""

    gain: float
    tint: RGB
    shade: float
    direction: float

    def to_dict(self) -> dict[str, object]:
        return {"gain": round(self.gain, 3), "tint": [round(t, 3) for t in self.tint],
                "shade": round(self.shade, 3), "direction_deg": round(math.degrees(self.direction), 1)}


def sample_pose(rng: np.random.Generator, size: int, extent: float, fill: tuple[float, float]) -> Pose:
    """A pose whose object (bounding radius ``extent`` units) spans ``fill`` of the image side."""
    side = rng.uniform(*fill) * size
    scale = side / (2.0 * extent)
    r = side / 2.0
    margin = max(size - 2 * r, 0.0)
    return Pose(
        cx=float(r + rng.uniform(0, margin)),
        cy=float(r + rng.uniform(0, margin)),
        scale=float(scale),
        angle=float(math.radians(rng.uniform(-35, 35))),
    )


def sample_lighting(rng: np.random.Generator) -> Lighting:
    return Lighting(
        gain=float(rng.uniform(0.85, 1.12)),
        tint=(float(rng.uniform(0.95, 1.05)), float(rng.uniform(0.95, 1.05)), float(rng.uniform(0.95, 1.05))),
        shade=float(rng.uniform(0.08, 0.22)),
        direction=float(rng.uniform(0, TWO_PI)),
    )


def _cover(d: np.ndarray, px: float) -> np.ndarray:
    """Antialiased coverage of the region d < 0 (d in the same units as the pixel size px)."""
    return np.clip(F32(0.5) - d * F32(1.0 / px), 0.0, 1.0)


# ----------------------------------------------------------------------------- distances


def body_distance(body: BodySpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the body outline (body fits the unit disc)."""
    if body.family == "capsule":
        rad = body.depth
        return np.hypot(np.maximum(np.abs(u) - (1.0 - rad), 0.0), v) - F32(rad)
    ax, ay = min(1.0, body.aspect), min(1.0, 1.0 / body.aspect)
    us, vs = u * F32(1.0 / ax), v * F32(1.0 / ay)
    rho = np.hypot(us, vs)
    if body.family == "ellipse":
        return (rho - F32(1.0)) * F32(min(ax, ay))
    theta = np.arctan2(vs, us)
    return (rho - _radial(body, theta)) * F32(min(ax, ay))


def _radial(body: BodySpec, theta: np.ndarray) -> np.ndarray:
    """Outline radius r(theta) <= 1 of the radial body families (a vertex/lobe points up)."""
    up = theta + F32(math.pi / 2)
    n, depth = body.sides, body.depth
    if body.family == "polygon":
        sector = TWO_PI / n
        local = np.mod(up, F32(sector)) - F32(sector / 2)
        r_poly = F32(math.cos(math.pi / n)) / np.cos(local)
        return r_poly - F32(depth) * (r_poly - F32(math.cos(math.pi / n)))
    if body.family == "box":
        e = float(n)
        c, s = np.abs(np.cos(theta)), np.abs(np.sin(theta))
        r = (c**e + s**e) ** F32(-1.0 / e)
        return r * F32(2.0 ** (1.0 / e - 0.5))
    if body.family == "flower":
        return F32(1.0 - depth) + F32(depth) * np.cos(F32(n) * up)
    if body.family == "star":
        t = np.abs(np.cos(F32(n / 2) * up)) ** F32(1.5)
        return F32(1.0 - 2.5 * depth) + F32(2.5 * depth) * t
    if body.family == "blob":
        total = 0.78 + sum(a for a, _ in body.harmonics)
        r = np.full_like(theta, F32(0.78))
        for j, (amp, phase) in enumerate(body.harmonics):
            r += F32(amp) * np.cos(F32(j + 2) * theta + F32(phase))
        return r * F32(1.0 / total)
    if body.family == "egg":
        return F32(1.0) - F32(depth) * (F32(1.0) - np.sin(theta)) * F32(0.5)
    return np.ones_like(theta)


def _convex_polygon(x: np.ndarray, y: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Signed distance (exact inside, slightly under outside) to a convex polygon."""
    area2 = sum(xa * yb - xb * ya for (xa, ya), (xb, yb) in zip(vertices, vertices[1:] + vertices[:1]))
    if area2 < 0:  # make the order counter-clockwise so that (ey, -ex) is the outward normal
        vertices = vertices[::-1]
    d = None
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
        ex, ey = x1 - x0, y1 - y0
        norm = math.hypot(ex, ey)
        nx, ny = ey / norm, -ex / norm
        e = (x - F32(x0)) * F32(nx) + (y - F32(y0)) * F32(ny)
        d = e if d is None else np.maximum(d, e)
    return d  # type: ignore[return-value]


def _box(x: np.ndarray, y: np.ndarray, cx: float, cy: float, hx: float, hy: float, round_: float) -> np.ndarray:
    qx = np.abs(x - F32(cx)) - F32(hx - round_)
    qy = np.abs(y - F32(cy)) - F32(hy - round_)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - F32(round_)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return (np.hypot((x - F32(cx)) * F32(1 / a), (y - F32(cy)) * F32(1 / b)) - F32(1.0)) * F32(min(a, b))


def _circle(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return np.hypot(x - F32(cx), y - F32(cy)) - F32(r)


def part_distance(part: PartSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance of a part in its local frame (x outward from the body, origin on it)."""
    L, W = part.length, part.width
    if part.kind == "ear":
        return _convex_polygon(x, y, [(-0.1, W / 2), (-0.1, -W / 2), (L, 0.0)])
    if part.kind == "spike":
        return _convex_polygon(x, y, [(-0.1, 0.3 * W), (-0.1, -0.3 * W), (1.1 * L, 0.0)])
    if part.kind == "leg":
        return _box(x, y, L / 2 - 0.05, 0.0, L / 2 + 0.05, 0.4 * W, 0.12 * W)
    if part.kind == "fin":
        return _ellipse(x, y, 0.45 * L, 0.0, 0.55 * L, 0.6 * W)
    if part.kind == "antenna":
        stalk = _box(x, y, 0.4 * L, 0.0, 0.45 * L, 0.035, 0.02)
        return np.minimum(stalk, _circle(x, y, 0.85 * L, 0.0, max(0.45 * W, 0.1)))
    return _circle(x, y, 0.35 * L, 0.0, 0.25 * (L + W))  # ball


def part_reach(part: PartSpec) -> float:
    """How far a part extends outward from its anchor (object units)."""
    L, W = part.length, part.width
    return {"ear": L, "spike": 1.1 * L, "leg": L, "fin": L, "antenna": 0.85 * L + max(0.45 * W, 0.1)}.get(
        part.kind, 0.35 * L + 0.25 * (L + W)
    )


_PART_INSET = 0.12  # parts start a little inside the body so they look attached


def part_anchors(spec: ObjectSpec) -> list[tuple[float, float]]:
    """Anchor point (u, v) of each part: where its direction ray leaves the body, minus an inset."""
    if not spec.parts:
        return []
    t = np.linspace(0.0, 1.3, 261, dtype=F32)
    angles = np.array([p.angle for p in spec.parts], dtype=F32)[:, None]
    u, v = t[None, :] * np.cos(angles), t[None, :] * np.sin(angles)
    inside = body_distance(spec.body, u, v) < 0
    # first sample outside the body along each ray (the body is star-shaped around 0)
    exit_index = np.argmin(inside, axis=1)
    radii = t[exit_index] - _PART_INSET
    return [(float(r * math.cos(p.angle)), float(r * math.sin(p.angle))) for r, p in zip(radii, spec.parts)]


def object_extent(spec: ObjectSpec) -> float:
    """Radius (object units) of a disc around the origin holding the whole object."""
    reach = [math.hypot(a, b) + part_reach(p) for (a, b), p in zip(part_anchors(spec), spec.parts)]
    return max([1.0, *reach])


# ----------------------------------------------------------------------------- patterns


def pattern_amount(pattern: PatternSpec, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """How much of the pattern colour covers each point (0..1), antialiased for pixel size px."""
    f = pattern.frequency
    ca, sa = math.cos(pattern.angle), math.sin(pattern.angle)
    x1 = u * F32(ca) + v * F32(sa)
    y1 = v * F32(ca) - u * F32(sa)
    k = F32(TWO_PI * f)
    soft = F32(1.0 / (TWO_PI * f * px))  # sine slope at a crossing, per pixel
    kind = pattern.kind
    if kind == "stripes":
        return np.clip(F32(0.5) + np.sin(k * x1 + F32(pattern.phase)) * soft, 0.0, 1.0)
    if kind == "rings":
        return np.clip(F32(0.5) + np.sin(k * np.hypot(u, v) + F32(pattern.phase)) * soft, 0.0, 1.0)
    if kind == "checker":
        return np.clip(F32(0.5) + np.sin(k * x1) * np.sin(k * y1) * soft, 0.0, 1.0)
    if kind == "zigzag":
        tri = np.abs(np.mod(y1 * F32(2 * f), F32(1.0)) - F32(0.5))
        return np.clip(F32(0.5) + np.sin(k * (x1 + tri * F32(0.5 / f))) * soft, 0.0, 1.0)
    if kind in ("dots", "grid"):
        fx = np.abs(np.mod(x1 * F32(f) + F32(pattern.phase / TWO_PI), F32(1.0)) - F32(0.5))
        fy = np.abs(np.mod(y1 * F32(f), F32(1.0)) - F32(0.5))
        if kind == "dots":
            return _cover(np.hypot(fx, fy) * F32(1 / f) - F32(0.27 / f), px)
        return _cover((F32(0.5) - np.maximum(fx, fy)) * F32(1 / f) - F32(0.07 / f), px)
    if kind == "gradient":
        return np.clip(F32(0.5) + x1 * F32(0.55), 0.0, 1.0)
    # spots
    amount = np.zeros_like(u)
    for su, sv, r in pattern.spots:
        amount = np.maximum(amount, _cover(_circle(u, v, su, sv, r), px))
    return amount


def _decal_distances(decal: DecalSpec, u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """Signed distances of the emblem's layers, bottom to top (colours: :func:`_decal_colours`)."""
    x, y, R = u - F32(decal.u), v - F32(decal.v), decal.radius
    if decal.kind == "eye":
        return [_circle(x, y, 0, 0, R), _circle(x, y, 0.15 * R, 0.1 * R, 0.5 * R), _circle(x, y, -0.05 * R, -0.15 * R, 0.15 * R)]
    if decal.kind == "star":
        theta = np.arctan2(y, x) + F32(math.pi / 2)
        r = F32(0.5 * R) + F32(0.5 * R) * np.abs(np.cos(F32(2.5) * theta)) ** F32(3.0)
        return [np.hypot(x, y) - r, _circle(x, y, 0, 0, 0.22 * R)]
    if decal.kind == "diamond":
        return [(np.abs(x) + np.abs(y) - F32(R)) * F32(0.7071), (np.abs(x) + np.abs(y) - F32(0.45 * R)) * F32(0.7071)]
    if decal.kind == "ring":
        return [np.abs(np.hypot(x, y) - F32(0.72 * R)) - F32(0.22 * R), _circle(x, y, 0, 0, 0.25 * R)]
    return []


def _decal_colours(decal: DecalSpec) -> list[RGB]:
    """Colours of the emblem's layers, in the order of :func:`_decal_distances`."""
    if decal.kind == "eye":
        return [decal.colour, decal.inner, (1.0, 1.0, 1.0)]
    if decal.kind in ("star", "diamond", "ring"):
        return [decal.colour, decal.inner]
    return []


# ----------------------------------------------------------------------------- objects


@dataclass
class RenderedObject:
    """An object rendered inside ``box`` = (y0, y1, x0, x1) of the image.

    ``colour`` [h, w, 3] premultiplied float32, ``alpha`` [h, w] in 0..1, ``part_cover[i]``
    [h, w]: the visible coverage of part i (after everything drawn over it).
    """

    colour: np.ndarray
    alpha: np.ndarray
    part_cover: list[np.ndarray]
    box: tuple[int, int, int, int]


class _Canvas:
    """Premultiplied 'over' compositing that tracks the visible coverage of chosen layers."""

    def __init__(self, h: int, w: int) -> None:
        self.colour = np.zeros((h, w, 3), F32)
        self.alpha = np.zeros((h, w), F32)
        self.tracked: list[np.ndarray] = []

    def over(self, premult: np.ndarray, alpha: np.ndarray, track: bool = False) -> None:
        keep = F32(1.0) - alpha
        self.colour *= keep[..., None]
        self.colour += premult
        self.alpha = self.alpha * keep + alpha
        self.tracked = [c * keep for c in self.tracked]
        if track:
            self.tracked.append(alpha.copy())

    def fill_cover(self, cover: tuple[np.ndarray, np.ndarray | None], colour: np.ndarray | RGB,
                   outline: RGB | None = None, track: bool = False) -> None:
        """Fill a shape with ``colour`` ([h,w,3] or RGB) from its coverages ``(alpha, inner)``
        (:func:`_coverages`); with ``outline``, the band between them takes the outline colour."""
        alpha, inner = cover
        colour = np.asarray(colour, F32)
        if outline is None:
            premult = colour * alpha[..., None]
        else:
            premult = colour * inner[..., None] + np.asarray(outline, F32) * (alpha - inner)[..., None]
        self.over(premult, alpha, track)


def _coverages(d: np.ndarray, px: float, outlined: bool, outline_width: float,
               clip: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A shape's antialiased coverage, and (when ``outlined``) the coverage inside its outline
    band of ``outline_width``; both multiplied by ``clip`` when given."""
    alpha = _cover(d, px)
    if clip is not None:
        alpha = alpha * clip
    if not outlined:
        return alpha, None
    inner = _cover(d + F32(outline_width), px)
    if clip is not None:
        inner = inner * clip
    return alpha, inner


class RenderMemo:
    """Shape geometry shared by the renders of one view: the view and its distractors have the
    same pose, and a colour or part edit leaves most shapes unchanged, so their coverages are
    computed once (``render_object(..., memo=)``). Keyed by everything a coverage depends on;
    the values are never written to, so every render gives the bytes it gives alone."""

    def __init__(self) -> None:
        self._values: dict[tuple, object] = {}

    def get(self, key: tuple, compute):  # noqa: ANN001, ANN201 (any value)
        try:
            return self._values[key]
        except KeyError:
            value = self._values[key] = compute()
            return value


def _object_frame(pose: Pose, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel centres of ``box`` -> object coordinates (u, v) and image offsets (dx, dy)."""
    y0, y1, x0, x1 = box
    dx = (np.arange(x0, x1, dtype=F32) + F32(0.5) - F32(pose.cx))[None, :]
    dy = (np.arange(y0, y1, dtype=F32) + F32(0.5) - F32(pose.cy))[:, None]
    c, s = F32(math.cos(pose.angle) / pose.scale), F32(math.sin(pose.angle) / pose.scale)
    u = dx * c + dy * s
    v = dy * c - dx * s
    return u, v, dx, dy


def render_object(spec: ObjectSpec, pose: Pose, light: Lighting, size: int, memo: RenderMemo | None = None) -> RenderedObject:
    """Draw ``spec`` at ``pose`` on a ``size`` x ``size`` image (only its bounding box).

    ``memo`` (a :class:`RenderMemo`), shared by the renders of one view, computes each shape's
    coverage once across them; the output is the same with or without it.
    """
    memo = memo if memo is not None else RenderMemo()
    extent = object_extent(spec) * pose.scale + 2.0
    box = (max(int(pose.cy - extent), 0), min(int(math.ceil(pose.cy + extent)), size),
           max(int(pose.cx - extent), 0), min(int(math.ceil(pose.cx + extent)), size))
    frame = (box, pose)
    u, v, dx, dy = memo.get(("frame", *frame), lambda: _object_frame(pose, box))
    h, w = box[1] - box[0], box[3] - box[2]
    u, v = np.broadcast_to(u, (h, w)), np.broadcast_to(v, (h, w))
    px = 1.0 / pose.scale
    canvas = _Canvas(h, w)
    outline = spec.outline_colour
    # Parts first (under the body), each in its own frame: x outward from its anchor.
    for part, (au, av) in zip(spec.parts, part_anchors(spec)):
        geometry = (part.kind, part.angle, part.length, part.width, au, av)

        def part_frame(au: float = au, av: float = av, part: PartSpec = part) -> tuple[np.ndarray, np.ndarray]:
            ca, sa = F32(math.cos(part.angle)), F32(math.sin(part.angle))
            return (u - F32(au)) * ca + (v - F32(av)) * sa, (v - F32(av)) * ca - (u - F32(au)) * sa

        x, y = memo.get(("part frame", *frame, *geometry), part_frame)
        colour: np.ndarray | RGB = part.colour
        if part.banded:
            bands_per_unit = 3.0 / part.length  # three bands along the part, antialiased
            band = memo.get(("bands", *frame, *geometry), lambda x=x, b=bands_per_unit: np.clip(
                F32(0.5) + np.sin(x * F32(TWO_PI * b)) * F32(1.0 / (TWO_PI * b * px)), 0, 1))
            colour = np.asarray(part.colour, F32) * (F32(1.0) - F32(0.45) * band)[..., None]
        width = spec.outline_width * 0.8
        cover = memo.get(("part", *frame, *geometry, width),
                         lambda x=x, y=y, part=part: _coverages(part_distance(part, x, y), px, True, width, None))
        canvas.fill_cover(cover, colour, outline, track=True)
    # Body with its pattern and outline.
    body_cover = memo.get(("body", *frame, spec.body, spec.outline_width),
                          lambda: _coverages(body_distance(spec.body, u, v), px, True, spec.outline_width, None))
    pattern = spec.pattern
    amount = memo.get(("pattern", *frame, pattern.kind, pattern.frequency, pattern.angle, pattern.phase, pattern.spots),
                      lambda: pattern_amount(pattern, u, v, px)[..., None])
    body_rgb = np.asarray(spec.body_colour, F32) * (F32(1.0) - amount) + np.asarray(pattern.colour, F32) * amount
    canvas.fill_cover(body_cover, body_rgb, outline)
    # Emblem, kept inside the body's outline (the body's inner coverage).
    decal = spec.decal
    layers = memo.get(("decal", *frame, spec.body, spec.outline_width, decal.kind, decal.u, decal.v, decal.radius),
                      lambda: [_coverages(d, px, False, 0.0, body_cover[1]) for d in _decal_distances(decal, u, v)])
    for cover, colour in zip(layers, _decal_colours(decal), strict=True):
        canvas.fill_cover(cover, colour)
    # Directional shading: a soft light gradient across the object, over one body radius
    # (not the object's extent, so that editing a part leaves the rest of the object alone).
    def shading() -> np.ndarray:
        towards_light = dx * F32(math.cos(light.direction)) + dy * F32(math.sin(light.direction))
        shade = F32(1.0) + F32(light.shade / pose.scale) * towards_light
        return np.clip(shade, 0.6, 1.4)[..., None]

    canvas.colour *= memo.get(("shade", *frame, light.shade, light.direction), shading)
    return RenderedObject(canvas.colour, canvas.alpha, canvas.tracked, box)


@dataclass(frozen=True)
class LitBackground:
    """A view's background with its global lighting applied: float32 [S,S,3] and its uint8 image."""

    linear: np.ndarray
    image: np.ndarray


def light_background(background: np.ndarray, light: Lighting) -> LitBackground:
    """Apply the view's gain and tint to its background (float32 [S,S,3] in 0..1)."""
    lit = background * (np.asarray(light.tint, F32) * F32(light.gain))
    return LitBackground(lit, np.rint(np.clip(lit, 0.0, 1.0) * F32(255.0)).astype(np.uint8))


def composite(background: LitBackground, obj: RenderedObject, light: Lighting) -> tuple[np.ndarray, np.ndarray]:
    """The object over the lit background; returns (RGB uint8 [S,S,3], mask uint8 [S,S]).

    The object's alpha is first quantised to the 8-bit mask; only the object's box is
    recomputed, and inside it a mask value of 0 reproduces the background pixel exactly, so
    every pixel where the mask is 0 equals the lit background's pixel.
    """
    y0, y1, x0, x1 = obj.box
    alpha8 = np.rint(obj.alpha * F32(255.0)).astype(np.uint8)
    a = (alpha8.astype(F32) * F32(1.0 / 255.0))[..., None]
    straight = np.clip(obj.colour / np.maximum(obj.alpha, F32(1e-6))[..., None], 0.0, 1.0)
    straight *= np.asarray(light.tint, F32) * F32(light.gain)
    region = background.linear[y0:y1, x0:x1] * (F32(1.0) - a) + straight * a
    rgb = background.image.copy()
    rgb[y0:y1, x0:x1] = np.rint(np.clip(region, 0.0, 1.0) * F32(255.0)).astype(np.uint8)
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[y0:y1, x0:x1] = alpha8
    return rgb, mask


def cover_mask(cover: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A coverage array of an object's box -> full-frame uint8 mask."""
    mask = np.zeros((size, size), np.uint8)
    mask[box[0]:box[1], box[2]:box[3]] = np.rint(np.clip(cover, 0, 1) * 255.0).astype(np.uint8)
    return mask


# ----------------------------------------------------------------------------- backgrounds


def _value_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Smooth noise in 0..1: a coarse random grid upsampled bicubically (fast, via PIL)."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid[..., 0] if channels == 1 else grid, mode="L" if channels == 1 else "RGB")
    out = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=F32) * F32(1 / 255)
    return out[..., None] if channels == 1 else out


def _scene_colour(rng: np.random.Generator) -> np.ndarray:
    return np.asarray(hsv(rng.random(), rng.uniform(0.05, 0.7), rng.uniform(0.25, 0.95)), F32)


def _base_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.choice(["gradient", "radial", "noise", "stripes", "floor", "tiles"])
    c1, c2 = _scene_colour(rng), _scene_colour(rng)
    coords = (np.arange(size, dtype=F32) + F32(0.5)) / F32(size)
    x, y = coords[None, :], coords[:, None]
    if kind == "noise":
        t = _value_noise(rng, size, int(rng.integers(3, 9)), 3)
        return c1 * (F32(1) - t) + c2 * t
    if kind == "radial":
        t = np.clip(np.hypot(x - F32(rng.random()), y - F32(rng.random())) * F32(1.3), 0, 1)[..., None]
    elif kind == "stripes":
        a, f = rng.uniform(0, math.pi), rng.uniform(3, 9)
        t = (F32(0.5) + F32(0.5) * np.sin(F32(TWO_PI * f) * (x * F32(math.cos(a)) + y * F32(math.sin(a)))))[..., None]
    elif kind == "tiles":
        n = int(rng.integers(4, 10))
        t = ((np.floor(x * n) + np.floor(y * n)) % 2).astype(F32)[..., None] * F32(0.6)
    elif kind == "floor":
        horizon = rng.uniform(0.4, 0.75)
        t = (y > F32(horizon)).astype(F32)[..., None] * np.ones_like(x)[..., None]
        t = t * F32(0.8) + (y * F32(0.3))[..., None]
    else:  # linear gradient
        a = rng.uniform(0, TWO_PI)
        t = np.clip(F32(0.5) + (x - F32(0.5)) * F32(math.cos(a)) + (y - F32(0.5)) * F32(math.sin(a)), 0, 1)[..., None]
    return c1 * (F32(1) - t) + c2 * t


def _clutter_shape(rng: np.random.Generator, image: np.ndarray) -> None:
    """Draw one random shape (circle, ring, box, triangle, bar) onto ``image`` in place."""
    size = image.shape[0]
    r = rng.uniform(0.04, 0.22) * size
    cx, cy = rng.uniform(-0.1, 1.1) * size, rng.uniform(-0.1, 1.1) * size
    box = (max(int(cy - 1.5 * r), 0), min(int(cy + 1.5 * r) + 1, size), max(int(cx - 1.5 * r), 0),
           min(int(cx + 1.5 * r) + 1, size))
    if box[0] >= box[1] or box[2] >= box[3]:
        return
    angle = rng.uniform(0, TWO_PI)
    ca, sa = F32(math.cos(angle)), F32(math.sin(angle))
    dx = np.arange(box[2], box[3], dtype=F32)[None, :] + F32(0.5 - cx)
    dy = np.arange(box[0], box[1], dtype=F32)[:, None] + F32(0.5 - cy)
    x, y = dx * ca + dy * sa, dy * ca - dx * sa
    kind = rng.choice(["circle", "ring", "box", "triangle", "bar"])
    if kind == "circle":
        d = np.hypot(x, y) - F32(r)
    elif kind == "ring":
        d = np.abs(np.hypot(x, y) - F32(0.75 * r)) - F32(0.2 * r)
    elif kind == "box":
        d = _box(x, y, 0, 0, r, r * rng.uniform(0.4, 1.0), 0.1 * r)
    elif kind == "triangle":
        d = _convex_polygon(x, y, [(r, 0.0), (-0.5 * r, -0.87 * r), (-0.5 * r, 0.87 * r)])
    else:
        d = _box(x, y, 0, 0, 1.4 * r, 0.12 * r, 0.05 * r)
    alpha = (_cover(d, 1.0) * F32(rng.uniform(0.55, 1.0)))[..., None]
    colour = np.asarray(hsv(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.2, 1.0)), F32)
    region = image[box[0]:box[1], box[2]:box[3]]
    region *= F32(1) - alpha
    region += colour * alpha


def render_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural scene: a base (gradient, noise, stripes, tiles, floor), clutter shapes and
    a fine texture. Returns float32 [size, size, 3] in 0..1."""
    image = _base_layer(rng, size)
    for _ in range(int(rng.integers(3, 11))):
        _clutter_shape(rng, image)
    texture = _value_noise(rng, size, max(size // 6, 4), 1)
    image *= F32(1.0) + F32(rng.uniform(0.04, 0.12)) * (texture - F32(0.5))
    return np.clip(image, 0.0, 1.0, out=image)
