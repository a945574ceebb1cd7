//! The quality gate: each edited output compared with its input before the row may be `done`.
//! [`assess`] returns a [`Verdict`] (every [`Check`]'s score, pass or flag, and a reason for
//! each flag) under a template's [`QualitySettings`] (its `[quality]` table); [`export`] makes
//! the `[export]` presets' derived files. Everything here is a plain synchronous function over
//! decoded pixels, CPU-bound: callers run it off the async runtime's threads.
//!
//! How an output is judged, on working copies at most `working_side` pixels long:
//! - the product's region comes from the input: its alpha channel, or else everything the
//!   background connected to the border does not reach;
//! - the product is searched for in the output over shifts and scales (presence, position,
//!   scale), then compared where it was found (silhouette overlap, SSIM of lightness, chroma
//!   difference), so a different resolution, a change of light or a small shift still passes;
//! - the output alone must be sound (requested size, not blank, not cut short) and, when the
//!   template sets them, obey its background rules (white border, fill, longest side).

mod align;
mod compare;
mod difference;
pub mod export;
mod region;
mod sound;
mod work;

use image::{DynamicImage, GenericImageView};
use serde::{Deserialize, Serialize};

pub use difference::{Difference, difference_image};
pub use export::{ExportFormat, ExportPreset, render_export};

use align::Transform;
use region::Mask;
use work::Work;

/// Why an image could not be checked or exported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QualityError {
    /// The bytes are not an image the decoder can read.
    #[error("cannot decode the {what} image: {source}")]
    Decode {
        /// `input` or `output`.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// Resizing failed (an image too large for memory, or an unsupported pixel layout).
    #[error("cannot resize the image: {0}")]
    Resize(String),
    /// The structural comparison failed.
    #[error("cannot compare the images: {0}")]
    Compare(String),
    /// An export preset has a value that does not parse.
    #[error("export preset: {0}")]
    Preset(String),
    /// Encoding an export failed.
    #[error("cannot encode the {format} export: {source}")]
    Encode {
        /// The format's extension.
        format: &'static str,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },
}

impl QualityError {
    /// The same pixels give the same failure: never worth retrying.
    #[must_use]
    pub const fn is_retryable(&self) -> bool {
        false
    }
}

/// Decodes an encoded image (`what` names it in the error: `input` or `output`).
///
/// # Errors
/// [`QualityError::Decode`].
pub fn decode(bytes: &[u8], what: &'static str) -> Result<DynamicImage, QualityError> {
    image::load_from_memory(bytes).map_err(|source| QualityError::Decode { what, source })
}

/// Default longest side of the working copies, in pixels: large enough for a label to show,
/// small enough that a check costs a few milliseconds.
pub const DEFAULT_WORKING_SIDE: u32 = 256;

/// Which checks run (`[quality.checks]`); all on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Checks {
    /// The product is still in the output.
    pub presence: bool,
    /// It has not moved.
    pub position: bool,
    /// It has kept its size.
    pub scale: bool,
    /// It has kept its silhouette.
    pub shape: bool,
    /// It has kept its detail (label, logo, print).
    pub structure: bool,
    /// It has kept its colours.
    pub color: bool,
    /// The output has the requested size.
    pub dimensions: bool,
    /// The output is not blank or nearly uniform.
    pub blank: bool,
    /// The output is not cut short.
    pub cut_short: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            presence: true,
            position: true,
            scale: true,
            shape: true,
            structure: true,
            color: true,
            dimensions: true,
            blank: true,
            cut_short: true,
        }
    }
}

/// Background rules for marketplace main images (`[quality.background]`); each is off unless
/// set.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackgroundRules {
    /// The border must be pure white: every channel within this of 255.
    pub white_border: Option<u8>,
    /// The product must span at least this share (0-1) of the frame's width or height.
    pub min_fill: Option<f64>,
    /// The output's longest side must be at least this many pixels.
    pub min_longest_side: Option<u32>,
}

impl BackgroundRules {
    fn any(&self) -> bool {
        self.white_border.is_some() || self.min_fill.is_some() || self.min_longest_side.is_some()
    }
}

