#!/usr/bin/env python3
"""Draws the sample catalog's product photos: simple flat products on a white background,
256x256 PNG, written to samples/. As in a studio photo, each product's silhouette has a thin
darker rim (its edge turning away from the light) and a soft contact shadow under it; the rim
keeps a white product (a mug, a sneaker, a glass) apart from the white background. Standard
library only (zlib + struct), so the quickstart needs no download and no imaging package. Deterministic: same script, same bytes.

    python3 scripts/make-sample-images.py [OUT_DIR]
"""

import math
import os
import struct
import sys
import zlib

SIZE = 256
SS = 2  # supersampling factor for smooth edges
W = SIZE * SS


def png(path, pixels):
    """Writes RGB rows (list of bytearrays) as an 8-bit PNG."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", SIZE, SIZE, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# Shapes work in 0..1 coordinates; each is (inside(x, y) -> bool, colour or shade(x, y) -> rgb).
def rect(x0, y0, x1, y1, r=0.0):
    def inside(x, y):
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            return False
        cx = min(max(x, x0 + r), x1 - r)
        cy = min(max(y, y0 + r), y1 - r)
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r + 1e-12
    return inside


def ellipse(cx, cy, rx, ry):
    return lambda x, y: ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def ring(cx, cy, rx, ry, t):
    outer, inner = ellipse(cx, cy, rx, ry), ellipse(cx, cy, rx - t, ry - t)
    return lambda x, y: outer(x, y) and not inner(x, y)


def poly(points):
    def inside(x, y):
        n, c = len(points), False
        for i in range(n):
            (xa, ya), (xb, yb) = points[i], points[(i + 1) % n]
            if (ya > y) != (yb > y) and x < (xb - xa) * (y - ya) / (yb - ya) + xa:
                c = not c
        return c
    return inside


def shaded(rgb, light=0.25):
    """A colour lit from the left: lighter at x=0.3, darker at the right."""
    def shade(x, y):
        k = 1.0 + light * (0.5 - abs(x - 0.35) * 2.0)
        return tuple(max(0, min(255, int(c * k))) for c in rgb)
    return shade


SHADOW_DEPTH = 31  # how much darker than white the shadow's centre is (224)


def shadow(cx=0.5, cy=0.86, rx=0.3, ry=0.045):
    """A soft contact shadow: white at its edge, falling smoothly to its darkest at the centre
    (no step between neighbouring pixels is more than a few levels)."""
    def paint(x, y):
        r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        v = int(round(255 - SHADOW_DEPTH * max(0.0, 1.0 - r2) ** 2))
        return (v, v, v)
    paint.shadow = True
    return (ellipse(cx, cy, rx, ry), paint)


RIM = 3  # the rim's width in supersamples (1.5 px)
RIM_SHADE = 0.72  # how much darker the rim is than the product under it


def render(shapes):
    # One supersampled grid: each sample's colour, and whether it is the product (any shape
    # but the contact shadow).
    colour = [[(255, 255, 255)] * W for _ in range(W)]
    product = [[False] * W for _ in range(W)]
    for gy in range(W):
        for gx in range(W):
            x, y = (gx + 0.5) / W, (gy + 0.5) / W
            for inside, paint in shapes:
                if inside(x, y):
                    colour[gy][gx] = paint(x, y) if callable(paint) else paint
                    product[gy][gx] = not getattr(paint, "shadow", False)
    # The rim: product samples within RIM of a sample that is not the product.
    offsets = [(dx, dy) for dx in (-RIM, 0, RIM) for dy in (-RIM, 0, RIM) if (dx, dy) != (0, 0)]
    for gy in range(W):
        for gx in range(W):
            if not product[gy][gx]:
                continue
            edge = any(
                not (0 <= gx + dx < W and 0 <= gy + dy < W) or not product[gy + dy][gx + dx]
                for dx, dy in offsets
            )
            if edge:
                colour[gy][gx] = tuple(int(c * RIM_SHADE) for c in colour[gy][gx])
    rows = []
    for py in range(SIZE):
        row = bytearray()
        for px in range(SIZE):
            acc = [0, 0, 0]
            for sy in range(SS):
                for sx in range(SS):
                    col = colour[py * SS + sy][px * SS + sx]
                    acc[0] += col[0]
                    acc[1] += col[1]
                    acc[2] += col[2]
            n = SS * SS
            row += bytes((acc[0] // n, acc[1] // n, acc[2] // n))
        rows.append(row)
    return rows


def mug(body):
    return [
        shadow(),
        (ring(0.72, 0.5, 0.13, 0.15, 0.045), shaded(body)),
        (rect(0.26, 0.3, 0.7, 0.85, 0.04), shaded(body)),
        (ellipse(0.48, 0.3, 0.22, 0.035), tuple(int(c * 0.7) for c in body)),
    ]


PRODUCTS = {
    "mug-white.png": mug((236, 232, 224)),
    "mug-blue.png": mug((52, 92, 170)),
    "bottle-black.png": [
        shadow(rx=0.16),
        (rect(0.38, 0.28, 0.62, 0.86, 0.06), shaded((40, 40, 44), 0.6)),
        (rect(0.42, 0.18, 0.58, 0.3, 0.02), shaded((150, 150, 156))),
        (rect(0.44, 0.13, 0.56, 0.19, 0.02), shaded((40, 40, 44), 0.6)),
    ],
    "lamp-brass.png": [
        shadow(rx=0.22),
        (rect(0.3, 0.8, 0.7, 0.86, 0.02), shaded((181, 145, 66))),
        (rect(0.48, 0.38, 0.52, 0.81), shaded((181, 145, 66))),
        (poly([(0.3, 0.42), (0.7, 0.42), (0.6, 0.16), (0.4, 0.16)]), shaded((205, 170, 90))),
    ],
    "tote-olive.png": [
        shadow(rx=0.3),
        (ring(0.5, 0.34, 0.14, 0.16, 0.03), shaded((96, 104, 60))),
        (poly([(0.22, 0.4), (0.78, 0.4), (0.82, 0.86), (0.18, 0.86)]), shaded((112, 122, 70))),
    ],
    "sneaker-white.png": [
        shadow(rx=0.38),
        (rect(0.1, 0.74, 0.9, 0.84, 0.04), (210, 210, 204)),
        (poly([(0.12, 0.75), (0.12, 0.52), (0.34, 0.46), (0.5, 0.56), (0.86, 0.64), (0.9, 0.75)]), shaded((248, 248, 244))),
        (rect(0.36, 0.52, 0.5, 0.56), (180, 180, 176)),
        (rect(0.42, 0.58, 0.56, 0.62), (180, 180, 176)),
    ],
    "watch-steel.png": [
        shadow(rx=0.2),
        (rect(0.41, 0.1, 0.59, 0.9, 0.03), shaded((150, 152, 158))),
        (ellipse(0.5, 0.5, 0.2, 0.2), shaded((190, 192, 198))),
        (ellipse(0.5, 0.5, 0.16, 0.16), (248, 248, 250)),
        (rect(0.492, 0.38, 0.508, 0.51), (30, 30, 30)),
        (rect(0.49, 0.492, 0.6, 0.508), (30, 30, 30)),
    ],
    "pot-terracotta.png": [
        shadow(rx=0.24),
        (poly([(0.3, 0.36), (0.7, 0.36), (0.64, 0.86), (0.36, 0.86)]), shaded((196, 98, 58))),
        (rect(0.26, 0.3, 0.74, 0.38, 0.01), shaded((184, 90, 52))),
        (ellipse(0.42, 0.2, 0.1, 0.05), (70, 130, 60)),
        (ellipse(0.58, 0.17, 0.1, 0.05), (80, 145, 68)),
        (rect(0.495, 0.16, 0.505, 0.31), (70, 120, 60)),
    ],
    "tumbler-glass.png": [
        shadow(rx=0.16),
        (poly([(0.34, 0.3), (0.66, 0.3), (0.62, 0.86), (0.38, 0.86)]), (214, 232, 238)),
        (poly([(0.37, 0.5), (0.63, 0.5), (0.615, 0.83), (0.385, 0.83)]), (190, 218, 228)),
        (rect(0.4, 0.34, 0.43, 0.8), (245, 250, 252)),
    ],
    "stool-oak.png": [
        shadow(rx=0.3),
        (poly([(0.3, 0.36), (0.36, 0.36), (0.28, 0.86), (0.22, 0.86)]), shaded((168, 122, 72))),
        (poly([(0.64, 0.36), (0.7, 0.36), (0.78, 0.86), (0.72, 0.86)]), shaded((168, 122, 72))),
        (rect(0.3, 0.62, 0.7, 0.65), (150, 108, 62)),
        (rect(0.24, 0.3, 0.76, 0.37, 0.02), shaded((190, 142, 88))),
    ],
    "candle-cream.png": [
        shadow(rx=0.2),
        (rect(0.32, 0.4, 0.68, 0.86, 0.03), shaded((240, 230, 206))),
        (rect(0.495, 0.32, 0.505, 0.41), (40, 40, 40)),
        (ellipse(0.5, 0.28, 0.03, 0.06), (250, 180, 60)),
    ],
    "headphones-red.png": [
        shadow(rx=0.3),
        (ring(0.5, 0.5, 0.3, 0.32, 0.05), shaded((190, 40, 46))),
        (rect(0.16, 0.48, 0.3, 0.78, 0.05), shaded((60, 60, 64))),
        (rect(0.7, 0.48, 0.84, 0.78, 0.05), shaded((60, 60, 64))),
        (rect(0.2, 0.5, 0.3, 0.76, 0.03), shaded((200, 44, 50))),
        (rect(0.7, 0.5, 0.8, 0.76, 0.03), shaded((200, 44, 50))),
    ],
}


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "samples")
    os.makedirs(out, exist_ok=True)
    for name, shapes in PRODUCTS.items():
        png(os.path.join(out, name), render(shapes))
        print(os.path.join(out, name))


if __name__ == "__main__":
    main()
