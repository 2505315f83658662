"""A head-CT phantom in Hounsfield units, with the five hemorrhage subtypes as masks.

Synthetic data stands in for the 450 GB RSNA set, so the phantom must make the task look like the
real one: anatomy that differs between heads and changes smoothly along a study, and bleeds that
are visible in the usual windows without being trivially bright or sub-pixel thin. Geometry is in
normalised image units (the image spans [-1, 1]), so one head renders at any matrix size.
`render_slice` is pure: the same head, bleeds, slice and size always give the same HU and masks,
which lets tests compare a written file with what was drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ich_tune.data.labels import CLASSES

SUBTYPES = CLASSES[:5]  # the drawn types; `any` is their OR
HU_MIN, HU_MAX = -1000, 3071  # every pixel encoding in synthetic.py stores this range exactly
_PAINT_ORDER = ("subarachnoid", "intraventricular", "intraparenchymal", "subdural", "epidural")
_VENTRICLE_SPAN = (0.35, 0.75)  # fraction of the way through a study where ventricles show
_SAH_HALF_WIDTH = 0.022  # blood-filled sulci: 2.8 px wide at 128 px
_TAU = 2 * math.pi


@dataclass(frozen=True)
class Head:
    """One study's anatomy and placement; two studies of one patient differ only in placement."""

    cx: float  # head centre in the image
    cy: float
    angle: float  # in-plane rotation (rad)
    a: float  # inner-table semi-axes at the widest slice: left-right ...
    b: float  # ... and front-back
    outline: tuple[float, float, float, float]  # 2nd and 3rd harmonic of the outline: amp, phase
    skull: float  # mean bone thickness
    skull_phase: float  # where the bone is thickest
    scalp: float
    bone: tuple[float, float]  # HU of the cortical tables and of the diploe
    white: float  # HU of white matter, grey matter and CSF
    grey: float
    csf: float
    sulci: int  # sulci around the brain
    sulcus_width: float  # half-width of a CSF-filled sulcus
    sulcus_depth: float
    sulcus_curl: float  # how much sulci bend on their way in
    sulcus_jitter: tuple[float, float, float, float]  # uneven spacing: two harmonics, amp, phase
    ventricles: float  # size factor: atrophy widens them
    texture: tuple[float, ...]  # 18 numbers: frequency u, frequency v, phase of six plane waves
    noise: float  # HU standard deviation
    anatomy_seed: int  # per-sulcus depths and widths
    noise_seed: int


@dataclass(frozen=True)
class Bleed:
    """One hemorrhage over slices [first, stop) of its study, growing then shrinking along them.

    `where` and `size` read by kind. Epidural, subdural, subarachnoid: (angle around the head,)
    and half-angle (rad). Intraparenchymal: centre (u, v) as fractions of the inner-table
    semi-axes, and radius. Intraventricular: (side,) with -1 left, 1 right, 0 both, and the filled
    fraction of the ventricle. `depth`: the thickness of an epidural or subdural collection, how far
    subarachnoid blood reaches inwards. `lobes`: the intraparenchymal outline's irregularity
    (amplitude and phase of its 2nd and 3rd harmonic).
    """

    kind: str
    first: int
    stop: int
    hu: float
    where: tuple[float, ...]
    size: float
    depth: float = 0.0
    lobes: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    rim: float = 0.0  # partial volume: the share of its contrast a bleed's edge pixels lose

    def swell(self, z: int) -> float:
        """Size factor at slice z: 0.6 at the ends of the run, 1 in its middle."""
        return 0.6 + 0.4 * math.sin(math.pi * (z - self.first + 0.5) / (self.stop - self.first))


@dataclass(frozen=True)
class Difficulty:
    """How hard bleeds are to see. The demo's bleeds are bright and clean, so a small model learns
    them in a few hundred steps; real CT shows smaller, fainter bleeds in more noise, with edges
    blurred by partial volume. Scales of 1 reproduce the demo data exactly (same draws, same bytes).
    """

    bleed_hu: tuple[float, float] = (50.0, 90.0)  # range of a bleed's HU (grey matter: 33-39)
    size: float = 1.0  # times each bleed's extent and thickness
    noise: float = 1.0  # times each head's noise
    rim: float = 0.0  # see Bleed.rim


DIFFICULTIES = {
    "demo": Difficulty(),
    "hard": Difficulty(bleed_hu=(44.0, 66.0), size=0.7, noise=2.0, rim=0.5),
}


