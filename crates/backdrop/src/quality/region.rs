//! Where the product is: a [`Mask`] of it in an input (from the alpha channel when there is one,
//! otherwise everything not connected to the border through background-coloured pixels), and
//! the foreground of an output (whatever its new background does not reach).

use super::work::{Work, delta_e};

/// A pixel mask over a working frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mask {
    pub(crate) w: usize,
    pub(crate) h: usize,
    pub(crate) on: Vec<bool>,
}

/// A box of pixels, `x0..x1` × `y0..y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BBox {
    pub(crate) x0: usize,
    pub(crate) y0: usize,
    pub(crate) x1: usize,
    pub(crate) y1: usize,
}

impl BBox {
    pub(crate) fn width(&self) -> usize {
        self.x1 - self.x0
    }

    pub(crate) fn height(&self) -> usize {
        self.y1 - self.y0
    }
}

impl Mask {
    pub(crate) fn new(w: usize, h: usize) -> Self {
        Self { w, h, on: vec![false; w * h] }
    }

    pub(crate) fn get(&self, x: usize, y: usize) -> bool {
        self.on[y * self.w + x]
    }

    pub(crate) fn area(&self) -> usize {
        self.on.iter().filter(|&&b| b).count()
    }

    pub(crate) fn bbox(&self) -> Option<BBox> {
        let mut b: Option<BBox> = None;
        for y in 0..self.h {
            for x in 0..self.w {
                if self.get(x, y) {
                    let e = b.get_or_insert(BBox { x0: x, y0: y, x1: x + 1, y1: y + 1 });
                    e.x0 = e.x0.min(x);
                    e.y0 = e.y0.min(y);
                    e.x1 = e.x1.max(x + 1);
                    e.y1 = e.y1.max(y + 1);
                }
            }
        }
        b
    }

    /// The centre of mass, in pixel-centre coordinates.
    pub(crate) fn centroid(&self) -> Option<(f32, f32)> {
        let (mut sx, mut sy, mut n) = (0.0f64, 0.0f64, 0u64);
        for y in 0..self.h {
            for x in 0..self.w {
                if self.get(x, y) {
                    sx += x as f64 + 0.5;
                    sy += y as f64 + 0.5;
                    n += 1;
                }
            }
        }
        (n > 0).then(|| ((sx / n as f64) as f32, (sy / n as f64) as f32))
    }

    // Hand-written morphology and labelling: imageproc has both, but it is the only user of
    // nalgebra and its numeric stack here, about half a minute of CPU on every clean build
    // (CI builds twice, for clippy and for the tests) for three functions of a few lines each
    // on a boolean mask. Same semantics as imageproc's `erode`/`dilate` with `Norm::LInf`:
    // a square window, and pixels outside the frame count neither as product nor background.

    /// Shrunk by `k` pixels (a square structuring element).
    pub(crate) fn eroded(&self, k: u8) -> Self {
        self.square_window(usize::from(k), |on, len| on == len)
    }

    /// Grown by `k` pixels.
    pub(crate) fn dilated(&self, k: u8) -> Self {
        self.square_window(usize::from(k), |on, _| on > 0)
    }

    /// Eroded then dilated by `k`: specks and threads thinner than `2k + 1` pixels go.
    pub(crate) fn opened(&self, k: u8) -> Self {
        self.eroded(k).dilated(k)
    }

    /// Each pixel becomes `rule(on, len)` over the `(2k + 1)²` window around it, clipped to the
    /// frame: `on` of the window's `len` pixels are set. A square window is separable, so this is
    /// one pass along the rows and one down the columns, each with a running count.
    fn square_window(&self, k: usize, rule: impl Fn(usize, usize) -> bool) -> Self {
        let (w, h) = (self.w, self.h);
        let pass = |get: &dyn Fn(usize, usize) -> bool, lines: usize, len: usize| -> Vec<bool> {
            // out[line * len + i]: the rule over positions i-k..=i+k of that line.
            let mut out = vec![false; lines * len];
            let mut prefix = vec![0usize; len + 1];
            for line in 0..lines {
                for i in 0..len {
                    prefix[i + 1] = prefix[i] + usize::from(get(line, i));
                }
                for i in 0..len {
                    let (lo, hi) = (i.saturating_sub(k), (i + k + 1).min(len));
                    out[line * len + i] = rule(prefix[hi] - prefix[lo], hi - lo);
                }
            }
            out
        };
        let rows = pass(&|y, x| self.on[y * w + x], h, w);
        let cols = pass(&|x, y| rows[y * w + x], w, h);
        let mut out = Self::new(w, h);
        for x in 0..w {
            for y in 0..h {
                out.on[y * w + x] = cols[x * h + y];
            }
        }
        out
    }

