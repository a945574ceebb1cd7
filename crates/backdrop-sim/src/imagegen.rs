//! The simulator's pictures: procedural "product on white" inputs (a labelled product with a
//! logo), edits that swap the near-white background for a texture picked from the prompt
//! (marble, wood, linen, studio, pure white), edits altered on purpose ([`Alteration`]) or
//! varied as a real model's are ([`Jitter`]), and text-to-image renders. Everything is
//! deterministic and encoded as real PNG/JPEG.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, Rgb, RgbImage};
use sha2::{Digest, Sha256};

/// Output file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `image/png`.
    Png,
    /// `image/jpeg`.
    Jpeg,
}

impl Format {
    /// The MIME type.
    #[must_use]
    pub const fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
        }
    }

    /// The file extension.
    #[must_use]
    pub const fn ext(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
        }
    }
}

/// The background an edit paints, picked from the prompt's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Texture {
    /// White stone with grey veins.
    Marble,
    /// Brown grain.
    Wood,
    /// Beige woven cloth.
    Linen,
    /// A soft grey studio sweep.
    Studio,
    /// A pastel gradient whose hue comes from the prompt.
    Pastel(u32),
    /// Pure white (255, 255, 255): a marketplace main image.
    White,
    /// No change: the input as it is (how the simulator serves its own input pictures).
    Original,
}

impl Texture {
    /// Picks the texture a prompt asks for.
    #[must_use]
    pub fn for_prompt(prompt: &str) -> Self {
        let p = prompt.to_ascii_lowercase();
        if p.contains("pure white") {
            Self::White
        } else if p.contains("marble") || p.contains("stone") || p.contains("granite") {
            Self::Marble
        } else if p.contains("wood") || p.contains("oak") || p.contains("walnut") || p.contains("table") {
            Self::Wood
        } else if p.contains("linen") || p.contains("cloth") || p.contains("fabric") || p.contains("cotton") {
            Self::Linen
        } else if p.contains("studio") || p.contains("white") || p.contains("seamless") {
            Self::Studio
        } else {
            Self::Pastel(hash32(p.as_bytes()))
        }
    }
}

/// Where an edit's primary image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// The simulator's own `/__sim/input/{name}.png`, at this size.
    Named {
        /// The name the picture is derived from.
        name: String,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// A `data:` URI's decoded bytes, identified by their sha256.
    Data {
        /// Hex sha256 of the bytes.
        sha256: String,
        /// The encoded image.
        bytes: DataBytes,
    },
    /// Any other URL: a placeholder product derived from the URL text.
    Url(String),
    /// Nothing: text-to-image.
    Prompt,
}

/// A data URI's bytes. Equality and hashing are left to the sha256 beside them, so a cache
/// lookup never hashes megabytes.
#[derive(Debug, Clone)]
pub struct DataBytes(pub std::sync::Arc<[u8]>);

impl PartialEq for DataBytes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for DataBytes {}

impl std::hash::Hash for DataBytes {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl From<Vec<u8>> for DataBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes.into())
    }
}

/// Everything that determines an output's bytes; equal keys share one cached encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageKey {
    /// The input.
    pub source: Source,
    /// The background.
    pub texture: Texture,
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// File format.
    pub format: Format,
    /// Which of the request's outputs (each differs a little).
    pub variant: u32,
    /// What the edit changed besides the background ([`Alteration::None`] when faithful).
    pub alteration: Alteration,
    /// How a faithful edit varies from its input.
    pub jitter: Jitter,
}

/// A way an edit comes back unfaithful to its input, with its drawn parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Alteration {
    /// Faithful: only the background changed.
    #[default]
    None,
    /// The product moved, in thousandths of the frame's width and height.
    Moved {
        /// Rightwards.
        dx: i16,
        /// Downwards.
        dy: i16,
    },
    /// The product was scaled about its centre.
    Scaled {
        /// New size, in percent of the old.
        percent: u16,
    },
    /// The product's hue was turned.
    Recolored {
        /// Degrees of hue rotation.
        degrees: u16,
    },
    /// The product has another silhouette.
    Reshaped {
        /// How many shapes further along (1 or 2 of 3).
        step: u8,
    },
    /// The product lost its label and logo.
    Unlabeled,
    /// The product is gone.
    Missing,
    /// The white background came back off-white.
    OffWhite {
        /// The background colour.
        rgb: [u8; 3],
    },
    /// The whole output is one flat grey.
    Blank {
        /// The grey level.
        grey: u8,
    },
    /// The bottom of the output is a flat grey or black band.
    CutShort {
        /// The band's height, in thousandths of the frame.
        permille: u16,
        /// The band's grey level.
        grey: u8,
    },
}