/// A template's quality settings: the `[quality]` table of its front matter. Absent, the gate
/// is on with these defaults; every key is optional.
///
/// ```toml
/// [quality]
/// max_shift = 0.05          # of the frame's longest side
/// min_structure = 0.75
/// [quality.checks]
/// color = false             # a template that recolours on purpose
/// [quality.background]      # a marketplace main image
/// white_border = 6
/// min_fill = 0.85
/// min_longest_side = 1600
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QualitySettings {
    /// The gate runs at all.
    pub enabled: bool,
    /// Longest side of the working copies, 64-1024 pixels.
    pub working_side: u32,
    /// How far to search for a moved product, as a share of the frame's longest side.
    pub search: f64,
    /// Presence: the least share of the product's pixels that must match the input somewhere.
    pub min_match: f64,
    /// Position: the most the product may move, as a share of the frame's longest side.
    pub max_shift: f64,
    /// Scale: the most the product's size may change (0.15: between 0.85× and 1.15×).
    pub max_scale_change: f64,
    /// Shape: the least overlap (intersection over union) of the two silhouettes.
    pub min_overlap: f64,
    /// Structure: the least mean SSIM over the product.
    pub min_structure: f64,
    /// Structure: the most of the product whose local SSIM may fall below 0.5.
    pub max_damaged: f64,
    /// Colour: the most mean chroma difference over the product (ΔE in a*, b*).
    pub max_color_delta: f64,
    /// Colour: the most of the product whose chroma may move by more than 12 ΔE.
    pub max_recolored: f64,
    /// Blank: the least share of the output that must differ from its median colour.
    pub min_detail: f64,
    /// Cut short: the tallest flat dark band allowed at the bottom, as a share of the height.
    pub max_cut: f64,
    /// Dimensions: the most each side may differ from the requested size, as a share.
    pub max_size_error: f64,
    /// Which checks run.
    pub checks: Checks,
    /// Marketplace background rules.
    pub background: BackgroundRules,
    /// The size the template asked for (from its `size`), set by the caller, not the table.
    #[serde(skip)]
    pub expected_size: Option<(u32, u32)>,
}

impl Default for QualitySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            working_side: DEFAULT_WORKING_SIDE,
            search: 0.35,
            min_match: 0.55,
            max_shift: 0.05,
            max_scale_change: 0.15,
            min_overlap: 0.9,
            min_structure: 0.75,
            max_damaged: 0.2,
            max_color_delta: 10.0,
            max_recolored: 0.10,
            min_detail: 0.02,
            max_cut: 0.02,
            max_size_error: 0.02,
            checks: Checks::default(),
            background: BackgroundRules::default(),
            expected_size: None,
        }
    }
}

impl QualitySettings {
    /// Checks every value's range, with a message naming the bad one.
    ///
    /// # Errors
    /// What is wrong, e.g. `quality.max_shift = 2: must be within 0..=1`.
    pub fn validate(&self) -> Result<(), String> {
        if !(64..=1024).contains(&self.working_side) {
            return Err(format!("quality.working_side = {}: must be within 64..=1024", self.working_side));
        }
        let shares = [
            ("search", self.search),
            ("min_match", self.min_match),
            ("max_shift", self.max_shift),
            ("max_scale_change", self.max_scale_change),
            ("min_overlap", self.min_overlap),
            ("min_structure", self.min_structure),
            ("max_damaged", self.max_damaged),
            ("max_recolored", self.max_recolored),
            ("min_detail", self.min_detail),
            ("max_cut", self.max_cut),
            ("max_size_error", self.max_size_error),
        ];
        for (name, v) in shares {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("quality.{name} = {v}: must be within 0..=1"));
            }
        }
        if !(0.0..=100.0).contains(&self.max_color_delta) {
            return Err(format!(
                "quality.max_color_delta = {}: must be within 0..=100",
                self.max_color_delta
            ));
        }
        if let Some(f) = self.background.min_fill
            && !(0.0..=1.0).contains(&f)
        {
            return Err(format!("quality.background.min_fill = {f}: must be within 0..=1"));
        }
        Ok(())
    }
}

/// One check of the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The product is still in the output. Score: share of its pixels that match.
    Presence,
    /// It is where it was. Score: how far it moved, as a share of the frame's longest side.
    Position,
    /// It has its size. Score: how much its size changed (0.3: 0.7× or 1.3×).
    Scale,
    /// It has its silhouette. Score: overlap of the two silhouettes (intersection over union).
    Shape,
    /// It has its detail. Score: mean SSIM of lightness over the product.
    Structure,
    /// It has its colours. Score: mean chroma difference (ΔE in a*, b*).
    Color,
    /// The output has the requested size. Score: the larger relative error of a side.
    Dimensions,
    /// The output is not blank. Score: share that differs from its median colour.
    Blank,
    /// The output is not cut short. Score: height of a flat dark band at the bottom.
    CutShort,
    /// The border is pure white. Score: share of the border within the tolerance.
    WhiteBorder,
    /// The product fills the frame. Score: its larger share of the width or height.
    Fill,
    /// The output is large enough. Score: its longest side in pixels.
    Resolution,
}

