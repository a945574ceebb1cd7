//! The product region of an input compared with the same region of an output, once the input's
//! product is warped to where the output has it: structure (SSIM on lightness, image-compare),
//! colour (chroma difference in CIELAB) and silhouette (overlap of the two product masks).
//!
//! Hand-written: the masking (only product pixels count, with a lightness gain for a change of
//! light), the per-pixel colour statistics and the silhouette overlap; no crate compares
//! regions under a mask.

use fast_image_resize::PixelType;
use image::{GrayImage, Luma};
use image_compare::Algorithm;

use super::QualityError;
use super::align::{Transform, agree};
use super::region::{BBox, Mask};
use super::work::{Work, delta_ab, lab_of, resize_crop_u8};

/// Local SSIM below this marks a window of the product as damaged.
const DAMAGED_SSIM: f32 = 0.5;
/// A chroma change above this (ΔE) marks a product pixel as recoloured.
const RECOLORED_DELTA: f32 = 12.0;

/// How the output's product compares with the input's.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Appearance {
    /// Mean SSIM over the product (1 is identical).
    pub(crate) structure: Option<f32>,
    /// Share of the product whose local SSIM is below 0.5.
    pub(crate) damaged: Option<f32>,
    /// Mean chroma difference over the product (ΔE in a*, b*).
    pub(crate) color_delta: Option<f32>,
    /// Share of the product whose chroma moved by more than 12 ΔE.
    pub(crate) recolored: Option<f32>,
    /// Intersection over union of the two silhouettes.
    pub(crate) overlap: f32,
    /// The expected product box in the output.
    pub(crate) region: BBox,
}

/// A window of the output frame, `x0..x1` × `y0..y1`, as signed bounds for clipping.
pub(crate) fn clip(x0: f32, y0: f32, x1: f32, y1: f32, w: usize, h: usize) -> Option<BBox> {
    let x0 = x0.floor().max(0.0) as usize;
    let y0 = y0.floor().max(0.0) as usize;
    let x1 = (x1.ceil().max(0.0) as usize).min(w);
    let y1 = (y1.ceil().max(0.0) as usize).min(h);
    (x0 < x1 && y0 < y1).then_some(BBox { x0, y0, x1, y1 })
}

/// The input's pixels and mask warped by `t` into `window` of the output frame; pixels the
/// input does not cover are outside the mask.
pub(crate) fn warp(
    input: &Work,
    mask: &Mask,
    t: &Transform,
    window: BBox,
) -> Result<(Vec<[f32; 3]>, Mask), QualityError> {
    let (cw, ch) = (window.width(), window.height());
    let mut lab = vec![[0.0f32; 3]; cw * ch];
    let mut warped = Mask::new(cw, ch);
    let (fx0, fy0) = t.apply(0.0, 0.0);
    let (fx1, fy1) = t.apply(input.w as f32, input.h as f32);
    let Some(valid) = clip(fx0.ceil(), fy0.ceil(), fx1.floor(), fy1.floor(), usize::MAX, usize::MAX)
        .map(|b| BBox {
            x0: b.x0.max(window.x0),
            y0: b.y0.max(window.y0),
            x1: b.x1.min(window.x1),
            y1: b.y1.min(window.y1),
        })
        .filter(|b| b.x0 < b.x1 && b.y0 < b.y1)
    else {
        return Ok((lab, warped));
    };
    let (sx0, sy0) = t.invert(valid.x0 as f32, valid.y0 as f32);
    let (sx1, sy1) = t.invert(valid.x1 as f32, valid.y1 as f32);
    let (sx0, sy0) = (f64::from(sx0).max(0.0), f64::from(sy0).max(0.0));
    let (sx1, sy1) = (f64::from(sx1).min(input.w as f64), f64::from(sy1).min(input.h as f64));
    if sx1 <= sx0 || sy1 <= sy0 {
        return Ok((lab, warped));
    }
    let crop = (sx0, sy0, sx1 - sx0, sy1 - sy0);
    let (vw, vh) = (valid.width(), valid.height());
    let rgb = resize_crop_u8(&input.rgb, input.w, input.h, crop, vw, vh, PixelType::U8x3)?;
    let gray: Vec<u8> = mask.on.iter().map(|&b| if b { 255 } else { 0 }).collect();
    let m = resize_crop_u8(&gray, mask.w, mask.h, crop, vw, vh, PixelType::U8)?;
    for y in 0..vh {
        for x in 0..vw {
            let at = (valid.y0 - window.y0 + y) * cw + (valid.x0 - window.x0 + x);
            let from = y * vw + x;
            lab[at] = lab_of([rgb[from * 3], rgb[from * 3 + 1], rgb[from * 3 + 2]]);
            warped.on[at] = m[from] >= 128;
        }
    }
    Ok((lab, warped))
}

