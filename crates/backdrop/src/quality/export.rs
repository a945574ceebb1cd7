//! `[export.NAME]` presets: derived files made from an accepted output (crop to an aspect,
//! resize, pad onto a canvas of a colour, write jpeg, png or webp), and [`render_export`], a
//! pure function from pixels to the encoded bytes. The originals are never changed.

use std::io::Cursor;

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{DynamicImage, ImageEncoder, Rgba, RgbaImage};
use serde::{Deserialize, Serialize};

use super::QualityError;

/// JPEG quality when a preset names none.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;
/// The longest side an export may have.
pub const MAX_EXPORT_SIDE: u32 = 16_384;

/// The file format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// JPEG at a quality (no transparency: it is flattened onto the background colour).
    #[serde(alias = "jpg")]
    Jpeg,
    /// PNG (lossless).
    Png,
    /// WebP, lossless: the `image` crate's encoder has no lossy mode.
    Webp,
}

impl ExportFormat {
    /// The file extension.
    #[must_use]
    pub const fn ext(self) -> &'static str {
        match self {
            Self::Jpeg => "jpg",
            Self::Png => "png",
            Self::Webp => "webp",
        }
    }

    /// The MIME type.
    #[must_use]
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Webp => "image/webp",
        }
    }
}

/// One `[export.NAME]` table: every step is optional and they apply in this order: `crop`,
/// `resize`, `canvas`, then the file is written in `format`.
///
/// ```toml
/// [export.amazon]          # a 2000×2000 white-canvas JPEG
/// canvas = "2000x2000"
/// background = "#ffffff"
/// format = "jpeg"
/// quality = 90
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportPreset {
    /// `jpeg`, `png` or `webp`.
    pub format: ExportFormat,
    /// JPEG quality, 1-100 (default 90). Only for jpeg: png and webp are lossless.
    #[serde(default)]
    pub quality: Option<u8>,
    /// Centre-crop to this aspect, `W:H` (e.g. `4:5`).
    #[serde(default)]
    pub crop: Option<String>,
    /// Scale to fit inside `WIDTHxHEIGHT`, keeping the aspect.
    #[serde(default)]
    pub resize: Option<String>,
    /// Scale to fit inside `WIDTHxHEIGHT` and pad to exactly that size, centred.
    #[serde(default)]
    pub canvas: Option<String>,
    /// The padding and flattening colour, `#rrggbb` (default white).
    #[serde(default)]
    pub background: Option<String>,
}

/// A preset with every value parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    crop: Option<(u32, u32)>,
    resize: Option<(u32, u32)>,
    canvas: Option<(u32, u32)>,
    background: [u8; 3],
    quality: u8,
}

fn parse_pair(text: &str, sep: char, what: &str, max: u32) -> Result<(u32, u32), String> {
    let bad = || {
        format!(
            "{what} = {text:?}: expected two whole numbers like {}",
            if sep == 'x' { "\"2000x2000\"" } else { "\"4:5\"" }
        )
    };
    let (a, b) = text.trim().split_once(sep).ok_or_else(bad)?;
    let a: u32 = a.trim().parse().map_err(|_| bad())?;
    let b: u32 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b == 0 || a > max || b > max {
        return Err(format!("{what} = {text:?}: each number must be 1..={max}"));
    }
    Ok((a, b))
}

fn parse_color(text: &str) -> Result<[u8; 3], String> {
    let hex =
        text.trim().strip_prefix('#').filter(|h| h.len() == 6 && h.chars().all(|c| c.is_ascii_hexdigit()));
    let hex = hex.ok_or_else(|| format!("background = {text:?}: expected #rrggbb, e.g. \"#ffffff\""))?;
    let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string());
    Ok([byte(0)?, byte(2)?, byte(4)?])
}