impl Check {
    /// The name reports use (`presence`, `cut_short`, ...).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Presence => "presence",
            Self::Position => "position",
            Self::Scale => "scale",
            Self::Shape => "shape",
            Self::Structure => "structure",
            Self::Color => "color",
            Self::Dimensions => "dimensions",
            Self::Blank => "blank",
            Self::CutShort => "cut_short",
            Self::WhiteBorder => "white_border",
            Self::Fill => "fill",
            Self::Resolution => "resolution",
        }
    }
}

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Within its limit.
    Pass,
    /// Outside its limit: the row needs review.
    Flag,
    /// Could not be judged (the reason says why); does not hold the row.
    Skip,
}

/// One check's score, its limit, the outcome and, for a flag or a skip, a reason a person can
/// act on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Which check.
    pub check: Check,
    /// Pass, flag or skip.
    pub outcome: Outcome,
    /// The measured value (see [`Check`] for each one's meaning).
    pub score: Option<f64>,
    /// The limit it was held to.
    pub limit: Option<f64>,
    /// Why it was flagged or skipped.
    pub reason: Option<String>,
}

/// A box as shares of its frame (0-1), for reports and galleries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rect {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

impl Rect {
    fn of(b: region::BBox, w: usize, h: usize) -> Self {
        let (w, h) = (w as f64, h as f64);
        Self {
            x: b.x0 as f64 / w,
            y: b.y0 as f64 / h,
            width: b.width() as f64 / w,
            height: b.height() as f64 / h,
        }
    }
}

/// The gate's judgement of one output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// Every check that ran, in [`Check`] order.
    pub checks: Vec<CheckResult>,
    /// The product's box in the input.
    pub input_region: Option<Rect>,
    /// The product's box in the output, where it was found.
    pub output_region: Option<Rect>,
}

impl Verdict {
    /// True when no check flagged the output.
    #[must_use]
    pub fn passed(&self) -> bool {
        !self.checks.iter().any(|c| c.outcome == Outcome::Flag)
    }

    /// The flagged checks.
    pub fn flags(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|c| c.outcome == Outcome::Flag)
    }

    /// One check's result, if it ran.
    #[must_use]
    pub fn get(&self, check: Check) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.check == check)
    }

    /// The flags' reasons, joined with `; ` (empty when it passed).
    #[must_use]
    pub fn summary(&self) -> String {
        self.flags().filter_map(|c| c.reason.as_deref()).collect::<Vec<_>>().join("; ")
    }

    fn judge(
        &mut self,
        check: Check,
        score: f64,
        limit: f64,
        flagged: bool,
        reason: impl FnOnce() -> String,
    ) {
        self.checks.push(CheckResult {
            check,
            outcome: if flagged { Outcome::Flag } else { Outcome::Pass },
            score: Some(score),
            limit: Some(limit),
            reason: flagged.then(reason),
        });
    }

    fn skip(&mut self, check: Check, reason: &str) {
        self.checks.push(CheckResult {
            check,
            outcome: Outcome::Skip,
            score: None,
            limit: None,
            reason: Some(reason.to_owned()),
        });
    }
}

fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

/// The working frame for an output of `(w, h)`.
fn frame(w: u32, h: u32, settings: &QualitySettings) -> (u32, u32) {
    work::fit(w, h, settings.working_side.clamp(64, 1024))
}

/// Judges an output on its own: soundness and background rules. This is all a text-to-image
/// output can be held to; [`assess`] adds the comparison with an input.
///
/// # Errors
/// [`QualityError::Resize`] when the image cannot be brought to working size.
pub fn assess_output(output: &DynamicImage, settings: &QualitySettings) -> Result<Verdict, QualityError> {
    let mut verdict = Verdict::default();
    let Some(out) = output_work(output, settings, &mut verdict)? else { return Ok(verdict) };
    sound_checks(&out, output.dimensions(), None, settings, &mut verdict);
    background_checks(&out, output.dimensions(), None, settings, &mut verdict);
    verdict.checks.sort_by_key(|c| c.check);
    Ok(verdict)
}

