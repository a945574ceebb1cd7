//! Finding an input's product in an output: a coarse-to-fine search over shifts and scales for
//! the [`Transform`] under which most of the product's pixels agree in colour, with lightness
//! weighted down so that a change of light still agrees.
//!
//! Hand-written: template matching in imageproc works on one grey channel at one scale, and
//! this needs colour, a mask, and a scale search.

use fast_image_resize::PixelType;

use super::QualityError;
use super::region::Mask;
use super::work::{Work, resize_u8};

/// Where an input pixel lands in the output: scaled by `scale` about the product's centre
/// `(cx, cy)`, shifted by `(dx, dy)`, in a frame whose origin is `(ox, oy)` in the output (the
/// input's frame is fitted inside the output's when their aspects differ).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Transform {
    pub(crate) scale: f32,
    pub(crate) dx: f32,
    pub(crate) dy: f32,
    pub(crate) cx: f32,
    pub(crate) cy: f32,
    pub(crate) ox: f32,
    pub(crate) oy: f32,
}

impl Transform {
    /// No change: the product where it was, at its size.
    pub(crate) fn identity(cx: f32, cy: f32, ox: f32, oy: f32) -> Self {
        Self { scale: 1.0, dx: 0.0, dy: 0.0, cx, cy, ox, oy }
    }

    /// Input coordinates to output coordinates.
    pub(crate) fn apply(&self, x: f32, y: f32) -> (f32, f32) {
        (
            self.ox + self.cx + self.scale * (x - self.cx) + self.dx,
            self.oy + self.cy + self.scale * (y - self.cy) + self.dy,
        )
    }

    /// Output coordinates to input coordinates.
    pub(crate) fn invert(&self, x: f32, y: f32) -> (f32, f32) {
        (
            self.cx + (x - self.ox - self.cx - self.dx) / self.scale,
            self.cy + (y - self.oy - self.cy - self.dy) / self.scale,
        )
    }

    fn with(&self, scale: f32, dx: f32, dy: f32) -> Self {
        Self { scale, dx, dy, ..*self }
    }
}

/// The best placement found and the share of the product's pixels that agree there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Located {
    pub(crate) transform: Transform,
    pub(crate) agreement: f32,
}

/// Two colours agree when their distance, with lightness counted at half weight, is at most
/// this (ΔE units): a relit product agrees, a recoloured one does not.
const AGREE: f32 = 10.0;

/// True when two CIELAB colours agree.
pub(crate) fn agree(a: [f32; 3], b: [f32; 3]) -> bool {
    let (dl, da, db) = ((a[0] - b[0]) * 0.5, a[1] - b[1], a[2] - b[2]);
    dl * dl + da * da + db * db <= AGREE * AGREE
}

/// A product scoring this high at scale 1 and no shift, on the coarse level, is in place: most of
/// its pixels agree and its ring stands apart from it. A moved, scaled or reshaped product
/// cannot score this there (its ring is covered, or its pixels miss), so the search for where
/// else it went is not needed.
const IN_PLACE: f32 = 0.9;

/// Coarse placements scoring this far below the best are not worth refining.
const NEAR_BEST: f32 = 0.2;

/// Scales tried at the coarsest level.
/// About 9 % apart, so that the finer levels (±5 %, then ±3 %) reach every scale between.
const SCALES: [f32; 15] =
    [0.5, 0.56, 0.62, 0.69, 0.76, 0.84, 0.92, 1.0, 1.09, 1.19, 1.3, 1.42, 1.55, 1.7, 1.85];

/// A template point: input coordinates (full working scale) and a colour.
type Point = (f32, f32, [f32; 3]);

/// The template at one level of the search: the product's points, and a ring of points just
/// outside it that carry the colour of the nearest product pixel. Inside points should agree
/// with the output; ring points should not (else the output's product is larger than the
/// input's, which agreement alone cannot see).
struct Level {
    points: Vec<Point>,
    ring: Vec<Point>,
    out: Work,
    kx: f32,
    ky: f32,
}