impl ExportPreset {
    fn plan(&self) -> Result<Plan, String> {
        if self.quality.is_some() && self.format != ExportFormat::Jpeg {
            return Err(format!(
                "quality applies to jpeg only: {} is written lossless (the webp encoder has no lossy mode)",
                self.format.ext()
            ));
        }
        let quality = self.quality.unwrap_or(DEFAULT_JPEG_QUALITY);
        if !(1..=100).contains(&quality) {
            return Err(format!("quality = {quality} is outside 1..=100"));
        }
        Ok(Plan {
            crop: self.crop.as_deref().map(|c| parse_pair(c, ':', "crop", 1000)).transpose()?,
            resize: self
                .resize
                .as_deref()
                .map(|r| parse_pair(r, 'x', "resize", MAX_EXPORT_SIDE))
                .transpose()?,
            canvas: self
                .canvas
                .as_deref()
                .map(|c| parse_pair(c, 'x', "canvas", MAX_EXPORT_SIDE))
                .transpose()?,
            background: self.background.as_deref().map(parse_color).transpose()?.unwrap_or([255, 255, 255]),
            quality,
        })
    }

    /// Checks every value, with a message naming the bad one.
    ///
    /// # Errors
    /// What is wrong, e.g. `canvas = "2000": expected two whole numbers like "2000x2000"`.
    pub fn validate(&self) -> Result<(), String> {
        self.plan().map(|_| ())
    }
}

/// The largest size with `w`:`h`'s aspect that fits inside `(bw, bh)`.
fn fit_inside(w: u32, h: u32, bw: u32, bh: u32) -> (u32, u32) {
    let scale = (f64::from(bw) / f64::from(w)).min(f64::from(bh) / f64::from(h));
    let side = |v: u32, limit: u32| ((f64::from(v) * scale).round() as u32).clamp(1, limit);
    (side(w, bw), side(h, bh))
}

fn resize(img: &DynamicImage, w: u32, h: u32) -> Result<DynamicImage, QualityError> {
    if img.width() == w && img.height() == h {
        return Ok(img.clone());
    }
    // fast_image_resize handles 8-bit RGB(A) and grey; anything else goes through RGBA8.
    let src = match img {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => img.clone(),
        _ => DynamicImage::ImageRgba8(img.to_rgba8()),
    };
    let mut dst = DynamicImage::new(w, h, src.color());
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new().resize(&src, &mut dst, &options).map_err(|e| QualityError::Resize(e.to_string()))?;
    Ok(dst)
}

/// Centres `img` on a `(w, h)` canvas of `background` (alpha blended).
fn pad(img: &DynamicImage, w: u32, h: u32, background: [u8; 3]) -> RgbaImage {
    let [r, g, b] = background;
    let mut canvas = RgbaImage::from_pixel(w, h, Rgba([r, g, b, 255]));
    let x = i64::from(w.saturating_sub(img.width()) / 2);
    let y = i64::from(h.saturating_sub(img.height()) / 2);
    image::imageops::overlay(&mut canvas, &img.to_rgba8(), x, y);
    canvas
}