    /// Keeps the 8-connected components `keep(component)` accepts; `component` lists the
    /// component's pixel indexes.
    pub(crate) fn components_where(&self, mut keep: impl FnMut(&[usize]) -> bool) -> Self {
        let (w, h) = (self.w, self.h);
        let mut seen = vec![false; w * h];
        let mut out = Self::new(w, h);
        let mut component = Vec::new();
        let mut stack = Vec::new();
        for start in 0..w * h {
            if !self.on[start] || seen[start] {
                continue;
            }
            component.clear();
            seen[start] = true;
            stack.push(start);
            while let Some(i) = stack.pop() {
                component.push(i);
                let (x, y) = (i % w, i / w);
                for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                    for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                        let j = ny * w + nx;
                        if self.on[j] && !seen[j] {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
            if keep(&component) {
                for &i in &component {
                    out.on[i] = true;
                }
            }
        }
        out
    }

    /// Drops components smaller than `min_area` pixels.
    pub(crate) fn without_specks(&self, min_area: usize) -> Self {
        self.components_where(|c| c.len() >= min_area)
    }
}

/// How the border's colours set the flood fill's tolerance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tolerance {
    /// Multiplies the spread of the border's colours (its 90th percentile distance from their median).
    pub(crate) spread_factor: f32,
    /// The least tolerance, in ΔE (compression noise on a flat background).
    pub(crate) min: f32,
    /// The most.
    pub(crate) max: f32,
}

/// The tolerance for an input: a studio background is flat, so stay tight.
pub(crate) const INPUT: Tolerance = Tolerance { spread_factor: 2.5, min: 6.0, max: 30.0 };
/// The tolerance for an output: its new background may be marble, wood or cloth.
pub(crate) const OUTPUT: Tolerance = Tolerance { spread_factor: 1.6, min: 6.0, max: 45.0 };

/// Steps between neighbours below this ΔE follow a smooth gradient (a vignette, a sweep).
const GRADIENT_STEP: f32 = 2.5;

/// The background connected to the border, and how uniform the border was.
#[derive(Debug, Clone)]
pub(crate) struct Background {
    /// True on background pixels.
    pub(crate) mask: Mask,
    /// The median distance of border pixels from their median colour (ΔE).
    pub(crate) spread: f32,
}

fn percentile(values: &mut [f32], q: f32) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let k = ((values.len() - 1) as f32 * q).round() as usize;
    *values.select_nth_unstable_by(k, f32::total_cmp).1
}

/// Flood fills from the border over near-background colours. A pixel joins when it is within
/// the tolerance of the border's median colour, or follows a gentle gradient from a joined
/// neighbour without straying far from that median.
///
/// Hand-written: imageproc's flood fill matches one exact colour, and this needs a tolerance
/// measured from the border's own colour statistics.
pub(crate) fn border_background(work: &Work, tolerance: Tolerance) -> Background {
    let (w, h) = (work.w, work.h);
    let mut border: Vec<usize> = Vec::with_capacity(2 * (w + h));
    for x in 0..w {
        border.push(x);
        border.push((h - 1) * w + x);
    }
    for y in 1..h.saturating_sub(1) {
        border.push(y * w);
        border.push(y * w + w - 1);
    }
    let median = {
        let channel = |c: usize| {
            let mut v: Vec<f32> = border.iter().map(|&i| work.lab[i][c]).collect();
            percentile(&mut v, 0.5)
        };
        [channel(0), channel(1), channel(2)]
    };
    let mut distances: Vec<f32> = border.iter().map(|&i| delta_e(work.lab[i], median)).collect();
    let spread = percentile(&mut distances, 0.5);
    let p90 = percentile(&mut distances, 0.9);
    let limit = (p90 * tolerance.spread_factor + 2.0).clamp(tolerance.min, tolerance.max);
    let mut mask = Mask::new(w, h);
    let mut stack: Vec<usize> = Vec::new();
    for &i in &border {
        if !mask.on[i] && delta_e(work.lab[i], median) <= limit {
            mask.on[i] = true;
            stack.push(i);
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = (i % w, i / w);
        let here = work.lab[i];
        let mut visit = |j: usize| {
            if mask.on[j] {
                return;
            }
            let d = delta_e(work.lab[j], median);
            if d <= limit || (d <= 2.0 * limit && delta_e(work.lab[j], here) <= GRADIENT_STEP) {
                mask.on[j] = true;
                stack.push(j);
            }
        };
        if x > 0 {
            visit(i - 1);
        }
        if x + 1 < w {
            visit(i + 1);
        }
        if y > 0 {
            visit(i - w);
        }
        if y + 1 < h {
            visit(i + w);
        }
    }
    Background { mask, spread }
}

/// Where an input's product comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Alpha,
    Border,
}

