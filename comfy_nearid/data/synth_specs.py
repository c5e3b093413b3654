"""What a synthetic object is: its parametric description, how one is sampled, how it is edited.

An identity is an :class:`ObjectSpec`: a body (a shape family with its own proportions), a
body colour with a surface pattern, an outline, a few attached parts and an optional emblem
(decal). Its category is ``<body family>-<part kit>``. A near-identity distractor is the same
spec with some attributes changed; the difficulty levels differ in what may change:

- ``object``: two or three attribute groups, at least one of them structural or textural
  (pattern type, body shape, part layout), as a different instance of the same category;
- ``part``: one part's shape (its kind) or its colour;
- ``colour``: only the body colour (hue);
- MTG: one part edited, with the mask of the edited part.

Everything is deterministic given the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

RGB = tuple[float, float, float]

BODY_FAMILIES = ("ellipse", "box", "polygon", "flower", "blob", "egg", "star", "capsule")
PART_KITS = ("ears", "antennae", "legs", "fins", "spikes")
PART_KINDS = ("ear", "antenna", "leg", "fin", "spike", "ball")
PATTERNS = ("stripes", "dots", "checker", "rings", "gradient", "zigzag", "spots", "grid")
DECALS = ("none", "eye", "star", "diamond", "ring")
LEVELS = ("object", "part", "colour")

# Which part kind each kit attaches, and at which anchor angles (object frame, radians;
# -pi/2 = up, since image y grows downwards).
_KIT_PARTS = {"ears": "ear", "antennae": "antenna", "legs": "leg", "fins": "fin", "spikes": "spike"}


def all_categories() -> list[str]:
    """Every category name, ``<body family>-<part kit>`` (40 of them)."""
    return [f"{f}-{k}" for f in BODY_FAMILIES for k in PART_KITS]


def is_test_category(category: str) -> bool:
    """Held-out categories: a Latin-square quarter, so each body family and part kit still
    occurs in training, only never in these combinations."""
    family, kit = category.split("-")
    return (BODY_FAMILIES.index(family) + PART_KITS.index(kit)) % 4 == 0


def split_categories(held_out: bool) -> list[str]:
    """Training categories (``held_out=False``, 30) or held-out test categories (10)."""
    return [c for c in all_categories() if is_test_category(c) == held_out]


@dataclass(frozen=True)
class BodySpec:
    """Body outline. ``aspect`` stretches x against y; ``sides`` is the polygon side count /
    flower-star lobe count / superellipse exponent; ``depth`` the lobe depth or roundness;
    ``harmonics`` ((amplitude, phase), ...) perturb blob outlines."""

    family: str
    aspect: float
    sides: int
    depth: float
    harmonics: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class PatternSpec:
    """Surface pattern painted on the body in ``colour`` over the body colour.

    ``frequency`` is in cycles per body radius; ``angle`` in radians; ``spots`` are
    (u, v, radius) circles in object units (used by the ``spots`` pattern)."""

    kind: str
    colour: RGB
    frequency: float
    angle: float
    phase: float
    spots: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class PartSpec:
    """A part attached to the body boundary at ``angle``; ``length`` and ``width`` in body units."""

    kind: str
    angle: float
    length: float
    width: float
    colour: RGB
    banded: bool


@dataclass(frozen=True)
class DecalSpec:
    """An emblem painted on the body at (u, v) with ``radius`` (object units)."""

    kind: str
    u: float
    v: float
    radius: float
    colour: RGB
    inner: RGB


@dataclass(frozen=True)
class ObjectSpec:
    """One synthetic identity (or one of its near-identity distractors)."""

    category: str
    body: BodySpec
    body_colour: RGB
    pattern: PatternSpec
    outline_colour: RGB
    outline_width: float
    parts: tuple[PartSpec, ...]
    decal: DecalSpec

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (floats rounded) for sample.json."""
        return _rounded(asdict(self))

    def describe(self) -> str:
        """One line in words, e.g. 'a striped orange flower body with 2 ears and an eye emblem'."""
        parts: dict[str, int] = {}
        for p in self.parts:
            parts[p.kind] = parts.get(p.kind, 0) + 1
        part_words = " and ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in sorted(parts.items()))
        decal = "" if self.decal.kind == "none" else f", {_article(self.decal.kind)} {self.decal.kind} emblem"
        return (
            f"{_article(colour_name(self.body_colour))} {colour_name(self.body_colour)} {self.body.family} body with "
            f"{colour_name(self.pattern.colour)} {self.pattern.kind}, {part_words}{decal}"
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


# ----------------------------------------------------------------------------- colours


def hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r, 4), round(g, 4), round(b, 4))


def colour_name(rgb: RGB) -> str:
    """A rough colour word for descriptions."""
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    if v < 0.2:
        return "black"
    if s < 0.18:
        return "white" if v > 0.8 else "grey"
    names = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "violet", "purple", "pink", "red")
    return names[int(h * 12 + 0.5) % 12]