/// Judges an edited `output` against its `input`: the product is still there, in its place,
/// at its size, with its silhouette, detail and colours; the output is sound; and it obeys the
/// background rules the settings set. Checks turned off in the settings are left out.
///
/// # Errors
/// [`QualityError::Resize`] or [`QualityError::Compare`] when an image library fails on the
/// pixels (not for any picture a decoder returns).
pub fn assess(
    input: &DynamicImage,
    output: &DynamicImage,
    settings: &QualitySettings,
) -> Result<Verdict, QualityError> {
    let mut verdict = Verdict::default();
    let Some(out) = output_work(output, settings, &mut verdict)? else { return Ok(verdict) };
    let c = &settings.checks;
    let comparing = c.presence || c.position || c.scale || c.shape || c.structure || c.color;
    if input.width() == 0 || input.height() == 0 {
        sound_checks(&out, output.dimensions(), None, settings, &mut verdict);
        if comparing {
            verdict.skip(Check::Presence, "the input has no pixels");
        }
        background_checks(&out, output.dimensions(), None, settings, &mut verdict);
        verdict.checks.sort_by_key(|c| c.check);
        return Ok(verdict);
    }
    let (inp, (ox, oy)) = fitted_input(input, &out)?;
    sound_checks(&out, output.dimensions(), Some(&inp), settings, &mut verdict);
    let mut foreground = None;
    if comparing {
        let fg = region::output_foreground(&out);
        compare_checks(&inp, &out, &fg, (ox, oy), settings, &mut verdict)?;
        foreground = Some(fg);
    }
    background_checks(&out, output.dimensions(), foreground.as_ref(), settings, &mut verdict);
    verdict.checks.sort_by_key(|c| c.check);
    Ok(verdict)
}

/// The input's working copy, its frame fitted inside the output's and centred, with that
/// frame's origin in the output: when the aspects differ the output is taken to show the
/// input's scene widened (as an outpainting edit does).
fn fitted_input(input: &DynamicImage, out: &Work) -> Result<(Work, (f32, f32)), QualityError> {
    let (ow, oh) = (out.w as u32, out.h as u32);
    let scale = (f64::from(ow) / f64::from(input.width())).min(f64::from(oh) / f64::from(input.height()));
    let iw = ((f64::from(input.width()) * scale).round() as u32).clamp(1, ow);
    let ih = ((f64::from(input.height()) * scale).round() as u32).clamp(1, oh);
    let origin = (((ow - iw) / 2) as f32, ((oh - ih) / 2) as f32);
    Ok((Work::new(input, iw, ih)?, origin))
}

/// Where the input's product (`mask`) is in the output: the best placement by colour when
/// enough of it agrees, else, for a recoloured product, the output's own large foreground
/// blob. Returns the placement (`None`: missing), whether the colours matched, and the share
/// that agreed.
fn place(
    inp: &Work,
    mask: &Mask,
    out: &Work,
    fg: &Mask,
    (ox, oy): (f32, f32),
    settings: &QualitySettings,
) -> Result<Option<(Option<Transform>, bool, f64)>, QualityError> {
    let Some((cx, cy)) = mask.centroid() else { return Ok(None) };
    let start = Transform::identity(cx, cy, ox, oy);
    let located = align::locate(inp, mask, out, start, settings.search as f32)?;
    let agreement = f64::from(located.agreement);
    let matched = agreement >= settings.min_match;
    // Not found by its colours: the output's own foreground may still show it (recoloured).
    let transform = if matched {
        Some(located.transform)
    } else {
        let area = mask.area();
        let big = fg.components_where(|comp| comp.len() * 20 >= area);
        big.centroid().map(|(fx, fy)| {
            let scale = ((big.area() as f32 / area as f32).sqrt()).clamp(0.3, 3.0);
            Transform { scale, dx: fx - (ox + cx), dy: fy - (oy + cy), ..start }
        })
    };
    Ok(Some((transform, matched, agreement)))
}

/// The output's working copy, or `None` (with a blank flag) when it has no pixels.
fn output_work(
    output: &DynamicImage,
    settings: &QualitySettings,
    verdict: &mut Verdict,
) -> Result<Option<Work>, QualityError> {
    if output.width() == 0 || output.height() == 0 {
        verdict.judge(Check::Blank, 0.0, settings.min_detail, true, || "the output has no pixels".into());
        return Ok(None);
    }
    let (w, h) = frame(output.width(), output.height(), settings);
    Ok(Some(Work::new(output, w, h)?))
}

