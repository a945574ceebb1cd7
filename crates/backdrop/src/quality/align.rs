//! Finding an input's product in an output: a coarse-to-fine search over shifts and scales for
//! the [`Transform`] under which most of the product's pixels agree in colour, with lightness
//! weighted down so that a change of light still agrees, and pixels the colour of the new
//! background weighted down since they agree anywhere on it.
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
///
/// Each point carries a weight: how unlike the output's background its colour is. A point
/// the colour of the new background agrees wherever it lands on that background, so it cannot
/// tell one placement from another (a white mug on light marble matches the marble as well as
/// itself); the product's detail, rim and print can. A ring point the colour of the new
/// background likewise says nothing about the product having grown.
struct Level {
    points: Vec<Point>,
    weights: Vec<f32>,
    total: f32,
    ring: Vec<Point>,
    ring_weights: Vec<f32>,
    ring_own: Vec<[f32; 3]>,
    out: Work,
    kx: f32,
    ky: f32,
}

/// The least weight of a point: a product drawn entirely in the background's colours is still
/// placed by all its points alike.
const MIN_WEIGHT: f32 = 0.05;

/// Samples of the output's background: its border pixels (the new background surrounds the
/// product), at most `max` of them.
fn border_palette(out: &Work, max: usize) -> Vec<[f32; 3]> {
    let (w, h) = (out.w, out.h);
    let mut border: Vec<[f32; 3]> = Vec::new();
    for x in 0..w {
        border.push(out.at(x, 0));
        if h > 1 {
            border.push(out.at(x, h - 1));
        }
    }
    for y in 1..h.saturating_sub(1) {
        border.push(out.at(0, y));
        if w > 1 {
            border.push(out.at(w - 1, y));
        }
    }
    if border.len() > max {
        let stride = border.len().div_ceil(max);
        border = border.into_iter().step_by(stride).collect();
    }
    border
}

/// The share of the background samples that `lab` does not agree with, at least
/// [`MIN_WEIGHT`].
fn distinctness(lab: [f32; 3], palette: &[[f32; 3]]) -> f32 {
    if palette.is_empty() {
        return 1.0;
    }
    let unlike = palette.iter().filter(|&&b| !agree(lab, b)).count();
    (unlike as f32 / palette.len() as f32).max(MIN_WEIGHT)
}

fn thin<T>(points: Vec<T>, max_points: usize) -> Vec<T> {
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
    // The input's own colour at each ring point.
    let mut ring_own: Vec<[f32; 3]> = Vec::new();
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
                ring_own.push(small.at(x, y));
            }
        }
    }
    let palette = border_palette(&out, PALETTE);
    let points = thin(points, max_points);
    let ring = thin(ring, max_points / 3);
    // Thinned by the same stride as the ring, so the two stay paired.
    let ring_own = thin(ring_own, max_points / 3);
    let weights: Vec<f32> = points.iter().map(|p| distinctness(p.2, &palette)).collect();
    let ring_weights = ring.iter().map(|p| distinctness(p.2, &palette)).collect();
    Ok(Level {
        total: weights.iter().sum(),
        points,
        weights,
        ring,
        ring_weights,
        ring_own,
        kx: ow as f32 / output.w as f32,
        ky: oh as f32 / output.h as f32,
        out,
    })
}

/// Width of the ring around the template, in pixels of its level.
const RING: u8 = 1;

/// Background samples taken from the output's border at each level.
const PALETTE: usize = 128;

/// The share of `points` that agree with the output under `t` (points that land outside the
/// output disagree).
fn agreement_of(points: &[Point], level: &Level, t: &Transform) -> f32 {
    if points.is_empty() {
        return 0.0;
    }
    let agreeing = points.iter().filter(|&&p| lands_agreeing(level, t, p)).count();
    agreeing as f32 / points.len() as f32
}

/// The share of the product's points that agree with the output under `t`.
fn agreement(level: &Level, t: &Transform) -> f32 {
    agreement_of(&level.points, level, t)
}

/// True when the point `(x, y)` of colour `lab` lands inside the output under `t` on a pixel
/// that agrees with it.
fn lands_agreeing(level: &Level, t: &Transform, (x, y, lab): Point) -> bool {
    let (ox, oy) = t.apply(x, y);
    let (lx, ly) = (ox * level.kx, oy * level.ky);
    lx >= 0.0
        && ly >= 0.0
        && lx < level.out.w as f32
        && ly < level.out.h as f32
        && agree(lab, level.out.at(lx as usize, ly as usize))
}

