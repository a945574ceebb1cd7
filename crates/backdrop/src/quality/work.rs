//! Working copies: an image resized (fast_image_resize, SIMD) to a small frame and converted to
//! CIELAB (palette), so that every check costs the same whatever the source's resolution, and
//! two images of different resolutions compare pixel for pixel.

use std::borrow::Cow;
use std::sync::LazyLock;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;
use palette::{FromColor, Lab, LinSrgb, Srgb};

use super::QualityError;

/// One image at working size: RGB, CIELAB and, when the source had one, its alpha channel.
#[derive(Debug, Clone)]
pub(crate) struct Work {
    pub(crate) w: usize,
    pub(crate) h: usize,
    pub(crate) rgb: Vec<u8>,
    pub(crate) lab: Vec<[f32; 3]>,
    pub(crate) alpha: Option<Vec<u8>>,
}

/// `(w, h)` scaled so the longest side is `side` (never up), each side at least 1.
pub(crate) fn fit(w: u32, h: u32, side: u32) -> (u32, u32) {
    let longest = w.max(h).max(1);
    if longest <= side {
        return (w.max(1), h.max(1));
    }
    let scale = |v: u32| ((f64::from(v) * f64::from(side) / f64::from(longest)).round() as u32).max(1);
    (scale(w), scale(h))
}

/// Box filtering averages every source pixel into the working one: the right statistics for
/// comparisons, and the cheapest convolution.
fn options() -> ResizeOptions {
    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Box))
}

fn resize_error(e: impl std::fmt::Display) -> QualityError {
    QualityError::Resize(e.to_string())
}

impl Work {
    /// Resizes `img` to `w`×`h` and converts it. 16-bit and float images are brought to 8 bits
    /// first (the checks need no more).
    pub(crate) fn new(img: &DynamicImage, w: u32, h: u32) -> Result<Self, QualityError> {
        let has_alpha = img.color().has_alpha();
        let src: Cow<'_, DynamicImage> = match img {
            DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => Cow::Borrowed(img),
            _ if has_alpha => Cow::Owned(DynamicImage::ImageRgba8(img.to_rgba8())),
            _ => Cow::Owned(DynamicImage::ImageRgb8(img.to_rgb8())),
        };
        let pixel = if has_alpha { PixelType::U8x4 } else { PixelType::U8x3 };
        let mut dst = Image::new(w, h, pixel);
        Resizer::new().resize(src.as_ref(), &mut dst, &options()).map_err(resize_error)?;
        let bytes = dst.into_vec();
        if has_alpha {
            let mut rgb = Vec::with_capacity(bytes.len() / 4 * 3);
            let mut alpha = Vec::with_capacity(bytes.len() / 4);
            for px in bytes.chunks_exact(4) {
                rgb.extend_from_slice(&px[..3]);
                alpha.push(px[3]);
            }
            let mut work = Self::from_rgb(w as usize, h as usize, rgb);
            work.alpha = Some(alpha);
            Ok(work)
        } else {
            Ok(Self::from_rgb(w as usize, h as usize, bytes))
        }
    }

    /// Wraps RGB bytes (`w * h * 3`) and computes their CIELAB values.
    pub(crate) fn from_rgb(w: usize, h: usize, rgb: Vec<u8>) -> Self {
        let lab = rgb.chunks_exact(3).map(|p| lab_of([p[0], p[1], p[2]])).collect();
        Self { w, h, rgb, lab, alpha: None }
    }

    /// The same picture at `w`×`h` (alpha dropped).
    pub(crate) fn resized(&self, w: usize, h: usize) -> Result<Self, QualityError> {
        let rgb = resize_u8(&self.rgb, self.w, self.h, w, h, PixelType::U8x3)?;
        Ok(Self::from_rgb(w, h, rgb))
    }

    /// The CIELAB value at `(x, y)`.
    pub(crate) fn at(&self, x: usize, y: usize) -> [f32; 3] {
        self.lab[y * self.w + x]
    }
}