fn sound_checks(
    out: &Work,
    (width, height): (u32, u32),
    input: Option<&Work>,
    settings: &QualitySettings,
    verdict: &mut Verdict,
) {
    let c = &settings.checks;
    if c.dimensions
        && let Some((ew, eh)) = settings.expected_size
    {
        let error = |got: u32, want: u32| (f64::from(got) - f64::from(want)).abs() / f64::from(want.max(1));
        let worst = error(width, ew).max(error(height, eh));
        verdict.judge(
            Check::Dimensions,
            worst,
            settings.max_size_error,
            worst > settings.max_size_error,
            || format!("the output is {width}×{height}, the template asks for {ew}×{eh}"),
        );
    }
    if c.blank {
        let detail = f64::from(sound::detail(out));
        verdict.judge(Check::Blank, detail, settings.min_detail, detail < settings.min_detail, || {
            format!("the output is blank: {} of it is one colour", percent(1.0 - detail))
        });
    }
    if c.cut_short {
        let band = sound::cut_band(out, input);
        let share = band.map_or(0.0, |(s, _)| f64::from(s));
        verdict.judge(Check::CutShort, share, settings.max_cut, share > settings.max_cut, || {
            let dark = band.is_some_and(|(_, color)| color[0] < 20.0);
            format!(
                "the output looks cut short: its bottom {} is flat {}, as a truncated image decodes",
                percent(share),
                if dark { "black" } else { "grey" }
            )
        });
    }
}

fn background_checks(
    out: &Work,
    (width, height): (u32, u32),
    foreground: Option<&Mask>,
    settings: &QualitySettings,
    verdict: &mut Verdict,
) {
    let rules = &settings.background;
    if !rules.any() {
        return;
    }
    if let Some(tolerance) = rules.white_border {
        let (share, mean) = sound::white_border(out, tolerance);
        let share = f64::from(share);
        verdict.judge(Check::WhiteBorder, share, 0.98, share < 0.98, || {
            format!(
                "the background is not pure white: {} of the border is within {tolerance} of white (its mean is {},{},{})",
                percent(share),
                mean[0],
                mean[1],
                mean[2]
            )
        });
    }
    if let Some(min_fill) = rules.min_fill {
        let computed;
        let fg = match foreground {
            Some(fg) => fg,
            None => {
                computed = region::output_foreground(out);
                &computed
            }
        };
        let fill = f64::from(sound::fill(fg));
        verdict.judge(Check::Fill, fill, min_fill, fill < min_fill, || {
            format!(
                "the product fills {} of the frame, the template asks for {}",
                percent(fill),
                percent(min_fill)
            )
        });
    }
    if let Some(min_side) = rules.min_longest_side {
        let longest = width.max(height);
        verdict.judge(Check::Resolution, f64::from(longest), f64::from(min_side), longest < min_side, || {
            format!("the output's longest side is {longest} px, the template asks for at least {min_side}")
        });
    }
}

/// Where the product went, in words: "right and down".
fn direction(dx: f32, dy: f32, side: f32) -> String {
    let mut parts = Vec::new();
    if dx.abs() > 0.01 * side {
        parts.push(if dx > 0.0 { "right" } else { "left" });
    }
    if dy.abs() > 0.01 * side {
        parts.push(if dy > 0.0 { "down" } else { "up" });
    }
    parts.join(" and ")
}