impl Alteration {
    /// The kind's name, as `/__sim/alterations` lists it.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Moved { .. } => "moved",
            Self::Scaled { .. } => "scaled",
            Self::Recolored { .. } => "recolored",
            Self::Reshaped { .. } => "reshaped",
            Self::Unlabeled => "unlabeled",
            Self::Missing => "missing",
            Self::OffWhite { .. } => "off_white",
            Self::Blank { .. } => "blank",
            Self::CutShort { .. } => "cut_short",
        }
    }
}

/// The natural variation of a faithful edit: a small shift and a change of light.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Jitter {
    /// Rightwards shift, in thousandths of the frame's width.
    pub dx: i16,
    /// Downwards shift, in thousandths of the frame's height.
    pub dy: i16,
    /// Brightness of the product, in percent.
    pub gain: u16,
}

impl Default for Jitter {
    fn default() -> Self {
        Self { dx: 0, dy: 0, gain: 100 }
    }
}

/// Scales `(w, h)` down so neither side exceeds `max_side`, keeping the aspect ratio.
#[must_use]
pub fn fit(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let (w, h) = (width.max(1), height.max(1));
    let longest = w.max(h);
    if longest <= max_side {
        return (w, h);
    }
    let scale = |v: u32| (u64::from(v) * u64::from(max_side) / u64::from(longest)).max(1);
    (u32::try_from(scale(w)).unwrap_or(max_side), u32::try_from(scale(h)).unwrap_or(max_side))
}

/// The pixel size of an encoded image, read from its header only.
#[must_use]
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().ok()?.into_dimensions().ok()
}

/// Renders and encodes one output. CPU-bound: call it from a blocking thread.
///
/// # Errors
/// The encoder's error (only on an impossible size).
pub fn render(key: &ImageKey) -> Result<Vec<u8>, image::ImageError> {
    let (w, h) = (key.width, key.height);
    let seed = match key.texture {
        Texture::Pastel(s) => s,
        _ => 0,
    } ^ key.variant.wrapping_mul(0x9e37_79b9);
    let picture = match &key.source {
        Source::Prompt => {
            let mut img = RgbImage::from_fn(w, h, |x, y| texture_pixel(key.texture, x, y, seed));
            draw_product(
                &mut img,
                hash32(format!("{:?}{}", key.texture, key.variant).as_bytes()),
                Look::AS_IS,
            );
            img
        }
        source if key.texture == Texture::Original => input_picture(source, w, h, Look::AS_IS),
        source => edit_picture(source, key, seed),
    };
    encode(&picture, key.format)
}

/// The primary input as pixels at the output size; `look` changes how a procedural product is
/// drawn (uploaded pictures are taken as they are).
fn input_picture(source: &Source, w: u32, h: u32, look: Look) -> RgbImage {
    match source {
        Source::Named { name, .. } => product_on_white_with(name, w, h, look),
        Source::Url(url) => product_on_white_with(url, w, h, look),
        Source::Data { bytes, sha256 } => match image::load_from_memory(&bytes.0) {
            Ok(img) => fit_on_white(&img.to_rgb8(), w, h),
            // The submit checked the magic bytes; a corrupt body still gets a picture.
            Err(_) => product_on_white_with(sha256, w, h, look),
        },
        Source::Prompt => product_on_white_with("", w, h, look),
    }
}

/// A photo scaled to fit inside `w`×`h` with its aspect kept, centred on white: a model keeps
/// the product's proportions whatever output size it is asked for, and the padding is more of
/// the photo's own white background.
fn fit_on_white(photo: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (pw, ph) = (u64::from(photo.width().max(1)), u64::from(photo.height().max(1)));
    let (w64, h64) = (u64::from(w), u64::from(h));
    // The side that binds fills the frame; the other is scaled by the same factor (rounded).
    let (fw, fh) = if w64 * ph <= h64 * pw {
        (w64, ((ph * w64 + pw / 2) / pw).clamp(1, h64.max(1)))
    } else {
        (((pw * h64 + ph / 2) / ph).clamp(1, w64.max(1)), h64)
    };
    let (fw, fh) = (u32::try_from(fw).unwrap_or(w), u32::try_from(fh).unwrap_or(h));
    let scaled = image::imageops::resize(photo, fw, fh, image::imageops::FilterType::Triangle);
    let mut canvas = RgbImage::from_pixel(w.max(1), h.max(1), Rgb([255, 255, 255]));
    image::imageops::overlay(&mut canvas, &scaled, i64::from((w - fw) / 2), i64::from((h - fh) / 2));
    canvas
}