/// The weighted share of the ring that does not show the product grown under `t`: a ring
/// point shows it when the output there has the colour of the product's edge and not the
/// colour the input has there (a soft rim or a shadow the region left out looks like the edge
/// in the input too, and a faithful output keeps it). 1 when the ring carries no weight.
fn ring_disagreement(level: &Level, t: &Transform) -> f32 {
    let total: f32 = level.ring_weights.iter().sum();
    if total <= 0.0 {
        return 1.0;
    }
    let (w, h) = (level.out.w as f32, level.out.h as f32);
    let mut grown = 0.0f32;
    for ((&(x, y, edge), &own), &weight) in level.ring.iter().zip(&level.ring_own).zip(&level.ring_weights) {
        let (ox, oy) = t.apply(x, y);
        let (lx, ly) = (ox * level.kx, oy * level.ky);
        if lx >= 0.0 && ly >= 0.0 && lx < w && ly < h {
            let there = level.out.at(lx as usize, ly as usize);
            if agree(edge, there) && !agree(own, there) {
                grown += weight;
            }
        }
    }
    1.0 - grown / total
}

/// Mostly the product's weighted agreement, partly its ring's weighted disagreement, with a
/// slight preference for staying put so that ties (a flat product) resolve to the smallest
/// change. `None` as soon as the score cannot beat `to_beat`: most placements searched are far
/// off, and a few points tell.
fn score(level: &Level, t: &Transform, side: f32, to_beat: f32) -> Option<f32> {
    let penalty = 0.02 * (t.dx.hypot(t.dy) / side) + 0.02 * t.scale.ln().abs();
    if level.points.is_empty() || level.total <= 0.0 {
        return None;
    }
    let total = level.total;
    let (mut agreeing, mut seen) = (0.0f32, 0.0f32);
    for (k, (&p, &w)) in level.points.iter().zip(&level.weights).enumerate() {
        if lands_agreeing(level, t, p) {
            agreeing += w;
        }
        seen += w;
        // Checked every 8 points: the best this placement could still reach.
        if k % 8 == 7 {
            let best_case = 0.75 * (agreeing + total - seen) / total + 0.25 - penalty;
            if best_case <= to_beat {
                return None;
            }
        }
    }
    let score = 0.75 * agreeing / total + 0.25 * ring_disagreement(level, t) - penalty;
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
    // The best shift for each scale; the five best scales go on to be refined (on a light
    // product over a light background the coarse level scores neighbouring scales alike).
    // Scale 1 and no shift first: a faithful edit scores high at once, and every placement
    // that cannot come near the best so far is abandoned after a few points.
    let mut best: Vec<(f32, Transform)> = Vec::new();
    let mut overall = score(&coarse, &start, side, f32::MIN).unwrap_or(f32::MIN);
    let mut scales = SCALES;
    scales.sort_by(|a, b| a.ln().abs().total_cmp(&b.ln().abs()));
    for scale in scales {
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
    best.truncate(5);

    let mid = level(input, mask, output, mid_factor, 800)?;
    let fine = level(input, mask, output, 1.0, 1200)?;
    let candidates: Vec<Transform> = best.iter().map(|&(_, t)| t).collect();
    // The coarse grid's step is two coarse pixels: a pixel either way covers the gap.
    let reach_mid = (coarse_factor / mid_factor).ceil() as i32;
    let (found_score, found) = refine((&mid, mid_factor), &fine, &candidates, reach_mid, side);
    // A faithful edit keeps the product in place, give or take a small shift. When a placement
    // that near scores within a small margin of the best, the difference is the new
    // background's texture, not a move: a moved or resized product scores far below its true
    // placement anywhere near where it was.
    let near_reach = ((NEAR_SHIFT * side) / mid_factor).ceil() as i32;
    let (near_score, near) = refine((&mid, mid_factor), &fine, &[start], near_reach, side);
    let best_score = found_score.max(near_score);
    let t = match score(&fine, &start, side, best_score - NEAR_MARGIN) {
        // Staying exactly put is the likeliest of all.
        Some(_) => start,
        None if near_score >= found_score - NEAR_MARGIN => near,
        None => found,
    };
    Ok(Located { transform: t, agreement: agreement(&fine, &t) })
}

/// Shifts a faithful edit may make, as a share of the output's longest side.
const NEAR_SHIFT: f32 = 0.02;

/// How far below the best placement a placement near where the product was may score and still
/// be taken.
const NEAR_MARGIN: f32 = 0.03;

/// The best placement around `candidates`: `reach` mid-level pixels either way and ±5 % in
/// scale on the mid level, then a few pixels and ±3 % on the full-size level.
fn refine(
    (mid, mid_factor): (&Level, f32),
    fine: &Level,
    candidates: &[Transform],
    reach: i32,
    side: f32,
) -> (f32, Transform) {
    let mut top = (f32::MIN, candidates.first().copied().unwrap_or(Transform::identity(0.0, 0.0, 0.0, 0.0)));
    for &t in candidates {
        for ds in [0.95, 0.975, 1.0, 1.025, 1.05] {
            for iy in -reach..=reach {
                for ix in -reach..=reach {
                    let c =
                        t.with(t.scale * ds, t.dx + ix as f32 * mid_factor, t.dy + iy as f32 * mid_factor);
                    if let Some(s) = score(mid, &c, side, top.0) {
                        top = (s, c);
                    }
                }
            }
        }
    }
    // The mid level placed it within half its step; search a little beyond.
    let reach_fine = (mid_factor / 2.0).ceil() as i32 + 1;
    let t = top.1;
    let mut top = (f32::MIN, t);
    for ds in [0.97, 0.985, 1.0, 1.015, 1.03] {
        for iy in -reach_fine..=reach_fine {
            for ix in -reach_fine..=reach_fine {
                let c = t.with(t.scale * ds, t.dx + ix as f32, t.dy + iy as f32);
                if let Some(s) = score(fine, &c, side, top.0) {
                    top = (s, c);
                }
            }
        }
    }
    top
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

    /// A near-white mug-like product (a body, a darker 2-pixel rim with a soft outer pixel the
    /// region leaves out, a handle) drawn at `(x, y)` scaled by `k`, in a 128×128 frame on `bg`.
    fn light_product(x: f32, y: f32, k: f32, bg: impl Fn(usize, usize) -> [u8; 3]) -> (Work, Mask) {
        let mut rgb = Vec::new();
        let mut on = Vec::new();
        for py in 0..128 {
            for px in 0..128 {
                let (fx, fy) = ((px as f32 + 0.5 - x) / k, (py as f32 + 0.5 - y) / k);
                // Distance outside the body (a 40×50 box) and the handle (a ring to the right).
                let body = (fx.abs() - 20.0).max(fy.abs() - 25.0);
                let handle = ((fx - 22.0).hypot(fy) - 11.0).abs() - 3.0;
                let d = if fx > 20.0 { body.min(handle) } else { body };
                let c = if d <= -2.0 {
                    // A faint shading across the body, as a glaze shows.
                    let v = (246.0 - (fx + 20.0) * 0.2) as u8;
                    [v, v, v.saturating_sub(6)]
                } else if d <= 0.0 {
                    [170, 170, 166]
                } else if d <= 1.0 {
                    [214, 214, 211]
                } else {
                    bg(px, py)
                };
                rgb.extend_from_slice(&c);
                on.push(d <= 0.0);
            }
        }
        (Work::from_rgb(128, 128, rgb), Mask { w: 128, h: 128, on })
    }

    /// Light marble: near-white with soft grey clouds as dark as the product's rim.
    fn marble(x: usize, y: usize) -> [u8; 3] {
        let (fx, fy) = (x as f32, y as f32);
        let cloud = ((fx * 0.21).sin() * (fy * 0.17).cos() + (fx * 0.05 + fy * 0.09).sin()) * 0.5;
        let v = (232.0 - 70.0 * cloud.max(0.0)) as u8;
        [v, v, v.saturating_add(3)]
    }

    #[test]
    fn a_light_product_with_a_soft_rim_on_light_marble_is_found_where_it_is() {
        let (input, mask) = light_product(56.0, 64.0, 1.0, |_, _| [255, 255, 255]);
        let (cx, cy) = mask.centroid().unwrap();
        let start = Transform::identity(cx, cy, 0.0, 0.0);

        let (same, _) = light_product(56.0, 64.0, 1.0, marble);
        let found = locate(&input, &mask, &same, start, 0.3).unwrap();
        assert_eq!(found.transform, start, "{found:?}");
        assert!(found.agreement > 0.95, "{found:?}");

        let (moved, _) = light_product(70.0, 56.0, 1.0, marble);
        let found = locate(&input, &mask, &moved, start, 0.3).unwrap();
        let t = found.transform;
        // Moved by 13 % of the frame: placed well away from where it was (the gate holds a
        // product moved by more than 5 %).
        assert!(t.dx.hypot(t.dy) / 128.0 > 0.08, "{found:?}");

        let (grown, _) = light_product(56.0, 64.0, 1.3, marble);
        let found = locate(&input, &mask, &grown, start, 0.3).unwrap();
        assert!((found.transform.scale - 1.3).abs() < 0.06, "{found:?}");
    }

    #[test]
    fn transforms_invert() {
        let t = Transform { scale: 1.3, dx: 4.0, dy: -2.0, cx: 10.0, cy: 20.0, ox: 3.0, oy: 0.0 };
        let (x, y) = t.apply(7.0, 9.0);
        let (bx, by) = t.invert(x, y);
        assert!((bx - 7.0).abs() < 1e-4 && (by - 9.0).abs() < 1e-4);
    }
}