def random_colour(rng: np.random.Generator) -> RGB:
    return hsv(rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95))


def contrasting_colour(rng: np.random.Generator, base: RGB) -> RGB:
    """A colour clearly different from ``base`` in hue and/or value (patterns must show)."""
    h, s, v = colorsys.rgb_to_hsv(*base)
    shift = rng.uniform(0.2, 0.8)
    new_v = v - rng.uniform(0.35, 0.55) if v > 0.6 else v + rng.uniform(0.3, 0.5)
    return hsv(h + shift, rng.uniform(0.3, 1.0), new_v)


def shifted_hue(rng: np.random.Generator, base: RGB, low: float = 0.2, high: float = 0.5) -> RGB:
    """``base`` with its hue turned by ``low``..``high`` of a full turn (either direction)."""
    h, s, v = colorsys.rgb_to_hsv(*base)
    turn = rng.uniform(low, high) * (1 if rng.random() < 0.5 else -1)
    return hsv(h + turn, max(s, 0.45), v)


# ----------------------------------------------------------------------------- sampling


def sample_body(family: str, rng: np.random.Generator) -> BodySpec:
    aspect = float(rng.uniform(0.7, 1.3))
    if family == "polygon":
        return BodySpec(family, aspect, int(rng.integers(3, 8)), float(rng.uniform(0.0, 0.35)))
    if family in ("flower", "star"):
        return BodySpec(family, aspect, int(rng.integers(4, 8)), float(rng.uniform(0.08, 0.22)))
    if family == "box":
        return BodySpec(family, aspect, int(rng.integers(3, 7)), 0.0)
    if family == "blob":
        harmonics = tuple(
            (float(rng.uniform(0.03, 0.12)), float(rng.uniform(0, 2 * math.pi))) for _ in range(3)
        )
        return BodySpec(family, aspect, 0, 0.0, harmonics)
    if family == "egg":
        return BodySpec(family, aspect, 0, float(rng.uniform(0.15, 0.35)))
    if family == "capsule":  # a stadium: depth is its half-thickness, its length fills the unit disc
        return BodySpec(family, 1.0, 0, float(rng.uniform(0.3, 0.65)))
    return BodySpec("ellipse", aspect, 0, 0.0)


def sample_pattern(rng: np.random.Generator, body_colour: RGB, kind: str | None = None) -> PatternSpec:
    kind = kind or str(rng.choice(PATTERNS))
    spots: tuple[tuple[float, float, float], ...] = ()
    if kind == "spots":
        n = int(rng.integers(4, 9))
        spots = tuple(
            (float(rng.uniform(-0.75, 0.75)), float(rng.uniform(-0.75, 0.75)), float(rng.uniform(0.1, 0.22)))
            for _ in range(n)
        )
    return PatternSpec(
        kind=kind,
        colour=contrasting_colour(rng, body_colour),
        frequency=float(rng.uniform(1.4, 2.6)),
        angle=float(rng.uniform(0, math.pi)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        spots=spots,
    )


def sample_part(kind: str, angle: float, rng: np.random.Generator) -> PartSpec:
    return PartSpec(
        kind=kind,
        angle=float(angle),
        length=float(rng.uniform(0.45, 0.8)),
        width=float(rng.uniform(0.3, 0.5)),
        colour=random_colour(rng),
        banded=bool(rng.random() < 0.4),
    )


def sample_parts(kit: str, rng: np.random.Generator) -> tuple[PartSpec, ...]:
    """Parts of a kit, mostly in mirror-symmetric pairs (each part keeps its own colour)."""
    kind = _KIT_PARTS[kit]
    up, down = -math.pi / 2, math.pi / 2
    if kit in ("ears", "antennae"):
        spread = rng.uniform(0.35, 0.8)
        angles = [up - spread, up + spread] + ([up] if kit == "antennae" and rng.random() < 0.3 else [])
    elif kit == "legs":
        spread = rng.uniform(0.3, 0.7)
        angles = [down - spread, down + spread] if rng.random() < 0.6 else [down - spread, down, down + spread]
    elif kit == "fins":
        tilt = rng.uniform(-0.4, 0.4)
        angles = [tilt, math.pi - tilt]
    else:  # spikes along the top
        n = int(rng.integers(3, 6))
        angles = list(np.linspace(up - 0.9, up + 0.9, n))
    first = sample_part(kind, angles[0], rng)
    parts = [first]
    for a in angles[1:]:
        # Pairs share shape; colours differ per part so that a one-part colour edit is a change.
        parts.append(replace(first, angle=float(a), colour=random_colour(rng) if rng.random() < 0.5 else first.colour))
    return tuple(parts)


def sample_decal(rng: np.random.Generator) -> DecalSpec:
    kind = str(rng.choice(DECALS, p=[0.2, 0.35, 0.15, 0.15, 0.15]))
    return DecalSpec(
        kind=kind,
        u=float(rng.uniform(-0.3, 0.3)),
        v=float(rng.uniform(-0.35, 0.2)),
        radius=float(rng.uniform(0.16, 0.28)),
        colour=hsv(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.85, 1.0)),
        inner=hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.05, 0.35)),
    )