def random_head(rng: np.random.Generator, difficulty: Difficulty = DIFFICULTIES["demo"]) -> Head:
    """A plausible adult head that fits inside the image whatever its placement."""
    a = rng.uniform(0.6, 0.7)
    return Head(
        cx=rng.uniform(-0.05, 0.05), cy=rng.uniform(-0.04, 0.04), angle=rng.uniform(-0.3, 0.3),
        a=a, b=min(0.76, a * rng.uniform(1.1, 1.25)),
        outline=(rng.uniform(0, 0.035), rng.uniform(0, _TAU), rng.uniform(0, 0.02),
                 rng.uniform(0, _TAU)),
        skull=rng.uniform(0.03, 0.05), skull_phase=rng.uniform(0, _TAU),
        scalp=rng.uniform(0.012, 0.025), bone=(rng.uniform(1200, 1500), rng.uniform(700, 900)),
        white=rng.uniform(25, 30), grey=rng.uniform(33, 39), csf=rng.uniform(2, 8),
        sulci=int(rng.integers(20, 32)), sulcus_width=rng.uniform(0.004, 0.009),
        sulcus_depth=rng.uniform(0.06, 0.12), sulcus_curl=rng.uniform(-1.5, 1.5),
        sulcus_jitter=(rng.uniform(0.2, 0.5), rng.uniform(0, _TAU), rng.uniform(0.1, 0.35),
                       rng.uniform(0, _TAU)),
        ventricles=rng.uniform(0.75, 1.35),
        texture=tuple(np.column_stack([rng.uniform(-14, 14, (6, 2)),
                                       rng.uniform(0, _TAU, 6)]).ravel().tolist()),
        noise=rng.uniform(3, 6) * difficulty.noise, anatomy_seed=int(rng.integers(2**31)),
        noise_seed=int(rng.integers(2**31)),
    )


def moved(head: Head, rng: np.random.Generator) -> Head:
    """The same head in a later study: new placement and noise, same anatomy."""
    return replace(head, cx=rng.uniform(-0.05, 0.05), cy=rng.uniform(-0.04, 0.04),
                   angle=rng.uniform(-0.3, 0.3), noise_seed=int(rng.integers(2**31)))


def random_bleed(kind: str, first: int, stop: int, rng: np.random.Generator,
                 difficulty: Difficulty = DIFFICULTIES["demo"]) -> Bleed:
    """A bleed of `kind` over slices [first, stop); at the demo's difficulty sized to stay visible at
    128 px."""
    hu, k, rim = rng.uniform(*difficulty.bleed_hu), difficulty.size, difficulty.rim
    if kind == "epidural":  # short and thick: a biconvex lens
        return Bleed(kind, first, stop, hu, (rng.uniform(0, _TAU),), rng.uniform(0.3, 0.5) * k,
                     rng.uniform(0.06, 0.12) * k, rim=rim)
    if kind == "subdural":  # long and thin: a crescent
        return Bleed(kind, first, stop, hu, (rng.uniform(0, _TAU),), rng.uniform(0.6, 1.2) * k,
                     rng.uniform(0.045, 0.08) * k, rim=rim)
    if kind == "subarachnoid":
        return Bleed(kind, first, stop, hu, (rng.uniform(0, _TAU),), rng.uniform(0.35, 0.9) * k,
                     rng.uniform(0.08, 0.16) * k, rim=rim)
    if kind == "intraparenchymal":
        r, theta = 0.6 * math.sqrt(rng.uniform()), rng.uniform(0, _TAU)
        lobes = (rng.uniform(0, 0.25), rng.uniform(0, _TAU), rng.uniform(0, 0.12),
                 rng.uniform(0, _TAU))
        return Bleed(kind, first, stop, hu, (r * math.cos(theta), r * math.sin(theta)),
                     rng.uniform(0.05, 0.12) * k, lobes=lobes, rim=rim)
    if kind == "intraventricular":
        return Bleed(kind, first, stop, hu, (float(rng.integers(-1, 2)),), rng.uniform(0.35, 0.8) * k,
                     rim=rim)
    raise ValueError(f"unknown bleed kind {kind!r}; expected one of {SUBTYPES}")


def ventricle_slices(slices: int) -> range:
    """Slices of a study whose ventricles are big enough to hold visible blood."""
    lo, hi = _VENTRICLE_SPAN
    pad = 0.15 * (hi - lo)
    inside = [z for z in range(slices) if lo + pad <= (z + 0.5) / slices <= hi - pad]
    return range(inside[0], inside[-1] + 1) if inside else range(0)


