//! Checks on an output alone: the requested size, not blank or nearly uniform, not cut short
//! (a flat grey or black band at the bottom, as a truncated decode shows), and the background
//! rules of a marketplace main image (a pure white border, the product's fill, the longest
//! side).
//!
//! Hand-written: these are simple statistics over the working copy; no crate states them.

use super::region::Mask;
use super::work::{Work, delta_e};

/// Pixels within this ΔE of the median colour count as "the same colour" for blankness.
const SAME_COLOR: f32 = 4.0;

/// Share of the output that differs from its median colour (0 for a blank image).
pub(crate) fn detail(work: &Work) -> f32 {
    if work.lab.is_empty() {
        return 0.0;
    }
    // The median of a sample is as good as the median of all, and much cheaper.
    let stride = (work.lab.len() / 4096).max(1);
    let median = |c: usize| {
        let mut v: Vec<f32> = work.lab.iter().step_by(stride).map(|p| p[c]).collect();
        let k = v.len() / 2;
        *v.select_nth_unstable_by(k, f32::total_cmp).1
    };
    let m = [median(0), median(1), median(2)];
    let same = work.lab.iter().filter(|&&p| delta_e(p, m) <= SAME_COLOR).count();
    1.0 - same as f32 / work.lab.len() as f32
}

fn row_mean(work: &Work, y: usize) -> [f32; 3] {
    let mut sum = [0.0f32; 3];
    for x in 0..work.w {
        let p = work.at(x, y);
        for c in 0..3 {
            sum[c] += p[c];
        }
    }
    sum.map(|s| s / work.w as f32)
}

/// True when at least 98 % of row `y` is within a few ΔE of `color`.
fn row_is(work: &Work, y: usize, color: [f32; 3]) -> bool {
    let off = (0..work.w).filter(|&x| delta_e(work.at(x, y), color) > SAME_COLOR).count();
    off * 50 <= work.w
}

/// A flat grey or black band at the bottom of `output`: its height as a share of the frame,
/// and its colour. `input` (placed at the same frame size) rules out a dark floor the input
/// already had.
pub(crate) fn cut_band(output: &Work, input: Option<&Work>) -> Option<(f32, [f32; 3])> {
    let h = output.h;
    if h < 8 {
        return None;
    }
    let color = row_mean(output, h - 1);
    let chroma = color[1].hypot(color[2]);
    // Decoders fill what they never received with black or mid grey.
    if chroma > 5.0 || color[0] > 60.0 || !row_is(output, h - 1, color) {
        return None;
    }
    let mut rows = 1;
    while rows < h && row_is(output, h - 1 - rows, color) {
        rows += 1;
    }
    if rows == h || rows * 50 < h {
        return None;
    }
    // The band must end in a hard edge, not fade into a dark scene.
    let above = row_mean(output, h - 1 - rows);
    if delta_e(above, color) < 8.0 {
        return None;
    }
    if let Some(input) = input.filter(|i| i.h == h) {
        let same = (h - rows..h).filter(|&y| row_is(input, y, color)).count();
        if same * 2 > rows {
            return None;
        }
    }
    Some((rows as f32 / h as f32, color))
}

/// Share of the outer ring (1 % of the shorter side, at least a pixel) whose every channel is
/// within `tolerance` of 255, and the ring's mean colour.
pub(crate) fn white_border(work: &Work, tolerance: u8) -> (f32, [u8; 3]) {
    let (w, h) = (work.w, work.h);
    let ring = ((w.min(h) as f32 * 0.01).round() as usize).max(1);
    let floor = 255 - u16::from(tolerance);
    let (mut white, mut total) = (0usize, 0usize);
    let mut sum = [0u64; 3];
    for y in 0..h {
        for x in 0..w {
            if x >= ring && y >= ring && x + ring < w && y + ring < h {
                continue;
            }
            let i = (y * w + x) * 3;
            let px = [work.rgb[i], work.rgb[i + 1], work.rgb[i + 2]];
            total += 1;
            white += usize::from(px.iter().all(|&c| u16::from(c) >= floor));
            for c in 0..3 {
                sum[c] += u64::from(px[c]);
            }
        }
    }
    let mean = sum.map(|s| (s / total.max(1) as u64) as u8);
    (white as f32 / total.max(1) as f32, mean)
}

/// How much of the frame the product spans: its box's larger share of the frame's width or
/// height.
pub(crate) fn fill(product: &Mask) -> f32 {
    product
        .bbox()
        .map_or(0.0, |b| (b.width() as f32 / product.w as f32).max(b.height() as f32 / product.h as f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(w: usize, h: usize, rgb: [u8; 3]) -> Work {
        Work::from_rgb(w, h, rgb.repeat(w * h))
    }

    #[test]
    fn blank_and_detailed_images() {
        assert_eq!(detail(&flat(20, 20, [240, 240, 240])), 0.0);
        let mut work = flat(20, 20, [255, 255, 255]);
        for i in 0..100 {
            work.lab[i] = [30.0, 40.0, 10.0];
        }
        assert!((detail(&work) - 0.25).abs() < 1e-6);
    }

    #[test]
    fn a_grey_band_at_the_bottom_is_cut_short() {
        let mut rgb = [200u8, 30, 30].repeat(40 * 40);
        rgb[40 * 30 * 3..].fill(128);
        let out = Work::from_rgb(40, 40, rgb);
        let (share, _) = cut_band(&out, None).unwrap();
        assert!((share - 0.25).abs() < 1e-6);
        // The input had the same floor: a dark scene, not a truncation.
        assert!(cut_band(&out, Some(&out)).is_none());
        // White floors and fully flat images are not truncations.
        assert!(cut_band(&flat(40, 40, [255, 255, 255]), None).is_none());
        assert!(cut_band(&flat(40, 40, [0, 0, 0]), None).is_none());
    }

    #[test]
    fn white_border_and_fill() {
        let (share, mean) = white_border(&flat(50, 50, [250, 251, 252]), 6);
        assert_eq!((share, mean), (1.0, [250, 251, 252]));
        assert_eq!(white_border(&flat(50, 50, [240, 236, 222]), 6).0, 0.0);
        let mut m = Mask::new(100, 50);
        for y in 10..40 {
            for x in 20..50 {
                m.on[y * 100 + x] = true;
            }
        }
        assert!((fill(&m) - 0.6).abs() < 1e-6);
    }
}
