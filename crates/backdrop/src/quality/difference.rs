//! The difference picture of a held row: the output, faded, with the input's product laid where
//! the gate found it and every product pixel coloured by how far it moved in colour; what the
//! gallery shows beside the input and the output. It reuses the gate's own region, placement and
//! warp, so the picture shows what the gate judged, at the gate's working size.

use image::{DynamicImage, Rgb, RgbImage};

use super::align::Transform;
use super::compare::{clip, warp};
use super::region::{self, BBox, Mask};
use super::work::Work;
use super::{QualityError, QualitySettings, fitted_input, frame, place};

/// A colour difference (ΔE, lightness at half weight, as the placement search counts it) drawn
/// at full heat: well past the 10 ΔE at which two colours stop agreeing.
const FULL_HEAT: f32 = 40.0;

/// A difference picture, or why none could be made.
#[derive(Debug, Clone, PartialEq)]
pub enum Difference {
    /// The picture, at the gate's working size of the output.
    Image(RgbImage),
    /// No product region could be compared (the reason says why); the output alone tells more.
    Unavailable(String),
}

/// Draws the difference of `output` from `input` over the product region, as the gate with
/// `settings` sees it:
/// - the output, faded to a light grey, as the backdrop;
/// - where the gate expected the input's product (its region, placed by the gate's search):
///   each pixel coloured from transparent (same colour) through yellow to red (ΔE 40 or more);
/// - output foreground the input's product does not account for (a product grown, moved or
///   doubled): tinted magenta;
/// - the expected product's outline in blue.
///
/// # Errors
/// [`QualityError::Resize`] when an image cannot be brought to working size.
pub fn difference_image(
    input: &DynamicImage,
    output: &DynamicImage,
    settings: &QualitySettings,
) -> Result<Difference, QualityError> {
    if input.width() == 0 || input.height() == 0 || output.width() == 0 || output.height() == 0 {
        return Ok(Difference::Unavailable("an image has no pixels".into()));
    }
    let (w, h) = frame(output.width(), output.height(), settings);
    let out = Work::new(output, w, h)?;
    let (inp, origin) = fitted_input(input, &out)?;
    let mask = match region::input_product(&inp) {
        Ok((mask, _)) => mask,
        Err(reason) => return Ok(Difference::Unavailable(reason)),
    };
    let fg = region::output_foreground(&out);
    let placed = match (place(&inp, &mask, &out, &fg, origin, settings)?, mask.centroid()) {
        (Some((Some(t), _, _)), _) => t,
        // Missing from the output: laid where the input had it, so the picture shows what is gone.
        (Some((None, _, _)), Some((cx, cy))) => Transform::identity(cx, cy, origin.0, origin.1),
        _ => return Ok(Difference::Unavailable("the input's product region is empty".into())),
    };
    Ok(Difference::Image(draw(&inp, &mask, &out, &fg, &placed)?))
}

fn draw(inp: &Work, mask: &Mask, out: &Work, fg: &Mask, t: &Transform) -> Result<RgbImage, QualityError> {
    let whole = BBox { x0: 0, y0: 0, x1: out.w, y1: out.h };
    let (lab, expected) = match clip(0.0, 0.0, out.w as f32, out.h as f32, out.w, out.h) {
        Some(window) => warp(inp, mask, t, window)?,
        None => (vec![[0.0; 3]; out.w * out.h], Mask::new(out.w, out.h)),
    };
    let mut img = RgbImage::new(out.w as u32, out.h as u32);
    for y in whole.y0..whole.y1 {
        for x in whole.x0..whole.x1 {
            let i = y * out.w + x;
            let rgb = [out.rgb[i * 3], out.rgb[i * 3 + 1], out.rgb[i * 3 + 2]];
            // Faded: the backdrop stays recognisable but never competes with the heat.
            let grey = (u16::from(rgb[0]) * 3 + u16::from(rgb[1]) * 6 + u16::from(rgb[2])) / 10;
            let base = 150.0 + f32::from(grey) * 0.4;
            let px = if expected.on[i] {
                let (a, b) = (lab[i], out.lab[i]);
                let (dl, da, db) = ((a[0] - b[0]) * 0.5, a[1] - b[1], a[2] - b[2]);
                let heat = ((dl * dl + da * da + db * db).sqrt() / FULL_HEAT).clamp(0.0, 1.0);
                blend(base, heat_color(heat), 0.25 + 0.75 * heat)
            } else if fg.on[i] {
                blend(base, [220.0, 40.0, 200.0], 0.45)
            } else {
                [base; 3]
            };
            img.put_pixel(x as u32, y as u32, Rgb(px.map(|c| c.round().clamp(0.0, 255.0) as u8)));
        }
    }
    for y in 0..out.h {
        for x in 0..out.w {
            if expected.on[y * out.w + x] && on_edge(&expected, x, y) {
                img.put_pixel(x as u32, y as u32, Rgb([30, 90, 230]));
            }
        }
    }
    Ok(img)
}