/// Channels above this are white enough to be the background an edit replaces.
const NEAR_WHITE: u8 = 235;

/// A step between neighbours larger than this (in any channel) is an edge the background fill
/// does not cross: a product's outline, however light the product is inside it.
const EDGE_STEP: u8 = 12;

fn is_near_white(px: &Rgb<u8>) -> bool {
    px.0.iter().all(|&c| c > NEAR_WHITE)
}

/// Channels above this are light enough to be a soft shadow on the background, which the fill
/// follows as long as it fades gently ([`GENTLE_STEP`]): a model redraws the shadows on the new
/// surface rather than keeping the old one.
const LIGHT: u8 = 215;

/// The largest step between neighbours in a soft shadow's gradient.
const GENTLE_STEP: u8 = 6;

/// The background an edit replaces: the near-white pixels connected to the image's border
/// through near-white neighbours without crossing an edge, and the soft shadows that fade into
/// it. A white product (a mug, a sneaker, a glass) is near-white too, but its outline separates
/// it from the background, and white inside it (a watch face, a highlight) is not reached.
/// Row-major, `true` on background.
///
/// Hand-written: imageproc's flood fill matches one exact colour, and this needs a tolerance
/// and an edge stop; the simulator depends on no backdrop crate, so it has its own.
fn border_background(img: &RgbImage) -> Vec<bool> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut background = vec![false; w * h];
    if w == 0 || h == 0 {
        return background;
    }
    let px = |i: usize| img.get_pixel((i % w) as u32, (i / w) as u32);
    let mut stack: Vec<usize> = Vec::new();
    let border = (0..w).flat_map(|x| [x, (h - 1) * w + x]).chain((0..h).flat_map(|y| [y * w, y * w + w - 1]));
    for i in border {
        if !background[i] && is_near_white(px(i)) {
            background[i] = true;
            stack.push(i);
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = (i % w, i / w);
        let here = px(i);
        let neighbours = [
            (x > 0).then(|| i - 1),
            (x + 1 < w).then(|| i + 1),
            (y > 0).then(|| i - w),
            (y + 1 < h).then(|| i + w),
        ];
        for j in neighbours.into_iter().flatten() {
            if background[j] {
                continue;
            }
            let there = px(j);
            let step = here.0.iter().zip(there.0).map(|(&a, b)| a.abs_diff(b)).max().unwrap_or(0);
            let light = there.0.iter().all(|&c| c > LIGHT);
            if (is_near_white(there) && step <= EDGE_STEP) || (light && step <= GENTLE_STEP) {
                background[j] = true;
                stack.push(j);
            }
        }
    }
    background
}

/// An edit: the input's product (altered or jittered as the key says) on the new background.
fn edit_picture(source: &Source, key: &ImageKey, seed: u32) -> RgbImage {
    let (w, h) = (key.width, key.height);
    let alteration = key.alteration;
    let procedural = !matches!(source, Source::Data { .. });
    let look = match alteration {
        Alteration::Reshaped { step } if procedural => Look { shape_step: u32::from(step), label: true },
        Alteration::Unlabeled if procedural => Look { shape_step: 0, label: false },
        _ => Look::AS_IS,
    };
    let mut img = input_picture(source, w, h, look);
    if !procedural {
        match alteration {
            Alteration::Reshaped { .. } => img = transform(&img, 0.0, 0.0, 0.6, 1.0),
            Alteration::Unlabeled => erase_middle_band(&mut img),
            _ => {}
        }
    }
    let (mut dx, mut dy) = (f32::from(key.jitter.dx) / 1000.0, f32::from(key.jitter.dy) / 1000.0);
    let mut scale = 1.0;
    match alteration {
        Alteration::Moved { dx: mx, dy: my } => {
            dx += f32::from(mx) / 1000.0;
            dy += f32::from(my) / 1000.0;
        }
        Alteration::Scaled { percent } => scale = f32::from(percent) / 100.0,
        _ => {}
    }
    if dx != 0.0 || dy != 0.0 || scale != 1.0 {
        img = transform(&img, dx * w as f32, dy * h as f32, scale, scale);
    }
    let gain = f32::from(key.jitter.gain) / 100.0;
    let background = border_background(&img);
    for ((x, y, px), &is_background) in img.enumerate_pixels_mut().zip(&background) {
        if is_background || alteration == Alteration::Missing {
            *px = match alteration {
                Alteration::OffWhite { rgb } => Rgb(rgb),
                _ => texture_pixel(key.texture, x, y, seed),
            };
            continue;
        }
        if let Alteration::Recolored { degrees } = alteration {
            // A photo's product may be grey (steel, glass), which no turn of hue changes: it
            // comes back tinted instead, as a steel watch turned gold would.
            *px =
                if procedural { turn_hue(*px, f32::from(degrees)) } else { recolor(*px, f32::from(degrees)) };
        }
        if gain != 1.0 {
            *px = Rgb(px.0.map(|c| (f32::from(c) * gain).round().clamp(0.0, 255.0) as u8));
        }
    }
    match alteration {
        Alteration::Blank { grey } => img = RgbImage::from_pixel(w, h, Rgb([grey, grey, grey])),
        Alteration::CutShort { permille, grey } => {
            let band = (u64::from(h) * u64::from(permille) / 1000) as u32;
            for y in h.saturating_sub(band)..h {
                for x in 0..w {
                    img.put_pixel(x, y, Rgb([grey, grey, grey]));
                }
            }
        }
        _ => {}
    }
    img
}