/// Compares the input's product, placed by `t`, with the output. `foreground` is the output's
/// own foreground (see [`super::region::output_foreground`]). `None` when the product lands
/// outside the output.
pub(crate) fn compare(
    input: &Work,
    mask: &Mask,
    output: &Work,
    foreground: &Mask,
    t: &Transform,
) -> Result<Option<Appearance>, QualityError> {
    let Some(bb) = mask.bbox() else { return Ok(None) };
    let (x0, y0) = t.apply(bb.x0 as f32, bb.y0 as f32);
    let (x1, y1) = t.apply(bb.x1 as f32, bb.y1 as f32);
    // A margin around the expected box, so that product the output grew outside it counts.
    let margin = 0.15 * (x1 - x0).max(y1 - y0) + 2.0;
    let Some(window) = clip(x0 - margin, y0 - margin, x1 + margin, y1 + margin, output.w, output.h) else {
        return Ok(None);
    };
    let (cw, ch) = (window.width(), window.height());
    let (in_lab, expected) = warp(input, mask, t, window)?;
    let Some(region) = expected.bbox() else { return Ok(None) };
    let out_lab: Vec<[f32; 3]> = (0..ch)
        .flat_map(|y| (0..cw).map(move |x| (x, y)))
        .map(|(x, y)| output.at(window.x0 + x, window.y0 + y))
        .collect();

    // Product edges move by a pixel with any resampling: compare the product's inside only.
    let erosion = ((0.03 * region.width().min(region.height()) as f32).round() as u8).clamp(1, 6);
    let inside = expected.eroded(erosion);
    let n = inside.area();

    let (structure, damaged) =
        if n >= 16 { structure(&in_lab, &out_lab, &inside, cw, ch)? } else { (None, None) };

    let (color_delta, recolored) = if n >= 16 {
        let (mut sum, mut moved) = (0.0f32, 0usize);
        for i in (0..cw * ch).filter(|&i| inside.on[i]) {
            // The closest colour within a pixel: a print's edges that resampling moved by a
            // pixel are not a change of colour.
            let (x, y) = (i % cw, i / cw);
            let mut d = f32::MAX;
            for ny in y.saturating_sub(1)..(y + 2).min(ch) {
                for nx in x.saturating_sub(1)..(x + 2).min(cw) {
                    d = d.min(delta_ab(in_lab[i], out_lab[ny * cw + nx]));
                }
            }
            sum += d;
            moved += usize::from(d > RECOLORED_DELTA);
        }
        (Some(sum / n as f32), Some(moved as f32 / n as f32))
    } else {
        (None, None)
    };

    // The output's silhouette: its foreground components that touch the expected product,
    // plus the expected product's pixels whose colour the output kept (a product the colour of
    // its new background is found by colour where the foreground missed it).
    let mut fg = Mask::new(cw, ch);
    for y in 0..ch {
        for x in 0..cw {
            fg.on[y * cw + x] = foreground.get(window.x0 + x, window.y0 + y);
        }
    }
    let near = expected.dilated(2);
    let touching = fg.components_where(|c| c.iter().any(|&i| near.on[i]));
    let (mut inter, mut union) = (0usize, 0usize);
    for i in 0..cw * ch {
        let (e, f) = (expected.on[i], touching.on[i]);
        union += usize::from(e || f);
        inter += usize::from(e && (f || agree(in_lab[i], out_lab[i])));
    }
    let overlap = if union == 0 { 0.0 } else { inter as f32 / union as f32 };
    let region = BBox {
        x0: window.x0 + region.x0,
        y0: window.y0 + region.y0,
        x1: window.x0 + region.x1,
        y1: window.y0 + region.y1,
    };
    Ok(Some(Appearance { structure, damaged, color_delta, recolored, overlap, region }))
}

/// SSIM of lightness over the product: the input's lightness is scaled to the output's mean
/// (a change of light is not a change of product) and everything outside the product is set
/// to the same grey in both, so that the new background does not count.
fn structure(
    in_lab: &[[f32; 3]],
    out_lab: &[[f32; 3]],
    inside: &Mask,
    cw: usize,
    ch: usize,
) -> Result<(Option<f32>, Option<f32>), QualityError> {
    let n = inside.area() as f32;
    let mean =
        |lab: &[[f32; 3]]| (0..lab.len()).filter(|&i| inside.on[i]).map(|i| lab[i][0]).sum::<f32>() / n;
    let (mean_in, mean_out) = (mean(in_lab), mean(out_lab));
    let gain = if mean_in > 1.0 { (mean_out / mean_in).clamp(0.5, 2.0) } else { 1.0 };
    let to_u8 = |l: f32| Luma([(l * 2.55).round().clamp(0.0, 255.0) as u8]);
    let fill = to_u8(mean_out);
    let a = GrayImage::from_fn(cw as u32, ch as u32, |x, y| {
        let i = y as usize * cw + x as usize;
        if inside.on[i] { to_u8(in_lab[i][0] * gain) } else { fill }
    });
    let b = GrayImage::from_fn(cw as u32, ch as u32, |x, y| {
        let i = y as usize * cw + x as usize;
        if inside.on[i] { to_u8(out_lab[i][0]) } else { fill }
    });
    let similarity = image_compare::gray_similarity_structure(&Algorithm::MSSIMSimple, &a, &b)
        .map_err(|e| QualityError::Compare(e.to_string()))?;
    // The map holds each 8×8 window's SSIM, clamped to 0..=1 and scaled to 0..=255.
    let map = similarity.image.to_color_map().into_luma8();
    let (mut sum, mut damaged) = (0.0f32, 0usize);
    for (i, px) in map.pixels().enumerate() {
        if inside.on[i] {
            let v = f32::from(px.0[0]) / 255.0;
            sum += v;
            damaged += usize::from(v < DAMAGED_SSIM);
        }
    }
    Ok((Some(sum / n), Some(damaged as f32 / n)))
}