/// Green-yellow for a small difference through orange to red for a large one.
fn heat_color(heat: f32) -> [f32; 3] {
    [230.0 + 25.0 * heat, 220.0 * (1.0 - heat) + 20.0, 30.0]
}

fn blend(base: f32, color: [f32; 3], alpha: f32) -> [f32; 3] {
    color.map(|c| base * (1.0 - alpha) + c * alpha)
}

fn on_edge(mask: &Mask, x: usize, y: usize) -> bool {
    x == 0
        || y == 0
        || x + 1 == mask.w
        || y + 1 == mask.h
        || !mask.get(x - 1, y)
        || !mask.get(x + 1, y)
        || !mask.get(x, y - 1)
        || !mask.get(x, y + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A white frame with a coloured square of `side` at `(x, y)`.
    fn scene(w: u32, h: u32, x: u32, y: u32, side: u32, color: [u8; 3]) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |px, py| {
            if (x..x + side).contains(&px) && (y..y + side).contains(&py) {
                Rgb(color)
            } else {
                Rgb([255; 3])
            }
        }))
    }

    fn picture(d: Difference) -> RgbImage {
        match d {
            Difference::Image(img) => img,
            Difference::Unavailable(why) => panic!("no picture: {why}"),
        }
    }

    fn is_red(p: &Rgb<u8>) -> bool {
        p.0[0] > 200 && p.0[1] < 110 && p.0[2] < 90
    }

    #[test]
    fn a_recoloured_product_glows_red_where_the_gate_found_it() {
        let input = scene(400, 400, 120, 120, 160, [20, 60, 200]);
        let output = scene(800, 800, 240, 240, 320, [200, 40, 30]);
        let img = picture(difference_image(&input, &output, &QualitySettings::default()).unwrap());
        assert_eq!((img.width(), img.height()), (256, 256), "the gate's working size");
        // The product's middle (at 0.5 of the frame) is hot; a corner of the backdrop is grey.
        assert!(is_red(img.get_pixel(128, 128)), "{:?}", img.get_pixel(128, 128));
        let corner = img.get_pixel(5, 5).0;
        assert!(corner[0] == corner[1] && corner[1] == corner[2], "{corner:?}");
    }

    #[test]
    fn a_faithful_product_stays_cool() {
        let input = scene(400, 300, 100, 80, 120, [20, 60, 200]);
        let output = scene(800, 600, 200, 160, 240, [20, 60, 200]);
        let img = picture(difference_image(&input, &output, &QualitySettings::default()).unwrap());
        assert_eq!((img.width(), img.height()), (256, 192));
        let hot = img.pixels().filter(|p| is_red(p)).count();
        assert!(hot < 20, "{hot} hot pixels for an unchanged product");
    }

    #[test]
    fn a_missing_product_glows_where_the_input_had_it() {
        let input = scene(300, 300, 100, 100, 100, [20, 60, 200]);
        let output = DynamicImage::ImageRgb8(RgbImage::from_pixel(300, 300, Rgb([255; 3])));
        let img = picture(difference_image(&input, &output, &QualitySettings::default()).unwrap());
        assert!(is_red(img.get_pixel(150, 150)), "{:?}", img.get_pixel(150, 150));
        assert!(!is_red(img.get_pixel(20, 20)));
    }

    #[test]
    fn an_input_without_a_product_region_says_why() {
        let noise = DynamicImage::ImageRgb8(RgbImage::from_fn(200, 200, |x, y| {
            Rgb([(x * 37 % 256) as u8, (y * 91 % 256) as u8, ((x * y) % 256) as u8])
        }));
        match difference_image(&noise, &noise, &QualitySettings::default()).unwrap() {
            Difference::Unavailable(why) => assert!(!why.is_empty()),
            Difference::Image(_) => panic!("a picture without a product region"),
        }
    }
}