fn thin(points: Vec<Point>, max_points: usize) -> Vec<Point> {
    if points.len() <= max_points {
        return points;
    }
    let stride = points.len().div_ceil(max_points);
    points.into_iter().step_by(stride).collect()
}

fn level(
    input: &Work,
    mask: &Mask,
    output: &Work,
    factor: f32,
    max_points: usize,
) -> Result<Level, QualityError> {
    let size = |v: usize| ((v as f32 / factor).round() as usize).max(1);
    let (iw, ih) = (size(input.w), size(input.h));
    let small = if (iw, ih) == (input.w, input.h) { input.clone() } else { input.resized(iw, ih)? };
    let small_mask = if (iw, ih) == (mask.w, mask.h) {
        mask.on.clone()
    } else {
        let gray: Vec<u8> = mask.on.iter().map(|&b| if b { 255 } else { 0 }).collect();
        resize_u8(&gray, mask.w, mask.h, iw, ih, PixelType::U8)?.into_iter().map(|v| v >= 128).collect()
    };
    let (ow, oh) = (size(output.w), size(output.h));
    let out = if (ow, oh) == (output.w, output.h) { output.clone() } else { output.resized(ow, oh)? };
    let (sx, sy) = (input.w as f32 / iw as f32, input.h as f32 / ih as f32);
    let mut points: Vec<Point> = Vec::new();
    for y in 0..ih {
        for x in 0..iw {
            if small_mask[y * iw + x] {
                points.push(((x as f32 + 0.5) * sx, (y as f32 + 0.5) * sy, small.at(x, y)));
            }
        }
    }
    let level_mask = Mask { w: iw, h: ih, on: small_mask };
    let ring_mask = level_mask.dilated(RING);
    let r = usize::from(RING);
    let mut ring: Vec<Point> = Vec::new();
    for y in 0..ih {
        for x in 0..iw {
            if !ring_mask.get(x, y) || level_mask.get(x, y) {
                continue;
            }
            let mut nearest: Option<(usize, [f32; 3])> = None;
            for ny in y.saturating_sub(r)..(y + r + 1).min(ih) {
                for nx in x.saturating_sub(r)..(x + r + 1).min(iw) {
                    let d = nx.abs_diff(x).max(ny.abs_diff(y));
                    if level_mask.get(nx, ny) && nearest.is_none_or(|(best, _)| d < best) {
                        nearest = Some((d, small.at(nx, ny)));
                    }
                }
            }
            if let Some((_, lab)) = nearest {
                ring.push(((x as f32 + 0.5) * sx, (y as f32 + 0.5) * sy, lab));
            }
        }
    }
    Ok(Level {
        points: thin(points, max_points),
        ring: thin(ring, max_points / 3),
        kx: ow as f32 / output.w as f32,
        ky: oh as f32 / output.h as f32,
        out,
    })
}

/// Width of the ring around the template, in pixels of its level.
const RING: u8 = 1;

/// The share of `points` that agree with the output under `t` (points that land outside the
/// output disagree).
fn agreement_of(points: &[Point], level: &Level, t: &Transform) -> f32 {
    if points.is_empty() {
        return 0.0;
    }
    let (w, h) = (level.out.w as f32, level.out.h as f32);
    let mut agreeing = 0usize;
    for &(x, y, lab) in points {
        let (ox, oy) = t.apply(x, y);
        let (lx, ly) = (ox * level.kx, oy * level.ky);
        if lx >= 0.0 && ly >= 0.0 && lx < w && ly < h && agree(lab, level.out.at(lx as usize, ly as usize)) {
            agreeing += 1;
        }
    }
    agreeing as f32 / points.len() as f32
}

/// The share of the product's points that agree with the output under `t`.
fn agreement(level: &Level, t: &Transform) -> f32 {
    agreement_of(&level.points, level, t)
}