/// Renders one export of `img`.
///
/// # Errors
/// [`QualityError::Preset`] for a preset value that does not parse, [`QualityError::Resize`]
/// and [`QualityError::Encode`] for the image libraries' failures.
pub fn render_export(img: &DynamicImage, preset: &ExportPreset) -> Result<Vec<u8>, QualityError> {
    let plan = preset.plan().map_err(QualityError::Preset)?;
    let mut img = img.clone();
    if img.width() == 0 || img.height() == 0 {
        return Err(QualityError::Preset("the image has no pixels".into()));
    }
    if let Some((aw, ah)) = plan.crop {
        let (w, h) = fit_inside(aw, ah, img.width(), img.height());
        img = img.crop_imm((img.width() - w) / 2, (img.height() - h) / 2, w, h);
    }
    if let Some((bw, bh)) = plan.resize {
        let (w, h) = fit_inside(img.width(), img.height(), bw, bh);
        img = resize(&img, w, h)?;
    }
    if let Some((cw, ch)) = plan.canvas {
        let (w, h) = fit_inside(img.width(), img.height(), cw, ch);
        img = DynamicImage::ImageRgba8(pad(&resize(&img, w, h)?, cw, ch, plan.background));
    }
    let mut out = Cursor::new(Vec::new());
    let (w, h) = (img.width(), img.height());
    let encoded = match preset.format {
        ExportFormat::Jpeg => {
            // JPEG has no alpha: flatten onto the background colour.
            let flat = if img.color().has_alpha() {
                DynamicImage::ImageRgba8(pad(&img, w, h, plan.background)).to_rgb8()
            } else {
                img.to_rgb8()
            };
            JpegEncoder::new_with_quality(&mut out, plan.quality).write_image(
                flat.as_raw(),
                w,
                h,
                image::ExtendedColorType::Rgb8,
            )
        }
        ExportFormat::Png | ExportFormat::Webp => {
            let (bytes, color) = if img.color().has_alpha() {
                (img.to_rgba8().into_raw(), image::ExtendedColorType::Rgba8)
            } else {
                (img.to_rgb8().into_raw(), image::ExtendedColorType::Rgb8)
            };
            if preset.format == ExportFormat::Png {
                PngEncoder::new(&mut out).write_image(&bytes, w, h, color)
            } else {
                WebPEncoder::new_lossless(&mut out).write_image(&bytes, w, h, color)
            }
        }
    };
    encoded.map_err(|source| QualityError::Encode { format: preset.format.ext(), source })?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(toml_text: &str) -> ExportPreset {
        toml::from_str(toml_text).unwrap()
    }

    fn product() -> DynamicImage {
        DynamicImage::ImageRgb8(image::RgbImage::from_fn(300, 200, |x, _| {
            if (100..200).contains(&x) { image::Rgb([200, 20, 20]) } else { image::Rgb([250, 250, 250]) }
        }))
    }

    #[test]
    fn a_white_canvas_jpeg() {
        let p = preset("canvas = \"500x500\"\nbackground = \"#ffffff\"\nformat = \"jpeg\"\nquality = 85\n");
        let bytes = render_export(&product(), &p).unwrap();
        assert_eq!(&bytes[..3], &[0xff, 0xd8, 0xff]);
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (500, 500));
        // Scaled to 500 wide, so 333 tall and padded with white above and below.
        assert!(img.get_pixel(250, 10).0.iter().all(|&c| c > 245), "{:?}", img.get_pixel(250, 10));
        let red = img.get_pixel(250, 250).0;
        assert!(red[0] > 170 && red[1] < 60, "{red:?}");
    }

    #[test]
    fn crop_then_resize_to_png_and_webp() {
        let p = preset("crop = \"1:1\"\nresize = \"100x100\"\nformat = \"png\"\n");
        let img = image::load_from_memory(&render_export(&product(), &p).unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (100, 100));
        // The centre crop keeps the red middle third: most of the square is red.
        assert!(img.to_rgb8().get_pixel(50, 50).0[0] > 150);
        let p = preset("resize = \"150x150\"\nformat = \"webp\"\n");
        let bytes = render_export(&product(), &p).unwrap();
        assert_eq!(&bytes[8..12], b"WEBP");
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (150, 100));
    }

    #[test]
    fn bad_presets_are_named() {
        assert!(toml::from_str::<ExportPreset>("format = \"gif\"").is_err());
        assert!(toml::from_str::<ExportPreset>("format = \"png\"\nsize = \"1x1\"").is_err());
        let err = preset("format = \"webp\"\nquality = 80").validate().unwrap_err();
        assert!(err.contains("lossless"), "{err}");
        assert!(preset("format = \"jpeg\"\ncanvas = \"2000\"").validate().unwrap_err().contains("canvas"));
        assert!(
            preset("format = \"jpeg\"\nbackground = \"white\"").validate().unwrap_err().contains("#rrggbb")
        );
        assert!(preset("format = \"jpg\"\nquality = 0").validate().unwrap_err().contains("1..=100"));
        assert!(preset("format = \"jpeg\"\ncrop = \"4:5\"\nresize = \"800x1000\"").validate().is_ok());
    }
}