/// Resizes a packed 8-bit buffer of `pixel` type.
pub(crate) fn resize_u8(
    src: &[u8],
    sw: usize,
    sh: usize,
    dw: usize,
    dh: usize,
    pixel: PixelType,
) -> Result<Vec<u8>, QualityError> {
    let src = Image::from_vec_u8(sw as u32, sh as u32, src.to_vec(), pixel).map_err(resize_error)?;
    let mut dst = Image::new(dw as u32, dh as u32, pixel);
    Resizer::new().resize(&src, &mut dst, &options()).map_err(resize_error)?;
    Ok(dst.into_vec())
}

/// Resizes the part of a packed 8-bit buffer inside `crop` (left, top, width, height, in
/// source pixels, fractions allowed) to `dw`×`dh`, with bilinear filtering: the warp that puts
/// an input's product where the output has it.
pub(crate) fn resize_crop_u8(
    src: &[u8],
    sw: usize,
    sh: usize,
    crop: (f64, f64, f64, f64),
    dw: usize,
    dh: usize,
    pixel: PixelType,
) -> Result<Vec<u8>, QualityError> {
    let src = Image::from_vec_u8(sw as u32, sh as u32, src.to_vec(), pixel).map_err(resize_error)?;
    let mut dst = Image::new(dw as u32, dh as u32, pixel);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(crop.0, crop.1, crop.2, crop.3);
    Resizer::new().resize(&src, &mut dst, &options).map_err(resize_error)?;
    Ok(dst.into_vec())
}

/// sRGB's decoding of each 8-bit value, computed once: the decoding (a power function) is
/// most of a conversion's cost.
static LINEAR: LazyLock<[f32; 256]> = LazyLock::new(|| {
    let mut table = [0.0; 256];
    for (v, slot) in (0..=255u8).zip(table.iter_mut()) {
        *slot = Srgb::new(v, 0, 0).into_linear::<f32>().red;
    }
    table
});

/// sRGB to CIELAB (D65).
pub(crate) fn lab_of(rgb: [u8; 3]) -> [f32; 3] {
    let table = &*LINEAR;
    let linear =
        LinSrgb::new(table[usize::from(rgb[0])], table[usize::from(rgb[1])], table[usize::from(rgb[2])]);
    let lab: Lab = Lab::from_color(linear);
    [lab.l, lab.a, lab.b]
}

/// CIE76 colour difference.
pub(crate) fn delta_e(a: [f32; 3], b: [f32; 3]) -> f32 {
    let (dl, da, db) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    (dl * dl + da * da + db * db).sqrt()
}

/// Chroma difference only (a*, b*): what a change of light barely moves and a recolour does.
pub(crate) fn delta_ab(a: [f32; 3], b: [f32; 3]) -> f32 {
    let (da, db) = (a[1] - b[1], a[2] - b[2]);
    (da * da + db * db).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_aspect_and_never_enlarges() {
        assert_eq!(fit(2048, 1024, 256), (256, 128));
        assert_eq!(fit(100, 50, 256), (100, 50));
        assert_eq!(fit(4000, 3, 256), (256, 1));
    }

    #[test]
    fn lab_of_white_and_black() {
        let white = lab_of([255, 255, 255]);
        assert!((white[0] - 100.0).abs() < 0.1 && white[1].abs() < 0.1 && white[2].abs() < 0.1, "{white:?}");
        assert!(lab_of([0, 0, 0])[0].abs() < 0.1);
        assert!(delta_e(lab_of([255, 0, 0]), lab_of([0, 0, 255])) > 100.0);
        let direct: Lab = Lab::from_color(Srgb::new(200u8, 120, 40).into_linear::<f32>());
        assert!(delta_e(lab_of([200, 120, 40]), [direct.l, direct.a, direct.b]) < 1e-3);
    }

    #[test]
    fn resizing_averages_and_keeps_alpha() {
        let img = image::RgbaImage::from_fn(64, 64, |x, _| {
            if x < 32 { image::Rgba([255, 0, 0, 255]) } else { image::Rgba([0, 0, 255, 0]) }
        });
        let work = Work::new(&DynamicImage::ImageRgba8(img), 16, 16).unwrap();
        let alpha = work.alpha.as_ref().unwrap();
        assert_eq!((work.w, work.h, alpha[0], alpha[15]), (16, 16, 255, 0));
        assert_eq!(&work.rgb[..3], &[255, 0, 0]);
    }
}