def sample_object(category: str, rng: np.random.Generator) -> ObjectSpec:
    """A random identity of ``category`` (``<family>-<kit>``)."""
    family, kit = category.split("-")
    body_colour = random_colour(rng)
    outline = hsv(rng.random(), 0.3, 0.12) if rng.random() < 0.75 else hsv(rng.random(), 0.1, 0.97)
    return ObjectSpec(
        category=category,
        body=sample_body(family, rng),
        body_colour=body_colour,
        pattern=sample_pattern(rng, body_colour),
        outline_colour=outline,
        outline_width=float(rng.uniform(0.04, 0.08)),
        parts=sample_parts(kit, rng),
        decal=sample_decal(rng),
    )


# ----------------------------------------------------------------------------- edits


def _edit_pattern(spec: ObjectSpec, rng: np.random.Generator) -> ObjectSpec:
    kind = str(rng.choice([p for p in PATTERNS if p != spec.pattern.kind]))
    return replace(spec, pattern=sample_pattern(rng, spec.body_colour, kind))


def body_difference(a: BodySpec, b: BodySpec) -> float:
    """A rough size of the change between two outlines of one family (0 = identical)."""
    harmonics = sum(abs(x - y) for (x, _), (y, _) in zip(a.harmonics, b.harmonics))
    return abs(a.aspect - b.aspect) + 2 * abs(a.depth - b.depth) + 0.5 * (a.sides != b.sides) + 2 * harmonics


def _edit_body_shape(spec: ObjectSpec, rng: np.random.Generator) -> ObjectSpec:
    old = spec.body
    for _ in range(20):  # resample until the outline clearly differs
        new = sample_body(old.family, rng)
        if body_difference(old, new) > 0.25:
            break
    return replace(spec, body=new)


def _edit_parts_layout(spec: ObjectSpec, rng: np.random.Generator) -> ObjectSpec:
    kit = spec.category.split("-")[1]
    old = spec.parts
    for _ in range(20):
        new = sample_parts(kit, rng)
        if len(new) != len(old) or abs(new[0].length - old[0].length) > 0.12 or abs(new[0].width - old[0].width) > 0.1:
            break
    return replace(spec, parts=new)


def _edit_body_colour(spec: ObjectSpec, rng: np.random.Generator) -> ObjectSpec:
    return replace(spec, body_colour=shifted_hue(rng, spec.body_colour, 0.17, 0.5))


def _edit_decal(spec: ObjectSpec, rng: np.random.Generator) -> ObjectSpec:
    kinds = [k for k in DECALS if k != spec.decal.kind]
    return replace(spec, decal=replace(sample_decal(rng), kind=str(rng.choice(kinds))))


_STRUCTURAL = {"pattern": _edit_pattern, "body_shape": _edit_body_shape, "parts": _edit_parts_layout}
_OTHER = {"body_colour": _edit_body_colour, "decal": _edit_decal}


def edit_object_level(spec: ObjectSpec, rng: np.random.Generator) -> tuple[ObjectSpec, list[str]]:
    """Another instance of the category: one structural/texture change plus one or two more."""
    first = str(rng.choice(list(_STRUCTURAL)))
    rest = [k for k in (*_STRUCTURAL, *_OTHER) if k != first]
    extra = list(rng.choice(rest, size=int(rng.integers(1, 3)), replace=False))
    changed = [first, *map(str, extra)]
    edits = {**_STRUCTURAL, **_OTHER}
    # Body colour first, so that a new pattern colour is chosen to contrast with the new body.
    for name in sorted(changed, key=lambda n: n != "body_colour"):
        spec = edits[name](spec, rng)
    return spec, changed


def edit_one_part(spec: ObjectSpec, rng: np.random.Generator) -> tuple[ObjectSpec, int, str]:
    """Change one part's shape (its kind and proportions) or its colour.

    Returns (edited spec, index of the edited part, "shape" or "colour").
    """
    index = int(rng.integers(len(spec.parts)))
    old = spec.parts[index]
    if rng.random() < 2 / 3:
        kind = str(rng.choice([k for k in PART_KINDS if k != old.kind]))
        new = replace(old, kind=kind, length=float(rng.uniform(0.5, 0.85)), width=float(rng.uniform(0.3, 0.55)))
        what = "shape"
    else:
        new = replace(old, colour=shifted_hue(rng, old.colour, 0.25, 0.5))
        what = "colour"
    parts = list(spec.parts)
    parts[index] = new
    return replace(spec, parts=tuple(parts)), index, what


def edit_colour_level(spec: ObjectSpec, rng: np.random.Generator) -> tuple[ObjectSpec, list[str]]:
    """Only the body colour changes (hue turned by 60..180 degrees)."""
    return _edit_body_colour(spec, rng), ["body_colour"]