def min_area(size: int) -> int:
    """Pixels a bleed needs to count as drawn: about 6 px at 128 px, whatever the size."""
    return max(3, round(6 * (size / 128) ** 2))


def render_slice(
    head: Head, bleeds: tuple[Bleed, ...], z: int, slices: int, size: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU image (float32, whole numbers in [HU_MIN, HU_MAX]) and one bool mask per subtype.

    A mask is empty unless its blood is painted in this slice with at least `min_area` pixels,
    so a slice's label for a subtype is exactly `mask.any()`.
    """
    g = _grid(head, size)
    t = (z + 0.5) / slices
    s = math.sqrt(1 - ((t - 0.45) / 0.8) ** 2)  # cross-section: widest just below the middle
    depth = g.outline * np.float32(s) - g.rad  # distance inwards from the inner table
    gap, sulcus_depth, sulcus_width = _sulci(head, g, depth, t, s)
    here = _Slice(head, g, t, s, depth, depth > 0, gap, _ventricles(head, g, t, s))
    brain = here.brain
    ventricles = here.ventricles[0] | here.ventricles[1]

    hu = np.full((size, size), HU_MIN, np.float32)
    _paint_skull(hu, head, depth, skull=g.skull * np.float32(1.3 - 0.4 * t))
    cortex = (depth < 0.035) | ((gap < sulcus_width + 0.03) & (depth < sulcus_depth + 0.03))
    wave = math.cos(_TAU * t) * g.waves[0] + math.sin(_TAU * t) * g.waves[1]
    tissue = np.where(cortex, np.float32(head.grey), np.float32(head.white)) + wave
    hu[brain] = tissue[brain]
    hu[_deep_grey(head, g, t, s) & brain] = head.grey - 3
    sulci = (depth < 0.8 * head.sulcus_width) | ((gap < sulcus_width) & (depth < sulcus_depth))
    hu[brain & sulci] = head.csf + 0.3 * (head.grey - head.csf)  # thin: partial volume
    hu[ventricles] = head.csf

    masks = {kind: np.zeros((size, size), bool) for kind in SUBTYPES}
    blood = np.zeros((size, size), bool)
    active = [b for b in bleeds if b.first <= z < b.stop]
    for bleed in sorted(active, key=lambda b: _PAINT_ORDER.index(b.kind)):
        mask = _bleed_mask(bleed, here, bleed.swell(z))
        if np.count_nonzero(mask) < min_area(size):
            continue
        if bleed.kind == "intraparenchymal":  # a rim of oedema, darker than white matter
            halo = _blob(bleed, here, 1.35 * bleed.swell(z)) & brain & ~ventricles & ~blood
            hu[halo] = head.white - 6
        core = mask
        if bleed.rim:  # edge pixels only partly hold blood: between it and the tissue beneath
            core = _eroded(mask)
            edge = mask & ~core
            hu[edge] += (bleed.hu - hu[edge]) * np.float32(1 - bleed.rim)
        hu[core] = bleed.hu
        masks[bleed.kind] |= mask
        blood |= mask

    rng = np.random.default_rng([head.noise_seed, z, size])
    hu += rng.standard_normal((size, size), np.float32) * np.float32(head.noise)
    return np.rint(np.clip(hu, HU_MIN, HU_MAX, out=hu), out=hu), masks


@dataclass(frozen=True)
class _Grid:
    """Per-head, per-size arrays that stay fixed along a study (computed once, then cached)."""

    u: np.ndarray  # head coordinates: left-right, front-back (+ is posterior, down the image)
    v: np.ndarray
    rad: np.ndarray
    phi: np.ndarray
    outline: np.ndarray  # inner-table radius along each pixel's ray at the widest slice
    skull: np.ndarray  # bone thickness along each ray
    sulcus_phase: np.ndarray  # sulci sit at whole numbers
    sulcus_scale: np.ndarray  # phase units to normalised distance
    wiggle: np.ndarray  # phase of the sulci's wiggle
    waves: tuple[np.ndarray, np.ndarray]  # two smooth texture fields, mixed along the study


@dataclass(frozen=True)
class _Slice:
    """What the bleeds of one slice are drawn against."""

    head: Head
    g: _Grid
    t: float  # fraction of the way through the study
    s: float  # cross-section scale of the head at this slice
    depth: np.ndarray
    brain: np.ndarray
    gap: np.ndarray  # distance to the nearest sulcus
    ventricles: tuple[np.ndarray, np.ndarray]


@lru_cache(maxsize=6)
def _grid(head: Head, size: int) -> _Grid:
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1).astype(np.float32)
    x, y = np.meshgrid(c - head.cx, c - head.cy)
    cos, sin = math.cos(head.angle), math.sin(head.angle)
    u, v = x * cos + y * sin, y * cos - x * sin
    rad, phi = np.hypot(u, v), np.arctan2(v, u)
    a2, p2, a3, p3 = head.outline
    ellipse = 1 / np.sqrt((np.cos(phi) / head.a) ** 2 + (np.sin(phi) / head.b) ** 2)
    outline = ellipse * (1 + a2 * np.cos(2 * phi + p2) + a3 * np.cos(3 * phi + p3))
    skull = head.skull * (1 + 0.3 * np.cos(phi - head.skull_phase)
                          + 0.15 * np.cos(3 * phi + 2 * head.skull_phase))
    f = head.texture
    waves = tuple(sum(np.sin(f[i] * u + f[i + 1] * v + f[i + 2]) for i in range(k, k + 9, 3))
                  for k in (0, 9))
    j1, q1, j2, q2 = head.sulcus_jitter
    sulcus_phase = phi * (head.sulci / _TAU) + j1 * np.sin(5 * phi + q1) + j2 * np.sin(9 * phi + q2)
    arrays = dict(u=u, v=v, rad=rad, phi=phi, outline=outline, skull=skull,
                  sulcus_phase=sulcus_phase, sulcus_scale=rad * (_TAU / head.sulci),
                  wiggle=7 * phi)
    arrays = {k: a.astype(np.float32) for k, a in arrays.items()}
    arrays["waves"] = tuple((0.9 * w).astype(np.float32) for w in waves)
    for a in (*arrays["waves"], *(arrays[k] for k in arrays if k != "waves")):
        a.setflags(write=False)  # shared through the cache
    return _Grid(**arrays)


def _paint_skull(hu: np.ndarray, head: Head, depth: np.ndarray, skull: np.ndarray) -> None:
    """Bone as a ring with bright tables and a darker diploe, and a soft-tissue scalp outside."""
    out = -depth
    bone = (out >= 0) & (out < skull)
    hu[(out >= skull) & (out < skull + head.scalp)] = 30
    across = out[bone] / skull[bone]  # 0 at the inner table, 1 at the outer
    hi, lo = head.bone
    hu[bone] = hi - (hi - lo) * np.sin(np.pi * across) ** 2


def _sulci(head: Head, g: _Grid, depth: np.ndarray, t: float,
           s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance to the nearest sulcus, and that sulcus's depth and half-width, at every pixel.

    Sulci run inwards from the surface, unevenly spaced, bending and wiggling on the way in,
    and drift a little from slice to slice.
    """
    phase = g.sulcus_phase + head.sulcus_curl * depth + 0.3 * math.sin(_TAU * t)
    phase += 0.15 * np.sin(50 * depth + g.wiggle)
    nearest = np.rint(phase)
    gap = np.abs(phase - nearest) * g.sulcus_scale
    which = nearest.astype(np.int64) % head.sulci
    rng = np.random.default_rng(head.anatomy_seed)
    depths = rng.uniform(0.3, 1.0, head.sulci).astype(np.float32) * np.float32(head.sulcus_depth * s)
    widths = rng.uniform(0.6, 1.4, head.sulci).astype(np.float32) * np.float32(head.sulcus_width)
    return gap, depths[which], widths[which]


def _window(head: Head, uc: float, vc: float, reach: float, size: int) -> tuple[slice, slice]:
    """Rows and columns of the image that hold every point within `reach` of head point (uc, vc)."""
    cos, sin = math.cos(head.angle), math.sin(head.angle)
    x, y = head.cx + uc * cos - vc * sin, head.cy + uc * sin + vc * cos

    def span(centre: float) -> slice:
        lo = math.floor((centre - reach + 1) * size / 2)
        hi = math.ceil((centre + reach + 1) * size / 2)
        return slice(min(max(lo, 0), size), min(max(hi, 0), size))

    return span(y), span(x)


def _ellipse(head: Head, g: _Grid, centre: tuple[float, float], axes: tuple[float, float],
             tilt: float) -> np.ndarray:
    """Bool mask of a tilted ellipse given in head coordinates."""
    mask = np.zeros(g.u.shape, bool)
    win = _window(head, *centre, max(axes), g.u.shape[0])
    du, dv = g.u[win] - centre[0], g.v[win] - centre[1]
    cos, sin = math.cos(tilt), math.sin(tilt)
    mask[win] = ((du * cos + dv * sin) / axes[0]) ** 2 + ((dv * cos - du * sin) / axes[1]) ** 2 < 1
    return mask


def _fade(t: float, span: tuple[float, float]) -> float:
    """1 in the middle of the study fraction `span`, 0 outside it, smooth in between."""
    mid, half = (span[0] + span[1]) / 2, (span[1] - span[0]) / 2
    return math.sqrt(max(0.0, 1 - ((t - mid) / half) ** 2))


def _ventricle_geometry(
    head: Head, t: float, s: float, side: int
) -> tuple[tuple[float, float], tuple[float, float], float]:
    """Centre, semi-axes and tilt of one lateral ventricle: its front horn leans to the midline."""
    size = head.ventricles * _fade(t, _VENTRICLE_SPAN) * s
    centre = (side * 0.16 * head.a * s, -0.06 * head.b * s)
    return centre, (0.1 * head.a * size + 1e-6, 0.3 * head.b * size + 1e-6), -side * 0.3


def _ventricles(head: Head, g: _Grid, t: float, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Left and right lateral ventricles; empty outside the middle slices."""
    if _fade(t, _VENTRICLE_SPAN) == 0:
        empty = np.zeros(g.u.shape, bool)
        return empty, empty
    return tuple(_ellipse(head, g, *_ventricle_geometry(head, t, s, side)) for side in (-1, 1))


def _deep_grey(head: Head, g: _Grid, t: float, s: float) -> np.ndarray:
    """Basal ganglia: two grey-matter ovals beside the ventricles in the middle slices."""
    fade = _fade(t, (0.3, 0.7))
    mask = np.zeros(g.u.shape, bool)
    if fade == 0:
        return mask
    for side in (-1, 1):
        axes = (0.09 * head.a * s * fade + 1e-6, 0.16 * head.b * s * fade + 1e-6)
        mask |= _ellipse(head, g, (side * 0.32 * head.a * s, 0.05 * head.b * s), axes, side * 0.2)
    return mask


def _bleed_mask(bleed: Bleed, here: _Slice, swell: float) -> np.ndarray:
    """Where `bleed` is in this slice, before the visible-area check."""
    head, g, depth, brain = here.head, here.g, here.depth, here.brain
    if bleed.kind in ("epidural", "subdural", "subarachnoid"):
        turn = (g.phi - bleed.where[0] + math.pi) % _TAU - math.pi
        along = np.maximum(0, 1 - (turn / (bleed.size * swell)) ** 2)  # 1 at the centre, 0 past
        if bleed.kind == "epidural":  # thickness bulges with the lens
            return brain & (depth < bleed.depth * swell * np.sqrt(along))
        if bleed.kind == "subdural":  # even thickness that tapers only near the tips
            return brain & (depth < bleed.depth * (0.75 + 0.25 * swell) * along**0.3)
        reach = bleed.depth * (0.6 + 0.4 * swell) * np.sqrt(along) + 1e-6
        width = _SAH_HALF_WIDTH * (1 - 0.4 * depth / reach)  # tapers as it goes in
        return brain & (depth < reach) & ((here.gap < width) | (depth < 0.012))
    if bleed.kind == "intraparenchymal":
        return _blob(bleed, here, swell) & brain & ~here.ventricles[0] & ~here.ventricles[1]
    # intraventricular: blood settles at the back of the ventricle (the patient lies supine)
    mask = np.zeros(g.u.shape, bool)
    fill = bleed.size * (0.6 + 0.4 * swell)
    for index, side in enumerate((-1, 1)):
        if int(bleed.where[0]) in (0, side):
            (_, vc), (_, half), _ = _ventricle_geometry(head, here.t, here.s, side)
            mask |= here.ventricles[index] & (g.v > vc + half * (1 - 2 * fill))
    return mask


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` whose four neighbours are in it too."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def _blob(bleed: Bleed, here: _Slice, scale: float) -> np.ndarray:
    """The intraparenchymal clot's irregular oval, its radius times `scale`."""
    head, g = here.head, here.g
    uc, vc = bleed.where[0] * head.a * here.s, bleed.where[1] * head.b * here.s
    radius = bleed.size * scale
    a2, p2, a3, p3 = bleed.lobes
    mask = np.zeros(g.u.shape, bool)
    win = _window(head, uc, vc, radius * (1 + a2 + a3), g.u.shape[0])
    du, dv = g.u[win] - uc, g.v[win] - vc
    theta = np.arctan2(dv, du)
    edge = radius * (1 + a2 * np.cos(2 * theta + p2) + a3 * np.cos(3 * theta + p3))
    mask[win] = np.hypot(du, dv) < edge
    return mask