/// Moves by `(dx, dy)` pixels and scales by `(sx, sy)` about the centre (nearest sampling;
/// what comes in from outside is white, so it becomes background).
fn transform(img: &RgbImage, dx: f32, dy: f32, sx: f32, sy: f32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    RgbImage::from_fn(w, h, |x, y| {
        let sx_ = (x as f32 + 0.5 - cx - dx) / sx + cx;
        let sy_ = (y as f32 + 0.5 - cy - dy) / sy + cy;
        if sx_ < 0.0 || sy_ < 0.0 || sx_ >= w as f32 || sy_ >= h as f32 {
            Rgb([255, 255, 255])
        } else {
            *img.get_pixel(sx_ as u32, sy_ as u32)
        }
    })
}

/// Paints over the most detailed fifth of an uploaded product's height (its print, label,
/// buttons or stitching: where neighbouring pixels differ sharply) in one colour, the median of
/// the band, as a model that drops a product's label does. A plain product (a tote, a
/// pair of headphones) has no label in the middle; its most detailed band is what a model
/// loses instead.
fn erase_middle_band(img: &mut RgbImage) {
    /// A step between neighbours (summed over channels) sharper than any shading.
    const SHARP_STEP: u32 = 30;
    let background = border_background(img);
    let (w, h) = (img.width(), img.height());
    let product = |x: u32, y: u32| !background[y as usize * w as usize + x as usize];
    let rows: Vec<u32> = (0..h).filter(|&y| (0..w).any(|x| product(x, y))).collect();
    let (Some(&top), Some(&bottom)) = (rows.first(), rows.last()) else { return };
    let span = bottom - top;
    let band = (span / 5).max(1);
    // Each row's count of sharp steps to the next pixel right or down within the product: a
    // print's edges, not the smooth shading of a plain surface.
    let sharp = |a: &Rgb<u8>, b: &Rgb<u8>| {
        a.0.iter().zip(b.0).map(|(&p, q)| u32::from(p.abs_diff(q))).sum::<u32>() > SHARP_STEP
    };
    let detail: Vec<u64> = (0..h)
        .map(|y| {
            (0..w)
                .filter(|&x| product(x, y))
                .map(|x| {
                    let here = img.get_pixel(x, y);
                    let right = x + 1 < w && product(x + 1, y) && sharp(here, img.get_pixel(x + 1, y));
                    let down = y + 1 < h && product(x, y + 1) && sharp(here, img.get_pixel(x, y + 1));
                    u64::from(right) + u64::from(down)
                })
                .sum()
        })
        .collect();
    // The band's top, from the product's top to where the band still ends above its bottom.
    let from = (top..=bottom.saturating_sub(band))
        .max_by_key(|&y| {
            (detail[y as usize..(y + band).min(h) as usize].iter().sum::<u64>(), std::cmp::Reverse(y))
        })
        .unwrap_or(top + span * 2 / 5);
    let to = (from + band).min(h - 1);
    // One colour over the band: the median of its product pixels, the surface the print sat on.
    let mut colours: Vec<Rgb<u8>> = (from..=to)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| product(x, y))
        .map(|(x, y)| *img.get_pixel(x, y))
        .collect();
    colours.sort_by_key(|p| p.0.iter().map(|&c| u32::from(c)).sum::<u32>());
    let Some(&fill) = colours.get(colours.len() / 2) else { return };
    for y in from..=to {
        for x in 0..w {
            if product(x, y) {
                img.put_pixel(x, y, fill);
            }
        }
    }
}

