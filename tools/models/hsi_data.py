"""Deterministic synthetic hyperspectral driving scenes (HSI-Drive-like, 5 classes).

Each scene is a 25-band cube over 600-975 nm with a label map:
0 unlabelled, 1 road, 2 road marks, 3 vegetation, 4 sky, 5 other (vehicles, buildings).

Spectra are simple physical caricatures (reflectance x illumination):
- asphalt: dark (~0.06-0.14) and nearly flat, slowly rising with wavelength;
- road paint: bright (~0.55-0.8), flat, slight fall in the NIR;
- vegetation: low red reflectance, red edge near 700-730 nm, NIR plateau, weak
  water dip near 970 nm;
- sky: scattered light, falling steeply with wavelength (~lambda^-4 plus haze);
- vehicles: painted metal in varied colours (coloured pigment edge + NIR level),
  dark windows, grey tyres; buildings: concrete or brick.
Scenes vary in sun level and spectral tilt, have cast shadows (darker, bluer),
sensor noise (shot + read), and unlabelled pixels along class borders and in
random patches, as in hand-annotated data.

Everything is a pure function of the seed: same seed, same scene, on any machine
(NumPy's PCG64 Generator is stable across platforms).
"""

from __future__ import annotations

import numpy as np

NUM_BANDS = 25
WAVELENGTHS = np.linspace(600.0, 975.0, NUM_BANDS)  # nm
NUM_CLASSES = 6
CLASS_NAMES = ["unlabelled", "road", "road_marks", "vegetation", "sky", "other"]
SIZES = {"tiny": (32, 64), "small": (96, 192)}

# Seeds: training scenes draw from one stream, the shipped test sets from another.
TRAIN_SEED = 1000
VAL_SEED = 2000
TEST_SEED = 3000
TEST_COUNT = {"tiny": 16, "small": 8}

_L = (WAVELENGTHS - 600.0) / 375.0  # 0..1 across the band range


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def asphalt(rng):
    base = rng.uniform(0.06, 0.14)
    return base * (1.0 + rng.uniform(0.05, 0.25) * _L)


def paint(rng):
    base = rng.uniform(0.55, 0.8)
    return base * (1.0 - rng.uniform(0.0, 0.12) * _L)


def vegetation(rng):
    red = rng.uniform(0.03, 0.08)
    nir = rng.uniform(0.35, 0.6)
    edge = rng.uniform(700.0, 730.0)
    s = red + (nir - red) * _sigmoid((WAVELENGTHS - edge) / rng.uniform(8.0, 15.0))
    water = 1.0 - rng.uniform(0.05, 0.15) * np.exp(-(((WAVELENGTHS - 965.0) / 25.0) ** 2))
    return s * water


def sky(rng):
    lvl = rng.uniform(0.7, 1.1)
    haze = rng.uniform(0.05, 0.25)
    return lvl * ((600.0 / WAVELENGTHS) ** 4 * (1 - haze) + haze)


def painted_metal(rng):
    kind = rng.integers(0, 6)
    if kind == 0:  # white
        s = np.full(NUM_BANDS, rng.uniform(0.55, 0.75))
    elif kind == 1:  # black
        s = np.full(NUM_BANDS, rng.uniform(0.03, 0.07)) * (1 + 0.3 * _L)
    elif kind == 2:  # red: high beyond the pigment edge already at 600 nm
        s = 0.25 + 0.3 * _sigmoid((WAVELENGTHS - 610.0) / 10.0)
    elif kind == 3:  # blue: low in red, rising in NIR
        s = 0.06 + 0.3 * _sigmoid((WAVELENGTHS - 800.0) / 40.0)
    elif kind == 4:  # grey/silver metallic
        s = np.full(NUM_BANDS, rng.uniform(0.25, 0.4)) * (1 - 0.1 * _L)
    else:  # green/yellow car: pigment edge at varied place, no red edge plateau
        s = 0.12 + 0.35 * _sigmoid((WAVELENGTHS - rng.uniform(620.0, 700.0)) / 20.0)
    return s * rng.uniform(0.85, 1.15)


def building(rng):
    if rng.random() < 0.5:  # concrete
        return np.full(NUM_BANDS, rng.uniform(0.2, 0.35)) * (1 + 0.15 * _L)
    return 0.15 + 0.2 * _sigmoid((WAVELENGTHS - 620.0) / 30.0)  # brick