/// The product in an input, or why none could be told apart.
pub(crate) fn input_product(work: &Work) -> Result<(Mask, Source), String> {
    let frame = work.w * work.h;
    let min_area = (frame / 2000).max(3);
    if let Some(alpha) = &work.alpha {
        let opaque = alpha.iter().filter(|&&a| a >= 128).count();
        // A fully opaque (or fully clear) alpha channel says nothing about the product.
        if opaque * 200 >= frame && opaque * 200 <= frame * 199 {
            let mask = Mask { w: work.w, h: work.h, on: alpha.iter().map(|&a| a >= 128).collect() };
            return Ok((mask.without_specks(min_area), Source::Alpha));
        }
    }
    let background = border_background(work, INPUT);
    if background.spread > 12.0 {
        return Err(format!(
            "the input's border is not a plain background (its colours spread by ΔE {:.0}), so the product cannot be told apart",
            background.spread
        ));
    }
    let product = Mask { w: work.w, h: work.h, on: background.mask.on.iter().map(|b| !b).collect() };
    let product = product.without_specks(min_area);
    let area = product.area();
    if area * 500 < frame {
        return Err("nothing in the input stands out from its background".into());
    }
    if area * 100 > frame * 97 {
        return Err("the input has no background around the product".into());
    }
    Ok((product, Source::Border))
}

/// What in an output its background does not reach: the product and anything new that stands
/// out (cleaned of texture specks).
pub(crate) fn output_foreground(work: &Work) -> Mask {
    let background = border_background(work, OUTPUT);
    let fg = Mask { w: work.w, h: work.h, on: background.mask.on.iter().map(|b| !b).collect() };
    fg.opened(1).without_specks((work.w * work.h / 1000).max(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc_on(bg: [u8; 3], fg: [u8; 3], noise: u8) -> Work {
        let (w, h) = (64usize, 48usize);
        let mut rgb = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f32 - 32.0, y as f32 - 24.0);
                let jitter = ((x * 7 + y * 13) % (usize::from(noise) + 1)) as u8;
                let c = if dx * dx + dy * dy < 100.0 { fg } else { bg.map(|c| c.saturating_sub(jitter)) };
                rgb.extend_from_slice(&c);
            }
        }
        Work::from_rgb(w, h, rgb)
    }

    #[test]
    fn the_product_is_what_the_border_does_not_reach() {
        let work = disc_on([255, 255, 255], [200, 30, 40], 3);
        let (mask, source) = input_product(&work).unwrap();
        assert_eq!(source, Source::Border);
        let area = mask.area();
        assert!((290..340).contains(&area), "a disc of radius 10 has ~314 pixels, got {area}");
        let (cx, cy) = mask.centroid().unwrap();
        assert!((cx - 32.0).abs() < 1.0 && (cy - 24.0).abs() < 1.0);
    }

    #[test]
    fn a_busy_border_has_no_product_region() {
        let rgb: Vec<u8> =
            (0..64 * 48).flat_map(|i| [(i * 37 % 256) as u8, (i * 91 % 256) as u8, 128]).collect();
        let err = input_product(&Work::from_rgb(64, 48, rgb)).unwrap_err();
        assert!(err.contains("not a plain background"), "{err}");
    }

    #[test]
    fn alpha_gives_the_region_directly() {
        let mut work = disc_on([255, 255, 255], [255, 255, 255], 0);
        work.alpha = Some((0..64 * 48).map(|i| if i % 64 < 16 { 255 } else { 0 }).collect());
        let (mask, source) = input_product(&work).unwrap();
        assert_eq!((source, mask.area()), (Source::Alpha, 16 * 48));
    }

    #[test]
    fn output_foreground_ignores_a_textured_background() {
        let work = disc_on([170, 120, 80], [30, 90, 200], 24);
        let fg = output_foreground(&work);
        let area = fg.area();
        assert!((250..360).contains(&area), "{area}");
    }

    #[test]
    fn morphology_and_components() {
        let mut m = Mask::new(20, 20);
        for y in 5..15 {
            for x in 5..15 {
                m.on[y * 20 + x] = true;
            }
        }
        m.on[0] = true;
        assert_eq!(m.without_specks(2).area(), 100);
        assert_eq!(m.eroded(1).area(), 64);
        assert_eq!(m.opened(1).area(), 100);
        assert_eq!(m.bbox(), Some(BBox { x0: 0, y0: 0, x1: 15, y1: 15 }));
    }

    #[test]
    fn windows_are_clipped_to_the_frame_and_components_join_at_corners() {
        let mut m = Mask::new(20, 20);
        for y in 5..15 {
            for x in 5..15 {
                m.on[y * 20 + x] = true;
            }
        }
        m.on[0] = true;
        // 12x12 around the square, and the corner speck grown to 2x2 inside the frame.
        assert_eq!(m.dilated(1).area(), 144 + 4);
        // Outside the frame is not background: a full frame stays full.
        let full = Mask { w: 7, h: 5, on: vec![true; 35] };
        assert_eq!(full.eroded(2), full);
        // Two pixels touching at a corner are one 8-connected component.
        let mut d = Mask::new(4, 4);
        d.on[0] = true;
        d.on[5] = true;
        d.on[15] = true;
        let mut sizes = Vec::new();
        let kept = d.components_where(|c| {
            sizes.push(c.len());
            c.len() == 2
        });
        sizes.sort_unstable();
        assert_eq!((sizes, kept.area()), (vec![1, 2], 2));
    }
}