/// Turns a pixel's hue by `degrees`; a nearly grey pixel is tinted with that hue instead.
fn recolor(px: Rgb<u8>, degrees: f32) -> Rgb<u8> {
    let [r, g, b] = px.0.map(|c| f32::from(c) / 255.0);
    let max = r.max(g).max(b);
    if max - r.min(g).min(b) >= 0.15 {
        return turn_hue(px, degrees);
    }
    Rgb(hsv(degrees.rem_euclid(360.0), 0.45, max))
}

/// Turns a pixel's hue by `degrees`, keeping its saturation and value.
fn turn_hue(px: Rgb<u8>, degrees: f32) -> Rgb<u8> {
    let [r, g, b] = px.0.map(|c| f32::from(c) / 255.0);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    if delta < 0.02 {
        return px;
    }
    let hue = if max == r {
        60.0 * ((g - b) / delta).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / delta + 2.0)
    } else {
        60.0 * ((r - g) / delta + 4.0)
    };
    Rgb(hsv((hue + degrees).rem_euclid(360.0), delta / max, max))
}

/// How a procedural product is drawn.
#[derive(Debug, Clone, Copy)]
struct Look {
    /// Shapes further along than the name picks (0: its own).
    shape_step: u32,
    /// With its label band and logo.
    label: bool,
}

impl Look {
    const AS_IS: Self = Self { shape_step: 0, label: true };
}

/// A deterministic "product photo on white" derived from `name`: pure white background, a
/// coloured object with a label band carrying a dark logo, and a grey floor shadow.
#[must_use]
pub fn product_on_white(name: &str, width: u32, height: u32) -> RgbImage {
    product_on_white_with(name, width, height, Look::AS_IS)
}

fn product_on_white_with(name: &str, width: u32, height: u32, look: Look) -> RgbImage {
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    draw_product(&mut img, hash32(name.as_bytes()), look);
    img
}

fn draw_product(img: &mut RgbImage, h: u32, look: Look) {
    let (w, ht) = (img.width() as f32, img.height() as f32);
    let hue = (h % 360) as f32;
    let body = hsv(hue, 0.65, 0.75);
    let band = hsv((hue + 150.0) % 360.0, 0.5, 0.95);
    let logo = hsv((hue + 300.0) % 360.0, 0.8, 0.3);
    let shape = ((h >> 9) + look.shape_step) % 3;
    let (cx, cy) = (w * 0.5, ht * 0.52);
    let (rx, ry) = (w * (0.18 + ((h >> 12) % 8) as f32 * 0.01), ht * 0.3);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
        let (dx, dy) = ((fx - cx) / rx, (fy - cy) / ry);
        let inside = match shape {
            0 => dx * dx + dy * dy <= 1.0,
            1 => dx.abs() <= 1.0 && dy.abs() <= 1.0,
            // A bottle: a body and a narrow neck.
            _ => {
                (dx.abs() <= 1.0 && (-0.4..=1.0).contains(&dy))
                    || (dx.abs() <= 0.35 && (-1.0..=1.0).contains(&dy))
            }
        };
        let shadow = {
            let (sx, sy) = ((fx - cx) / (rx * 1.3), (fy - (cy + ry * 1.05)) / (ry * 0.12));
            sx * sx + sy * sy <= 1.0
        };
        if inside {
            let shade = 1.0 - 0.25 * dx.abs();
            let on_logo = dx.abs() / 0.3 + (dy - 0.1).abs() / 0.15 <= 1.0;
            let base = match (look.label, (-0.15..0.35).contains(&dy)) {
                (true, true) if on_logo => logo,
                (true, true) => band,
                _ => body,
            };
            *px = Rgb(base.map(|c| (f32::from(c) * shade) as u8));
        } else if shadow {
            *px = Rgb([196, 196, 200]);
        }
    }
}