def _smooth_noise(rng, n, scale):
    """1-D smooth random profile of length n (sum of a few sines)."""
    x = np.arange(n) / max(n, 1)
    out = np.zeros(n)
    for k in range(1, 4):
        out += rng.normal(0, 1.0 / k) * np.sin(2 * np.pi * (k * x * scale + rng.random()))
    return out


def make_scene(rng: np.random.Generator, h: int, w: int):
    """One scene: returns (cube f32 [25,h,w], labels u8 [h,w])."""
    refl = np.zeros((h, w, NUM_BANDS))
    lab = np.zeros((h, w), np.uint8)
    rows = np.arange(h)[:, None].astype(float)
    cols = np.arange(w)[None, :].astype(float)

    horizon = rng.uniform(0.32, 0.5) * h
    vx = rng.uniform(0.35, 0.65) * w

    # Sky with a gentle vertical gradient.
    sky_s = sky(rng)
    grad = 1.0 + 0.25 * (rows / h)[..., None]
    is_sky = np.broadcast_to(rows < horizon, (h, w))
    refl[is_sky] = (sky_s[None, None, :] * grad * np.ones((1, w, 1)))[is_sky]
    lab[is_sky] = 4

    # Ground: vegetation everywhere below the horizon, road drawn on top.
    veg_a, veg_b = vegetation(rng), vegetation(rng)
    mix = 0.5 + 0.5 * np.sin(cols / w * rng.uniform(3, 12) + rows / h * rng.uniform(2, 8) + rng.random() * 6)
    ground = ~is_sky
    vg = veg_a[None, None, :] * mix[..., None] + veg_b[None, None, :] * (1 - mix[..., None])
    refl[ground] = np.broadcast_to(vg, (h, w, NUM_BANDS))[ground]
    lab[ground] = 3

    # Tree line / buildings above the horizon (occluding sky).
    treeline = horizon - np.abs(_smooth_noise(rng, w, rng.uniform(1, 4))) * h * rng.uniform(0.03, 0.12)
    is_tree = (rows < horizon) & (rows >= treeline[None, :])
    tree_s = vegetation(rng) * 0.8
    refl[is_tree] = tree_s
    lab[is_tree] = 3
    for _ in range(rng.integers(0, 3)):
        bw = rng.uniform(0.08, 0.25) * w
        bx = rng.uniform(0, w - bw)
        bh = rng.uniform(0.1, 0.3) * h
        m = (rows < horizon + 1) & (rows >= horizon - bh) & (cols >= bx) & (cols < bx + bw)
        refl[m] = building(rng)
        lab[m] = 5

    # Perspective road: a trapezoid from the vanishing point to the bottom edge.
    depth = np.clip((rows - horizon) / (h - horizon), 0, 1)  # 0 at horizon, 1 at bottom
    half_bottom = rng.uniform(0.35, 0.6) * w
    centre_bottom = vx + rng.uniform(-0.15, 0.15) * w
    centre = vx + (centre_bottom - vx) * depth
    half = 0.01 * w + half_bottom * depth
    is_road = ground & (np.abs(cols - centre) <= half)
    road_s = asphalt(rng)
    tex = 1.0 + 0.08 * rng.standard_normal((h, w))
    refl[is_road] = (road_s[None, None, :] * tex[..., None])[is_road]
    lab[is_road] = 1

    # Road marks: dashed centre line, optional solid edge lines; widths in perspective.
    paint_s = paint(rng)
    lane = rng.uniform(-0.1, 0.1)
    mw = np.maximum(0.012 * w * depth + 0.2, 0.35)
    z = 1.0 / np.maximum(depth, 0.03)  # distance along the road
    period = rng.uniform(2.0, 4.0)
    dash = ((z / period + rng.random()) % 1.0) < rng.uniform(0.4, 0.6)
    line_c = centre + lane * half
    marks = is_road & (np.abs(cols - line_c) <= mw) & dash & (depth > 0.08)
    if rng.random() < 0.6:
        for side in (-1, 1):
            edge_c = centre + side * 0.88 * half
            marks |= is_road & (np.abs(cols - edge_c) <= mw * 0.8) & (depth > 0.1)
    refl[marks] = paint_s
    lab[marks] = 2

    # Vehicles: boxes standing on the road, sized by distance.
    shadow = np.ones((h, w))
    for _ in range(rng.integers(0, 4)):
        d = rng.uniform(0.08, 0.8)
        y_base = horizon + d * (h - horizon)
        c = vx + (centre_bottom - vx) * d
        hw = 0.01 * w + half_bottom * d
        x_c = c + rng.uniform(-0.6, 0.6) * hw
        vw = (0.02 + 0.5 * d) * w * rng.uniform(0.25, 0.4)
        vh = vw * rng.uniform(0.6, 0.9)
        body = (rows <= y_base) & (rows > y_base - vh) & (np.abs(cols - x_c) <= vw / 2)
        refl[body] = painted_metal(rng)
        lab[body] = 5
        win = body & (rows > y_base - vh) & (rows < y_base - 0.55 * vh) & (np.abs(cols - x_c) <= vw * 0.38)
        refl[win] = np.full(NUM_BANDS, 0.05)
        tyre = body & (rows > y_base - 0.15 * vh) & (np.abs(np.abs(cols - x_c) - vw * 0.35) <= vw * 0.1)
        refl[tyre] = np.full(NUM_BANDS, 0.07)
        sh = (rows > y_base) & (rows <= y_base + 0.25 * vh + 1) & (np.abs(cols - x_c - vw * 0.2) <= vw * 0.6)
        shadow[sh] *= 0.35

    # Tree shadows falling on the ground.
    for _ in range(rng.integers(0, 4)):
        cy = rng.uniform(horizon, h)
        cx = rng.uniform(0, w)
        ry, rx = rng.uniform(0.03, 0.15) * h, rng.uniform(0.05, 0.25) * w
        blob = (((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2) < 1.0
        shadow[blob & ground] *= rng.uniform(0.3, 0.6)

    # Illumination: sun level and spectral tilt; shadows are lit by the (bluer) sky.
    sun = rng.uniform(0.5, 1.4) * (1.0 + rng.uniform(-0.3, 0.3) * (_L - 0.5))
    skylight = 0.6 + 0.4 * (600.0 / WAVELENGTHS) ** 2
    shade = shadow[..., None]
    illum = sun[None, None, :] * (shade + (1 - shade) * 0.0) * np.where(shade < 1, skylight[None, None, :], 1.0)
    illum = np.where(is_sky[..., None], sun[None, None, :] / sun.mean(), illum)
    radiance = refl * illum

    # Sensor: shot noise, read noise, per-band gain mismatch.
    gain = 1.0 + rng.normal(0, 0.02, NUM_BANDS)
    radiance = radiance * gain
    radiance = radiance + rng.normal(0, 1, radiance.shape) * np.sqrt(np.maximum(radiance, 0) * 0.002 + 0.0001)
    cube = np.clip(radiance, 0, None) * 2.0 - 1.0  # normalised roughly to [-1, 1]

    # Unlabelled pixels: class borders (annotation gaps) and a few random patches.
    border = np.zeros((h, w), bool)
    border[1:, :] |= lab[1:, :] != lab[:-1, :]
    border[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    keep = rng.random((h, w)) < 0.5
    labels = lab.copy()
    labels[border & keep] = 0
    for _ in range(rng.integers(0, 3)):
        py, px = rng.integers(0, h), rng.integers(0, w)
        s = max(1, int(rng.uniform(0.03, 0.1) * h))
        labels[max(0, py - s) : py + s, max(0, px - s) : px + s] = 0

    return cube.transpose(2, 0, 1).astype(np.float32), labels


def make_set(seed: int, n: int, size: str):
    """n scenes of a size from one seed: (inputs f32 [n,25,H,W], labels u8 [n,H,W])."""
    h, w = SIZES[size]
    xs = np.empty((n, NUM_BANDS, h, w), np.float32)
    ys = np.empty((n, h, w), np.uint8)
    for i in range(n):
        # One child stream per scene keeps scene i independent of n.
        rng = np.random.Generator(np.random.PCG64([seed, i, h, w]))
        xs[i], ys[i] = make_scene(rng, h, w)
    return xs, ys


def test_set(size: str):
    return make_set(TEST_SEED, TEST_COUNT[size], size)


if __name__ == "__main__":
    import sys

    size = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    x, y = make_set(TEST_SEED, 4, size)
    print(x.shape, x.min(), x.max(), np.bincount(y.ravel(), minlength=6) / y.size)
    for r in y[0][:: max(1, y.shape[1] // 32)]:
        print("".join(".RMVSO"[v] for v in r[:: max(1, y.shape[2] // 64)]))