/// Mostly the product's agreement, partly its ring's disagreement, with a slight preference
/// for staying put so that ties (a flat product) resolve to the smallest change. `None` as
/// soon as the score cannot beat `to_beat`: most placements searched are far off, and a few
/// points tell.
fn score(level: &Level, t: &Transform, side: f32, to_beat: f32) -> Option<f32> {
    let penalty = 0.02 * (t.dx.hypot(t.dy) / side) + 0.02 * t.scale.ln().abs();
    let n = level.points.len();
    if n == 0 {
        return None;
    }
    let (w, h) = (level.out.w as f32, level.out.h as f32);
    let mut agreeing = 0usize;
    for (k, &(x, y, lab)) in level.points.iter().enumerate() {
        let (ox, oy) = t.apply(x, y);
        let (lx, ly) = (ox * level.kx, oy * level.ky);
        if lx >= 0.0 && ly >= 0.0 && lx < w && ly < h && agree(lab, level.out.at(lx as usize, ly as usize)) {
            agreeing += 1;
        }
        // Checked every 8 points: the best this placement could still reach.
        if k % 8 == 7 {
            let best_case = 0.75 * (agreeing + n - k - 1) as f32 / n as f32 + 0.25 - penalty;
            if best_case <= to_beat {
                return None;
            }
        }
    }
    let outside = if level.ring.is_empty() { 1.0 } else { 1.0 - agreement_of(&level.ring, level, t) };
    let score = 0.75 * agreeing as f32 / n as f32 + 0.25 * outside - penalty;
    (score > to_beat).then_some(score)
}