fn texture_pixel(texture: Texture, x: u32, y: u32, seed: u32) -> Rgb<u8> {
    let (fx, fy) = (x as f32, y as f32);
    match texture {
        Texture::Marble => {
            let n = fbm(fx / 48.0, fy / 48.0, seed);
            let v = ((fx * 0.02 + fy * 0.012 + n * 6.0).sin()).abs().powf(0.35);
            let c = 150.0 + 80.0 * v;
            Rgb([c as u8, c as u8, (c + 6.0).min(255.0) as u8])
        }
        Texture::Wood => {
            let n = fbm(fx / 64.0, fy / 16.0, seed);
            let ring = ((fy * 0.08 + n * 5.0).sin() * 0.5 + 0.5).powf(0.6);
            Rgb([(120.0 + 60.0 * ring) as u8, (72.0 + 40.0 * ring) as u8, (38.0 + 20.0 * ring) as u8])
        }
        Texture::Linen => {
            let weave = if (x / 2 + y / 2).is_multiple_of(2) { 8.0 } else { -6.0 };
            let n = fbm(fx / 6.0, fy / 6.0, seed) * 16.0;
            Rgb([(214.0 + weave + n) as u8, (200.0 + weave + n) as u8, (176.0 + weave + n) as u8])
        }
        Texture::Studio => {
            let t = fy / 512.0;
            let c = (232.0 - 30.0 * t.min(1.0)).max(180.0);
            Rgb([c as u8, c as u8, (c + 4.0) as u8])
        }
        Texture::Pastel(h) => {
            let hue = ((h % 360) as f32 + fx * 0.15 + fy * 0.05) % 360.0;
            Rgb(hsv(hue, 0.3, 0.88))
        }
        Texture::Original | Texture::White => Rgb([255, 255, 255]),
    }
}

fn hsv(h: f32, s: f32, v: f32) -> [u8; 3] {
    let c = v * s;
    let hp = h / 60.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [((r + m) * 255.0) as u8, ((g + m) * 255.0) as u8, ((b + m) * 255.0) as u8]
}

fn lattice(x: i32, y: i32, seed: u32) -> f32 {
    let mut h = (x as u32).wrapping_mul(0x27d4_eb2d) ^ (y as u32).wrapping_mul(0x1656_67b1) ^ seed;
    h ^= h >> 15;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    (h & 0xffff) as f32 / 65535.0
}

fn value_noise(x: f32, y: f32, seed: u32) -> f32 {
    let (x0, y0) = (x.floor(), y.floor());
    let (tx, ty) = (x - x0, y - y0);
    let (ix, iy) = (x0 as i32, y0 as i32);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let top = lattice(ix, iy, seed) * (1.0 - sx) + lattice(ix + 1, iy, seed) * sx;
    let bottom = lattice(ix, iy + 1, seed) * (1.0 - sx) + lattice(ix + 1, iy + 1, seed) * sx;
    top * (1.0 - sy) + bottom * sy
}

fn fbm(x: f32, y: f32, seed: u32) -> f32 {
    value_noise(x, y, seed) * 0.57
        + value_noise(x * 2.0, y * 2.0, seed ^ 1) * 0.29
        + value_noise(x * 4.0, y * 4.0, seed ^ 2) * 0.14
}