fn compare_checks(
    inp: &Work,
    out: &Work,
    fg: &Mask,
    (ox, oy): (f32, f32),
    settings: &QualitySettings,
    verdict: &mut Verdict,
) -> Result<(), QualityError> {
    let c = &settings.checks;
    let wanted = [
        (c.presence, Check::Presence),
        (c.position, Check::Position),
        (c.scale, Check::Scale),
        (c.shape, Check::Shape),
        (c.structure, Check::Structure),
        (c.color, Check::Color),
    ];
    let skip_all = |verdict: &mut Verdict, reason: &str| {
        for (on, check) in wanted {
            if on {
                verdict.skip(check, reason);
            }
        }
    };
    let (mask, _source) = match region::input_product(inp) {
        Ok(found) => found,
        Err(reason) => {
            skip_all(verdict, &reason);
            return Ok(());
        }
    };
    if let Some(b) = mask.bbox() {
        verdict.input_region = Some(Rect::of(b, inp.w, inp.h));
    }
    let Some((transform, matched, agreement)) = place(inp, &mask, out, fg, (ox, oy), settings)? else {
        return Ok(());
    };
    let side = out.w.max(out.h) as f32;
    if c.presence {
        let mut result = CheckResult {
            check: Check::Presence,
            outcome: if transform.is_some() { Outcome::Pass } else { Outcome::Flag },
            score: Some(agreement),
            limit: Some(settings.min_match),
            reason: None,
        };
        if transform.is_none() {
            result.reason = Some(format!(
                "the product is missing: at best {} of it matches the input, and nothing else stands out from the background",
                percent(agreement)
            ));
        } else if !matched {
            result.reason = Some(format!(
                "found by its silhouette only: at best {} of it matches the input's colours",
                percent(agreement)
            ));
        }
        verdict.checks.push(result);
    }
    let Some(t) = transform else {
        for (on, check) in wanted.into_iter().skip(1) {
            if on {
                verdict.skip(check, "the product is missing");
            }
        }
        return Ok(());
    };
    if c.position {
        let shift = f64::from(t.dx.hypot(t.dy) / side);
        verdict.judge(Check::Position, shift, settings.max_shift, shift > settings.max_shift, || {
            format!("the product moved by {} of the frame ({})", percent(shift), direction(t.dx, t.dy, side))
        });
    }
    if c.scale {
        let scale = f64::from(t.scale);
        let change = (scale - 1.0).abs();
        verdict.judge(
            Check::Scale,
            change,
            settings.max_scale_change,
            change > settings.max_scale_change,
            || format!("the product is {scale:.2}× its size in the input"),
        );
    }
    let Some(look) = compare::compare(inp, &mask, out, fg, &t)? else {
        for (on, check) in wanted.into_iter().skip(3) {
            if on {
                verdict.skip(check, "the product lands outside the output");
            }
        }
        return Ok(());
    };
    verdict.output_region = Some(Rect::of(look.region, out.w, out.h));
    if c.shape {
        let overlap = f64::from(look.overlap);
        verdict.judge(Check::Shape, overlap, settings.min_overlap, overlap < settings.min_overlap, || {
            format!("the product's silhouette changed: it overlaps the input's by {}", percent(overlap))
        });
    }
    let too_small = "the product is too small to compare at this working size";
    if c.structure {
        match (look.structure, look.damaged) {
            (Some(s), Some(d)) => {
                let (s, d) = (f64::from(s), f64::from(d));
                let flagged = s < settings.min_structure || d > settings.max_damaged;
                verdict.judge(Check::Structure, s, settings.min_structure, flagged, || {
                    format!(
                        "the product's detail changed (a label, logo or print): SSIM {s:.2}, {} of it lost its structure",
                        percent(d)
                    )
                });
            }
            _ => verdict.skip(Check::Structure, too_small),
        }
    }
    if c.color {
        match (look.color_delta, look.recolored) {
            (Some(delta), Some(share)) => {
                let (delta, share) = (f64::from(delta), f64::from(share));
                let flagged = delta > settings.max_color_delta || share > settings.max_recolored;
                verdict.judge(Check::Color, delta, settings.max_color_delta, flagged, || {
                    format!(
                        "the product's colour changed: mean ΔE {delta:.0}, {} of it recoloured",
                        percent(share)
                    )
                });
            }
            _ => verdict.skip(Check::Color, too_small),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    use super::*;

    /// A product photo: a red bottle-ish box with a cream label and a dark logo, at `(cx, cy)`
    /// (shares of the frame), `scale`, on the background `bg` paints.
    struct Scene {
        cx: f32,
        cy: f32,
        scale: f32,
        body: [u8; 3],
        label: bool,
        light: f32,
    }

    const PLAIN: Scene = Scene { cx: 0.5, cy: 0.5, scale: 1.0, body: [190, 40, 40], label: true, light: 1.0 };

    fn paint(w: u32, h: u32, scene: &Scene, bg: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (u, v) = ((x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32);
            let (dx, dy) = ((u - scene.cx) / (0.18 * scene.scale), (v - scene.cy) / (0.3 * scene.scale));
            if dx.abs() > 1.0 || dy.abs() > 1.0 {
                return Rgb(bg(x, y));
            }
            let c = if scene.label && (-0.2..0.3).contains(&dy) {
                if dx.abs() / 0.3 + (dy - 0.05).abs() / 0.15 <= 1.0 { [40, 20, 60] } else { [235, 220, 170] }
            } else {
                scene.body
            };
            Rgb(c.map(|c| (f32::from(c) * scene.light).clamp(0.0, 255.0) as u8))
        })
    }

    fn white(_: u32, _: u32) -> [u8; 3] {
        [255, 255, 255]
    }

    fn wood(x: u32, y: u32) -> [u8; 3] {
        let ring = ((y as f32 * 0.21 + (x as f32 * 0.05).sin() * 3.0).sin() * 0.5 + 0.5) * 40.0;
        [(120.0 + ring) as u8, (80.0 + ring * 0.6) as u8, (45.0 + ring * 0.3) as u8]
    }

    fn dynamic(img: RgbImage) -> DynamicImage {
        DynamicImage::ImageRgb8(img)
    }

    fn flagged(verdict: &Verdict) -> Vec<Check> {
        verdict.flags().map(|c| c.check).collect()
    }

    #[test]
    fn a_faithful_edit_passes_across_resolution_light_and_a_small_shift() {
        let input = dynamic(paint(300, 300, &PLAIN, white));
        let moved = Scene { cx: 0.51, cy: 0.49, light: 0.93, ..PLAIN };
        let output = dynamic(paint(224, 224, &moved, wood));
        let verdict = assess(&input, &output, &QualitySettings::default()).unwrap();
        assert!(verdict.passed(), "{}\n{:#?}", verdict.summary(), verdict.checks);
        for check in
            [Check::Presence, Check::Position, Check::Scale, Check::Shape, Check::Structure, Check::Color]
        {
            assert_eq!(verdict.get(check).map(|c| c.outcome), Some(Outcome::Pass), "{check:?}");
        }
        let region = verdict.output_region.unwrap();
        assert!((region.x + region.width / 2.0 - 0.51).abs() < 0.03, "{region:?}");
    }

    #[test]
    fn each_unfaithful_edit_is_flagged_with_its_reason() {
        let input = dynamic(paint(256, 256, &PLAIN, white));
        let settings = QualitySettings::default();
        let cases: [(Scene, Check, &str); 4] = [
            (Scene { cx: 0.72, cy: 0.55, ..PLAIN }, Check::Position, "moved by"),
            (Scene { scale: 0.65, ..PLAIN }, Check::Scale, "0.6"),
            (Scene { body: [40, 60, 190], ..PLAIN }, Check::Color, "colour changed"),
            (Scene { label: false, ..PLAIN }, Check::Color, "colour changed"),
        ];
        for (scene, check, words) in cases {
            let verdict = assess(&input, &dynamic(paint(256, 256, &scene, wood)), &settings).unwrap();
            let result = verdict.get(check).unwrap();
            assert_eq!(result.outcome, Outcome::Flag, "{check:?}: {:#?}", verdict.checks);
            assert!(result.reason.as_deref().unwrap_or_default().contains(words), "{result:?}");
        }
    }

    #[test]
    fn a_missing_product_a_blank_and_a_cut_output_are_held() {
        let input = dynamic(paint(200, 200, &PLAIN, white));
        let settings = QualitySettings::default();
        let gone =
            assess(&input, &dynamic(RgbImage::from_fn(200, 200, |x, y| Rgb(wood(x, y)))), &settings).unwrap();
        let presence = gone.get(Check::Presence).unwrap();
        assert_eq!(presence.outcome, Outcome::Flag);
        assert!(presence.reason.as_deref().unwrap_or_default().contains("missing"), "{presence:?}");
        assert_eq!(gone.get(Check::Structure).map(|c| c.outcome), Some(Outcome::Skip));

        let blank = assess(&input, &dynamic(RgbImage::from_pixel(200, 200, Rgb([230, 230, 230]))), &settings);
        assert!(flagged(&blank.unwrap()).contains(&Check::Blank));

        let mut cut = paint(200, 200, &PLAIN, wood);
        for y in 140..200 {
            for x in 0..200 {
                cut.put_pixel(x, y, Rgb([128, 128, 128]));
            }
        }
        let verdict = assess(&input, &dynamic(cut), &settings).unwrap();
        let result = verdict.get(Check::CutShort).unwrap();
        assert_eq!(result.outcome, Outcome::Flag, "{:#?}", verdict.checks);
        assert!(result.reason.as_deref().unwrap_or_default().contains("grey"));
    }

    #[test]
    fn background_rules_and_requested_size() {
        let input = dynamic(paint(200, 200, &PLAIN, white));
        let mut settings = QualitySettings {
            background: BackgroundRules {
                white_border: Some(6),
                min_fill: Some(0.5),
                min_longest_side: Some(1000),
            },
            expected_size: Some((200, 200)),
            ..QualitySettings::default()
        };
        let verdict = assess(&input, &dynamic(paint(200, 200, &PLAIN, white)), &settings).unwrap();
        assert_eq!(flagged(&verdict), [Check::Resolution], "{:#?}", verdict.checks);
        assert!((verdict.get(Check::Fill).unwrap().score.unwrap() - 0.6).abs() < 0.03);

        settings.background.min_longest_side = None;
        let off_white = assess(&input, &dynamic(paint(200, 200, &PLAIN, |_, _| [242, 236, 224])), &settings);
        let off_white = off_white.unwrap();
        assert_eq!(flagged(&off_white), [Check::WhiteBorder]);
        assert!(off_white.summary().contains("242,236,224"), "{}", off_white.summary());

        let small = Scene { scale: 0.6, ..PLAIN };
        settings.checks.scale = false;
        let verdict = assess(&input, &dynamic(paint(200, 200, &small, white)), &settings).unwrap();
        assert_eq!(flagged(&verdict), [Check::Fill]);
        assert!(verdict.get(Check::Scale).is_none(), "a check turned off is left out");

        let verdict = assess(&input, &dynamic(paint(200, 120, &PLAIN, white)), &settings).unwrap();
        assert!(flagged(&verdict).contains(&Check::Dimensions));
        assert!(verdict.summary().contains("200×120"), "{}", verdict.summary());
    }

    #[test]
    fn an_input_without_a_plain_background_skips_the_comparison() {
        let busy = dynamic(RgbImage::from_fn(120, 120, |x, y| {
            Rgb([(x * 2) as u8, (y * 2) as u8, ((x * y) % 256) as u8])
        }));
        let verdict =
            assess(&busy, &dynamic(paint(120, 120, &PLAIN, wood)), &QualitySettings::default()).unwrap();
        assert!(verdict.passed());
        let presence = verdict.get(Check::Presence).unwrap();
        assert_eq!(presence.outcome, Outcome::Skip);
        assert!(presence.reason.as_deref().unwrap_or_default().contains("plain background"));
    }

    #[test]
    fn an_alpha_channel_gives_the_region_and_generated_images_are_judged_alone() {
        let painted = paint(160, 160, &PLAIN, white);
        let cutout = RgbaImage::from_fn(160, 160, |x, y| {
            let Rgb([r, g, b]) = *painted.get_pixel(x, y);
            let inside = [r, g, b] != [255, 255, 255];
            if inside { Rgba([r, g, b, 255]) } else { Rgba([0, 0, 0, 0]) }
        });
        let output = dynamic(paint(160, 160, &PLAIN, wood));
        let verdict =
            assess(&DynamicImage::ImageRgba8(cutout), &output, &QualitySettings::default()).unwrap();
        assert!(verdict.passed(), "{}", verdict.summary());
        let region = verdict.input_region.unwrap();
        assert!((region.width - 0.36).abs() < 0.03 && (region.height - 0.6).abs() < 0.03, "{region:?}");

        let alone = assess_output(&output, &QualitySettings::default()).unwrap();
        assert!(alone.passed() && alone.get(Check::Presence).is_none());
        let empty = assess_output(&dynamic(RgbImage::new(0, 0)), &QualitySettings::default()).unwrap();
        assert_eq!(flagged(&empty), [Check::Blank]);
    }

    #[test]
    fn tiny_and_odd_images_never_panic() {
        let settings = QualitySettings::default();
        for (iw, ih, ow, oh) in [(1, 1, 1, 1), (3, 5, 5, 3), (2, 40, 40, 2), (17, 9, 64, 64), (64, 64, 9, 17)]
        {
            let input = dynamic(paint(iw, ih, &PLAIN, white));
            let output = dynamic(paint(ow, oh, &PLAIN, wood));
            assess(&input, &output, &settings).unwrap();
            assess_output(&output, &settings).unwrap();
        }
        let grey16 =
            DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(30, 30, image::Luma([40_000u16])));
        let verdict = assess(&grey16, &grey16, &settings).unwrap();
        assert!(flagged(&verdict).contains(&Check::Blank));
    }

    #[test]
    fn settings_validate_their_ranges() {
        assert!(QualitySettings::default().validate().is_ok());
        let bad = QualitySettings { max_shift: 1.5, ..QualitySettings::default() };
        assert!(bad.validate().unwrap_err().contains("max_shift"));
        let bad = QualitySettings { working_side: 32, ..QualitySettings::default() };
        assert!(bad.validate().unwrap_err().contains("working_side"));
        let err = decode(b"not an image", "output").unwrap_err();
        assert!(err.to_string().contains("output") && !err.is_retryable());
    }
}