/// Searches shifts up to `reach` (a share of the output's longest side) and scales from 0.5
/// to 1.9 for the placement of the input's product in the output.
pub(crate) fn locate(
    input: &Work,
    mask: &Mask,
    output: &Work,
    start: Transform,
    reach: f32,
) -> Result<Located, QualityError> {
    let side = output.w.max(output.h) as f32;
    let coarse_factor = (side / 32.0).max(1.0);
    let mid_factor = (side / 64.0).max(1.0);
    let coarse = level(input, mask, output, coarse_factor, 400)?;
    // Every other coarse pixel: the mid level searches a pixel around each candidate.
    let stride = 2.0 * coarse_factor;
    let steps = ((reach * side) / stride).ceil() as i32;
    // The best shift for each scale; the three best scales go on to be refined.
    // Scale 1 and no shift first: a faithful edit scores high at once, and every placement
    // that cannot come near the best so far is abandoned after a few points.
    let mut best: Vec<(f32, Transform)> = Vec::new();
    let mut overall = score(&coarse, &start, side, f32::MIN).unwrap_or(f32::MIN);
    let mut scales = SCALES;
    scales.sort_by(|a, b| a.ln().abs().total_cmp(&b.ln().abs()));
    let in_place = overall >= IN_PLACE;
    if in_place {
        // Where a faithful edit leaves it: the finer levels refine around it, and the wide scan
        // (most of the gate's CPU on a small image) is skipped.
        best.push((overall, start));
    }
    for &scale in if in_place { &[][..] } else { &scales[..] } {
        let mut top = (f32::MIN, start.with(scale, 0.0, 0.0));
        for iy in -steps..=steps {
            for ix in -steps..=steps {
                let t = start.with(scale, ix as f32 * stride, iy as f32 * stride);
                if let Some(s) = score(&coarse, &t, side, top.0.max(overall - NEAR_BEST)) {
                    top = (s, t);
                    overall = overall.max(s);
                }
            }
        }
        best.push(top);
    }
    best.sort_by(|a, b| b.0.total_cmp(&a.0));
    best.truncate(3);

    let mid = level(input, mask, output, mid_factor, 800)?;
    let mut top = (f32::MIN, start);
    for &(_, t) in &best {
        // The coarse grid's step is two coarse pixels: a pixel either way covers the gap.
        let reach_mid = (coarse_factor / mid_factor).ceil() as i32;
        for ds in [0.95, 0.975, 1.0, 1.025, 1.05] {
            for iy in -reach_mid..=reach_mid {
                for ix in -reach_mid..=reach_mid {
                    let c =
                        t.with(t.scale * ds, t.dx + ix as f32 * mid_factor, t.dy + iy as f32 * mid_factor);
                    if let Some(s) = score(&mid, &c, side, top.0) {
                        top = (s, c);
                    }
                }
            }
        }
    }

    let fine = level(input, mask, output, 1.0, 1200)?;
    // The mid level placed it within half its step; search a little beyond.
    let reach_fine = (mid_factor / 2.0).ceil() as i32 + 1;
    let mut t = top.1;
    let mut top = (f32::MIN, t);
    for ds in [0.97, 0.985, 1.0, 1.015, 1.03] {
        for iy in -reach_fine..=reach_fine {
            for ix in -reach_fine..=reach_fine {
                let c = t.with(t.scale * ds, t.dx + ix as f32, t.dy + iy as f32);
                if let Some(s) = score(&fine, &c, side, top.0) {
                    top = (s, c);
                }
            }
        }
    }
    t = top.1;
    Ok(Located { transform: t, agreement: agreement(&fine, &t) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-colour box on white at `(x, y)` of size `s`, in a 96×96 frame.
    fn boxed(x: usize, y: usize, s: usize, bg: [u8; 3]) -> Work {
        let mut rgb = Vec::new();
        for py in 0..96 {
            for px in 0..96 {
                let inside = (x..x + s).contains(&px) && (y..y + s).contains(&py);
                let c = match (inside, py < y + s / 3) {
                    (true, true) => [40, 160, 60],
                    (true, false) => [200, 40, 40],
                    _ => bg,
                };
                rgb.extend_from_slice(&c);
            }
        }
        Work::from_rgb(96, 96, rgb)
    }

    fn mask_of(work: &Work) -> Mask {
        Mask { w: work.w, h: work.h, on: work.rgb.chunks(3).map(|p| p != [255, 255, 255]).collect() }
    }

    #[test]
    fn finds_a_moved_and_scaled_product() {
        let input = boxed(30, 30, 30, [255, 255, 255]);
        let mask = mask_of(&input);
        let (cx, cy) = mask.centroid().unwrap();
        let start = Transform::identity(cx, cy, 0.0, 0.0);

        let same = locate(&input, &mask, &boxed(30, 30, 30, [90, 60, 30]), start, 0.3).unwrap();
        assert!(same.agreement > 0.95, "{same:?}");
        assert!(same.transform.dx.abs() <= 1.0 && (same.transform.scale - 1.0).abs() < 0.03, "{same:?}");

        let moved = locate(&input, &mask, &boxed(50, 36, 30, [90, 60, 30]), start, 0.3).unwrap();
        assert!(moved.agreement > 0.9, "{moved:?}");
        assert!(
            (moved.transform.dx - 20.0).abs() <= 1.5 && (moved.transform.dy - 6.0).abs() <= 1.5,
            "{moved:?}"
        );

        let grown = locate(&input, &mask, &boxed(22, 22, 46, [90, 60, 30]), start, 0.3).unwrap();
        assert!((grown.transform.scale - 1.53).abs() < 0.08, "{grown:?}");
    }

    #[test]
    fn transforms_invert() {
        let t = Transform { scale: 1.3, dx: 4.0, dy: -2.0, cx: 10.0, cy: 20.0, ox: 3.0, oy: 0.0 };
        let (x, y) = t.apply(7.0, 9.0);
        let (bx, by) = t.invert(x, y);
        assert!((bx - 7.0).abs() < 1e-4 && (by - 9.0).abs() < 1e-4);
    }
}