fn hash32(bytes: &[u8]) -> u32 {
    let digest = Sha256::digest(bytes);
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Encodes pixels as PNG (fast compression: the simulator must not be a benchmark's bottleneck)
/// or JPEG.
///
/// # Errors
/// The encoder's error.
pub fn encode(img: &RgbImage, format: Format) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::with_capacity((img.width() * img.height()) as usize);
    match format {
        Format::Png => PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub)
            .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)?,
        Format::Jpeg => JpegEncoder::new_with_quality(&mut out, 85).write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )?,
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source: Source, texture: Texture, format: Format) -> ImageKey {
        ImageKey {
            source,
            texture,
            width: 64,
            height: 48,
            format,
            variant: 0,
            alteration: Alteration::None,
            jitter: Jitter::default(),
        }
    }

    #[test]
    fn edits_keep_the_product_and_replace_the_white() {
        let source = Source::Named { name: "SKU-1".into(), width: 64, height: 48 };
        let bytes = render(&key(source, Texture::Wood, Format::Png)).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 48));
        // The corner was white in the input; now it is wood.
        assert!(img.get_pixel(0, 0).0.iter().any(|&c| c < 200), "{:?}", img.get_pixel(0, 0));
        let input = product_on_white("SKU-1", 64, 48);
        assert_eq!(img.get_pixel(32, 24), input.get_pixel(32, 24), "the product itself is kept");
    }

    #[test]
    fn rows_and_textures_give_different_pictures() {
        let a = render(&key(Source::Url("https://x/a.png".into()), Texture::Marble, Format::Png)).unwrap();
        let b = render(&key(Source::Url("https://x/b.png".into()), Texture::Marble, Format::Png)).unwrap();
        let c = render(&key(Source::Url("https://x/a.png".into()), Texture::Linen, Format::Png)).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            a,
            render(&key(Source::Url("https://x/a.png".into()), Texture::Marble, Format::Png)).unwrap()
        );
    }

    #[test]
    fn jpeg_and_data_inputs_work() {
        let png = encode(&product_on_white("p", 40, 30), Format::Png).unwrap();
        assert_eq!(dimensions(&png), Some((40, 30)));
        let source = Source::Data { sha256: "x".into(), bytes: png.into() };
        let jpeg = render(&key(source, Texture::Studio, Format::Jpeg)).unwrap();
        assert_eq!(&jpeg[..3], &[0xff, 0xd8, 0xff]);
        let text = render(&key(Source::Prompt, Texture::for_prompt("a sunset"), Format::Png)).unwrap();
        assert_eq!(&text[..4], b"\x89PNG");
    }

    fn altered(alteration: Alteration, texture: Texture) -> RgbImage {
        let source = Source::Named { name: "SKU-7".into(), width: 96, height: 96 };
        let key = ImageKey { width: 96, height: 96, alteration, ..key(source, texture, Format::Png) };
        let img = image::load_from_memory(&render(&key).unwrap()).unwrap().to_rgb8();
        if let Ok(dir) = std::env::var("BACKDROP_SIM_DUMP") {
            img.save(format!("{dir}/{}.png", alteration.kind())).unwrap();
        }
        img
    }

    fn differing(a: &RgbImage, b: &RgbImage) -> usize {
        a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count()
    }

    #[test]
    fn every_alteration_changes_the_edit() {
        let faithful = altered(Alteration::None, Texture::White);
        assert_eq!(faithful, product_on_white("SKU-7", 96, 96), "a white edit of a white input is the input");
        let kinds = [
            Alteration::Moved { dx: 150, dy: -50 },
            Alteration::Scaled { percent: 70 },
            Alteration::Recolored { degrees: 120 },
            Alteration::Reshaped { step: 1 },
            Alteration::Unlabeled,
            Alteration::Missing,
            Alteration::OffWhite { rgb: [240, 236, 222] },
            Alteration::Blank { grey: 230 },
            Alteration::CutShort { permille: 300, grey: 128 },
        ];
        for alteration in kinds {
            let img = altered(alteration, Texture::White);
            let changed = differing(&faithful, &img);
            assert!(changed > 96 * 96 / 50, "{}: only {changed} pixels changed", alteration.kind());
        }
        // The logo is dark: an unlabeled product has none of it.
        let dark = |img: &RgbImage| img.pixels().filter(|p| p.0.iter().all(|&c| c < 90)).count();
        assert!(dark(&faithful) > 10);
        assert_eq!(dark(&altered(Alteration::Unlabeled, Texture::White)), 0);
        assert!(altered(Alteration::Missing, Texture::White).pixels().all(|p| p.0 == [255, 255, 255]));
    }

    #[test]
    fn jitter_relights_and_shifts_the_product() {
        let source = Source::Named { name: "SKU-7".into(), width: 96, height: 96 };
        let plain =
            render(&ImageKey { width: 96, height: 96, ..key(source.clone(), Texture::White, Format::Png) })
                .unwrap();
        let jitter = Jitter { dx: 20, dy: -10, gain: 92 };
        let varied =
            render(&ImageKey { width: 96, height: 96, jitter, ..key(source, Texture::White, Format::Png) })
                .unwrap();
        assert_ne!(plain, varied);
    }

    fn decoded(key: &ImageKey) -> RgbImage {
        image::load_from_memory(&render(key).unwrap()).unwrap().to_rgb8()
    }

    fn data(img: &RgbImage) -> Source {
        Source::Data {
            sha256: format!("{:x}", Sha256::digest(img.as_raw())),
            bytes: encode(img, Format::Png).unwrap().into(),
        }
    }

    #[test]
    fn unlabeled_wipes_a_plain_photos_most_detailed_band() {
        // A plain olive box (a tote) with stitching across its top fifth and nothing in its
        // middle: the middle band holds nothing to remove, the stitching is what goes.
        let photo = RgbImage::from_fn(64, 64, |x, y| match (x, y) {
            (12..52, 12..52) if y < 20 && (x + y) % 3 == 0 => Rgb([40, 50, 20]),
            (12..52, 12..52) => Rgb([110, 120, 60]),
            _ => Rgb([255, 255, 255]),
        });
        let faithful = ImageKey { width: 64, height: 64, ..key(data(&photo), Texture::White, Format::Png) };
        let unlabeled = ImageKey { alteration: Alteration::Unlabeled, ..faithful.clone() };
        let (kept, wiped) = (decoded(&faithful), decoded(&unlabeled));
        let stitches = |img: &RgbImage| img.pixels().filter(|p| p.0[0] < 60).count();
        assert!(stitches(&kept) > 50, "the faithful edit keeps the stitching");
        assert!(
            stitches(&wiped) * 4 < stitches(&kept),
            "{} of {} stitches left",
            stitches(&wiped),
            stitches(&kept)
        );
        // The middle of the product is as it was.
        assert_eq!(wiped.get_pixel(32, 32), kept.get_pixel(32, 32));
    }

    #[test]
    fn only_the_background_connected_to_the_border_is_replaced() {
        // A white product (a mug's glaze, 246) inside its darker outline, with a whiter
        // highlight (255) in it: near-white, but not the background.
        let photo = RgbImage::from_fn(64, 64, |x, y| {
            let r = ((x as f32 - 31.5).powi(2) + (y as f32 - 31.5).powi(2)).sqrt();
            match r {
                r if r < 4.0 => Rgb([255, 255, 255]),
                r if r < 18.0 => Rgb([246, 244, 238]),
                r if r < 20.0 => Rgb([150, 148, 140]),
                _ => Rgb([255, 255, 255]),
            }
        });
        let key = ImageKey { width: 64, height: 64, ..key(data(&photo), Texture::Wood, Format::Png) };
        let img = decoded(&key);
        assert!(
            img.get_pixel(0, 0).0.iter().any(|&c| c < 200),
            "the background is wood: {:?}",
            img.get_pixel(0, 0)
        );
        for (x, y) in [(31, 31), (31, 20), (40, 31), (20, 40)] {
            assert_eq!(img.get_pixel(x, y), photo.get_pixel(x, y), "the white product is kept at ({x}, {y})");
        }
    }

    #[test]
    fn a_photo_keeps_its_aspect_in_an_output_of_another_shape() {
        // A 2:1 photo with a black square in its middle, edited into a square output.
        let photo = RgbImage::from_fn(64, 32, |x, y| {
            if (24..40).contains(&x) && (8..24).contains(&y) {
                Rgb([20, 20, 20])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let key = ImageKey { width: 64, height: 64, ..key(data(&photo), Texture::White, Format::Png) };
        let img = decoded(&key);
        let dark: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0.iter().all(|&c| c < 128))
            .map(|(x, y, _)| (x, y))
            .collect();
        let (x0, x1) = (dark.iter().map(|p| p.0).min().unwrap(), dark.iter().map(|p| p.0).max().unwrap());
        let (y0, y1) = (dark.iter().map(|p| p.1).min().unwrap(), dark.iter().map(|p| p.1).max().unwrap());
        assert_eq!((x1 - x0 + 1, y1 - y0 + 1), (16, 16), "the square stays a square, the same size");
        assert_eq!((x0 + x1 + 1, y0 + y1 + 1), (64, 64), "in the middle of the frame");
        assert!(
            img.enumerate_pixels()
                .filter(|(_, y, _)| *y < 16 || *y >= 48)
                .all(|(_, _, p)| p.0 == [255, 255, 255]),
            "the frame is padded with the photo's white background above and below"
        );
    }

    #[test]
    fn a_recoloured_grey_photo_is_tinted() {
        let photo = RgbImage::from_fn(48, 48, |x, y| {
            if (12..36).contains(&x) && (12..36).contains(&y) {
                Rgb([150, 152, 158])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let key = ImageKey {
            width: 48,
            height: 48,
            alteration: Alteration::Recolored { degrees: 40 },
            ..key(data(&photo), Texture::White, Format::Png)
        };
        let px = *decoded(&key).get_pixel(24, 24);
        let spread = px.0.iter().max().unwrap() - px.0.iter().min().unwrap();
        assert!(spread > 40, "the grey product has a colour now: {px:?}");
    }

    #[test]
    fn prompts_pick_textures_and_sizes_fit() {
        assert_eq!(Texture::for_prompt("Polished MARBLE counter"), Texture::Marble);
        assert_eq!(Texture::for_prompt("rustic oak table"), Texture::Wood);
        assert_eq!(Texture::for_prompt("on linen"), Texture::Linen);
        assert_eq!(Texture::for_prompt("studio white"), Texture::Studio);
        assert_eq!(Texture::for_prompt("on a pure white background"), Texture::White);
        assert_eq!(fit(2048, 1152, 512), (512, 288));
        assert_eq!(fit(100, 50, 512), (100, 50));
    }
}
