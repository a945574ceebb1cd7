//! The HTML report: one self-contained file with a before/after gallery per SKU (rows held for
//! review first, with the gate's difference picture, flags and the commands that resolve them;
//! then failed rows with their reasons), a header with totals and cost, and state filters. It
//! works offline: every picture is a downscaled `data:` URI and the page's CSP forbids fetching
//! anything; the report writes nothing but itself.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::{Cursor, Write};
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use image::{DynamicImage, GenericImageView, ImageReader, RgbImage};

use crate::quality::{Difference, Outcome};

use super::{
    ReportError, ReportFormatter, ReportRow, RunSummary, describe_spend, format_amount, format_dollars,
};
use crate::store::JobState;

/// Longest edge of an embedded picture, in pixels: the grid shows it at up to half a card's
/// width (about 240 px), the enlarged view at up to its full size and beyond. Small enough that
/// 1,000 rows of photos stay in the tens of MB (each picture is embedded once; see the
/// `thousand_row` measurement test).
pub const DEFAULT_THUMB_PX: u32 = 320;

/// JPEG quality of embedded pictures: small files, no visible blocking at thumbnail size.
const JPEG_QUALITY: u8 = 75;

/// Writes the gallery. Holds the output folder the `outputs.path` column is relative to.
#[derive(Debug, Clone)]
pub struct HtmlFormatter {
    out_dir: PathBuf,
    thumb_px: u32,
    /// Outputs kept in a bucket: their path → a presigned URL (linked, never fetched).
    links: std::collections::HashMap<String, String>,
    /// What the page says about those links ("valid 7 days").
    links_note: String,
}

impl HtmlFormatter {
    /// A formatter that finds output images under `out_dir`.
    #[must_use]
    pub fn new(out_dir: PathBuf) -> Self {
        Self {
            out_dir,
            thumb_px: DEFAULT_THUMB_PX,
            links: std::collections::HashMap::new(),
            links_note: String::new(),
        }
    }

    /// Outputs stored as objects: each output `path` links to its URL (a presigned GET URL,
    /// `note` saying how long it works) instead of being embedded; the page fetches nothing.
    #[must_use]
    pub fn with_links(mut self, links: std::collections::HashMap<String, String>, note: &str) -> Self {
        self.links = links;
        self.links_note = note.to_owned();
        self
    }

    /// Changes the longest edge of embedded pictures (at least 16 px).
    #[must_use]
    pub fn with_thumb_px(mut self, px: u32) -> Self {
        self.thumb_px = px.max(16);
        self
    }
}

/// One picture of a card, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Picture {
    /// Decoded and downscaled: a `data:` URI.
    Embedded { uri: String, label: String },
    /// A remote input: shown as a link, never fetched.
    Remote { url: String },
    /// An output stored as an object: a link to its presigned URL, never fetched.
    Stored { url: String, label: String, note: String },
    /// Could not be shown (missing file, not an image).
    Missing { label: String, reason: String },
}

/// The pictures of one row.
#[derive(Debug, Default)]
struct Pictures {
    before: Vec<Picture>,
    after: Vec<Picture>,
    /// Review rows: per output, its difference picture (a PNG `data:` URI and its size) or why
    /// there is none.
    difference: Vec<(i64, DiffPicture)>,
}

/// A difference picture as a PNG `data:` URI with its width and height, or why there is none.
type DiffPicture = Result<(String, u32, u32), String>;

impl ReportFormatter for HtmlFormatter {
    fn write_report(&self, summary: &RunSummary, out: &mut dyn Write) -> Result<(), ReportError> {
        // The reader's to-do list first: rows held for review, failed rows, ambiguous ones; then
        // catalog order.
        let mut rows: Vec<&ReportRow> = summary.rows.iter().collect();
        rows.sort_by_key(|r| match r.state {
            JobState::Review => 0,
            JobState::Failed => 1,
            JobState::Ambiguous => 2,
            _ => 3,
        });
        let pictures = self.load_pictures(&rows);
        out.write_all(page_head(summary).as_bytes())?;
        for (row, pics) in rows.iter().zip(&pictures) {
            out.write_all(card(row, pics).as_bytes())?;
        }
        out.write_all(PAGE_TAIL.as_bytes())?;
        out.flush()?;
        Ok(())
    }
}

impl HtmlFormatter {
    /// Decodes and downscales every picture, spread over the machine's cores: decoding is
    /// the slow part of a large report.
    fn load_pictures(&self, rows: &[&ReportRow]) -> Vec<Pictures> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let chunk = rows.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = rows
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().map(|r| self.row_pictures(r)).collect::<Vec<_>>())
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    // A panic inside the image decoder must not take the whole report down
                    // silently: re-raise it on this thread.
                    h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    }

    fn row_pictures(&self, row: &ReportRow) -> Pictures {
        let judgement = row
            .quality
            .as_deref()
            .filter(|_| row.state == JobState::Review)
            .and_then(|q| serde_json::from_str::<super::StoredJudgement>(q).ok());
        // The copy of a URL input the gate kept for a held row: the pixels it judged.
        let input_copy = judgement
            .as_ref()
            .and_then(|j| j.input_copy.as_deref())
            .and_then(safe_relative)
            .map(|rel| self.out_dir.join(rel));
        let before = row
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| match &input_copy {
                Some(copy) if i == 0 && is_http(input) => self.embed(copy, input),
                _ if is_http(input) => Picture::Remote { url: input.clone() },
                _ => self.embed(Path::new(input), input),
            })
            .collect();
        let after = row
            .outputs
            .iter()
            .map(|o| match safe_relative(&o.path) {
                Some(_) if let Some(url) = self.links.get(&o.path) => {
                    Picture::Stored { url: url.clone(), label: o.path.clone(), note: self.links_note.clone() }
                }
                Some(rel) => self.embed(&self.out_dir.join(rel), &o.path),
                None => Picture::Missing {
                    label: o.path.clone(),
                    reason: "path is outside the output folder".into(),
                },
            })
            .collect();
        let difference = if row.state == JobState::Review {
            self.differences(row, input_copy.as_deref())
        } else {
            Vec::new()
        };
        Pictures { before, after, difference }
    }

    /// The difference picture of each output of a held edit, against its first input (the
    /// gate's copy of a URL input; a local file as it is now), from the gate's own comparison
    /// at its default settings (a template's `[quality]` table is not in the state file).
    fn differences(&self, row: &ReportRow, input_copy: Option<&Path>) -> Vec<(i64, DiffPicture)> {
        let input = match (row.task.as_str(), row.inputs.first()) {
            ("edit", Some(input)) if is_http(input) => match input_copy {
                Some(copy) => decode_file(copy),
                None => {
                    Err("the input is a URL and the gate kept no copy of it (the gallery fetches nothing)"
                        .to_owned())
                }
            },
            ("edit", Some(input)) => decode_file(Path::new(input)),
            _ => Err("a generated image has no input to compare with".to_owned()),
        };
        let settings = crate::quality::QualitySettings::default();
        row.outputs
            .iter()
            .map(|o| {
                let diff = input.as_ref().map_err(Clone::clone).and_then(|input| {
                    let rel =
                        safe_relative(&o.path).ok_or("the output's path is outside the output folder")?;
                    if self.links.contains_key(&o.path) {
                        return Err("the output is stored in a bucket, not read by the report".to_owned());
                    }
                    let output = decode_file(&self.out_dir.join(rel))?;
                    match crate::quality::difference_image(input, &output, &settings) {
                        Ok(Difference::Image(img)) => {
                            let (w, h) = img.dimensions();
                            png_uri(&img).map(|uri| (uri, w, h))
                        }
                        Ok(Difference::Unavailable(why)) => Err(why),
                        Err(e) => Err(e.to_string()),
                    }
                });
                (o.index, diff)
            })
            .collect()
    }

    fn embed(&self, path: &Path, label: &str) -> Picture {
        match thumbnail_uri(path, self.thumb_px) {
            Ok(uri) => Picture::Embedded { uri, label: label.to_owned() },
            Err(reason) => Picture::Missing { label: label.to_owned(), reason },
        }
    }
}

/// Decodes an image file whatever its name (the gate's input copies have no extension).
fn decode_file(path: &Path) -> Result<DynamicImage, String> {
    ImageReader::open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .decode()
        .map_err(|e| format!("not a readable image: {e}"))
}

/// A PNG `data:` URI: the difference picture's flat colours and thin outline stay crisp.
fn png_uri(img: &RgbImage) -> Result<String, String> {
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode the difference picture: {e}"))?;
    Ok(format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png)))
}

fn is_http(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// `outputs.path` must stay inside the output folder: no absolute paths, no `..`.
fn safe_relative(path: &str) -> Option<&Path> {
    let p = Path::new(path);
    p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)).then_some(p)
}

/// Decodes an image file, downscales it to fit `px`, flattens transparency onto white, and
/// returns it as a JPEG `data:` URI. The error is a reason to show in place of the picture.
fn thumbnail_uri(path: &Path, px: u32) -> Result<String, String> {
    let reader = ImageReader::open(path)
        .map_err(|e| format!("cannot open: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read: {e}"))?;
    let img = reader.decode().map_err(|e| format!("not a readable image: {e}"))?;
    let small = if img.width() > px || img.height() > px { img.thumbnail(px, px) } else { img };
    let rgb = flatten_on_white(&small);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut jpeg), JPEG_QUALITY)
        .encode_image(&rgb)
        .map_err(|e| format!("cannot encode thumbnail: {e}"))?;
    Ok(format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg)))
}

/// Product cut-outs are often transparent PNGs; JPEG has no alpha, and black would hide them.
fn flatten_on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let (w, h) = img.dimensions();
    let rgba = img.to_rgba8();
    RgbImage::from_fn(w, h, |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = u16::from(p[3]);
        let blend = |c: u8| {
            // Exact integer blend over 255; the result always fits a u8.
            u8::try_from((u16::from(c) * a + 255 * (255 - a)) / 255).unwrap_or(u8::MAX)
        };
        image::Rgb([blend(p[0]), blend(p[1]), blend(p[2])])
    })
}

/// Escapes text for HTML element content and quoted attribute values.
#[must_use]
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.contains(['&', '<', '>', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn page_head(summary: &RunSummary) -> String {
    let c = &summary.counts;
    let mut html = String::with_capacity(8 * 1024);
    html.push_str(PAGE_START);
    let _ = write!(
        html,
        "<header><h1>backdrop report</h1><p class=\"meta\">{} rows · spent {} · generated {} from <code>{}</code></p>",
        c.total,
        escape(&describe_spend(&summary.spent)),
        escape(&summary.generated_at),
        escape(&summary.state_file),
    );
    if let Some(run) = &summary.last_run {
        let ended = run.ended_at.map_or_else(|| "not ended".to_owned(), super::rfc3339);
        let outcome = run.outcome.as_deref().unwrap_or("unknown (still running, or the process died)");
        let _ = write!(
            html,
            "<p class=\"meta\">last run #{}{}: {} → {}, outcome <b>{}</b> ({} with {} {})</p>",
            run.id,
            if run.dry_run { " (dry run)" } else { "" },
            escape(&super::rfc3339(run.started_at)),
            escape(&ended),
            escape(outcome),
            escape(&run.catalog),
            escape(&run.provider),
            escape(&run.model),
        );
    }
    html.push_str(
        "<p class=\"meta hint\">Rows held for review first, then failed rows, then ambiguous ones, then catalog order. Click a picture to enlarge it (Esc closes).</p>",
    );
    html.push_str("<nav class=\"filters\" aria-label=\"filter by state\">");
    let _ = write!(
        html,
        "<button type=\"button\" data-filter=\"all\" aria-pressed=\"true\">all <b>{}</b></button>",
        c.total
    );
    for state in JobState::ALL {
        let n = c.get(state);
        if n > 0 {
            let _ = write!(
                html,
                "<button type=\"button\" data-filter=\"{s}\" aria-pressed=\"false\" class=\"st-{s}\">{s} <b>{n}</b></button>",
                s = state.as_str()
            );
        }
    }
    html.push_str("</nav></header>\n<main id=\"grid\">\n");
    if summary.rows.is_empty() {
        html.push_str("<p class=\"empty\">No rows in the state database yet.</p>\n");
    }
    html
}

fn card(row: &ReportRow, pics: &Pictures) -> String {
    let state = row.state.as_str();
    let mut html = String::with_capacity(4 * 1024);
    let _ = write!(
        html,
        "<article class=\"card\" data-state=\"{state}\"><h2><span class=\"title\"><span class=\"sku\">{}</span>{}</span> <span class=\"badge st-{state}\">{state}</span></h2>",
        escape(&row.sku),
        row.name
            .as_deref()
            .map_or_else(String::new, |n| format!(" <span class=\"name\">{}</span>", escape(n))),
    );
    if let Some(leader) = &row.reused_from {
        let _ = write!(
            html,
            "<p class=\"reused\">reused the result of {} (no request, no cost)</p>",
            escape(leader)
        );
    }
    if let Some(error) = &row.error {
        let _ = write!(html, "<p class=\"error\">{}</p>", escape(error));
    }
    if row.state == JobState::Ambiguous {
        html.push_str(
            "<p class=\"warn\">A paid request may already have gone out; retrying may charge twice.</p>",
        );
    }
    if row.state == JobState::Review {
        review_notes(&mut html, row);
    }
    let trio = if row.state == JobState::Review { " trio" } else { "" };
    let _ = write!(html, "<div class=\"pair{trio}\"><figure><figcaption>before</figcaption>");
    if pics.before.is_empty() {
        html.push_str("<div class=\"ph\">no input image</div>");
    }
    for p in &pics.before {
        picture(&mut html, row, "before", p);
    }
    html.push_str("</figure><figure><figcaption>after</figcaption>");
    if pics.after.is_empty() {
        html.push_str("<div class=\"ph\">no output yet</div>");
    }
    for p in &pics.after {
        picture(&mut html, row, "after", p);
    }
    if row.state == JobState::Review {
        html.push_str("</figure><figure><figcaption>difference</figcaption>");
        if pics.difference.is_empty() {
            html.push_str("<div class=\"ph\">no output to compare</div>");
        }
        for (index, diff) in &pics.difference {
            match diff {
                Ok((uri, w, h)) => {
                    let _ = write!(
                        html,
                        "<img class=\"thumb diff\" src=\"{uri}\" width=\"{w}\" height=\"{h}\" alt=\"{} difference {index}\" title=\"output {index}: the input's product laid where the gate found it; yellow to red: how far its colour moved; magenta: product the input does not account for; blue: the expected outline\" tabindex=\"0\">",
                        escape(&row.sku),
                    );
                }
                Err(why) => {
                    let _ = write!(
                        html,
                        "<div class=\"ph missing\">no difference picture for output {index}<br><small>{}</small></div>",
                        escape(why)
                    );
                }
            }
        }
    }
    html.push_str("</figure></div>");
    let _ = writeln!(
        html,
        "<details><summary>prompt</summary><p class=\"prompt\">{}</p></details><dl><dt>request</dt><dd>{}</dd><dt>attempts</dt><dd>{}</dd><dt>cost</dt><dd>{}</dd><dt>model</dt><dd>{}</dd></dl></article>",
        escape(&row.prompt),
        escape(row.request_id.as_deref().unwrap_or("—")),
        row.attempts,
        escape(&cost(row)),
        escape(&format!("{} {}", row.provider, row.model)),
    );
    html
}

/// A held row's flags (each flagged check's score, limit and reason, per output) and the two
/// commands that resolve it.
fn review_notes(html: &mut String, row: &ReportRow) {
    html.push_str("<div class=\"review\"><p><b>Held for review</b> by the quality gate:</p><ul>");
    match row.quality.as_deref().and_then(|q| serde_json::from_str::<super::StoredJudgement>(q).ok()) {
        Some(judged) => {
            for o in &judged.outputs {
                if let Some(e) = &o.error {
                    let _ = write!(html, "<li>output {}: not checked: {}</li>", o.index, escape(e));
                }
                for c in o.verdict.iter().flat_map(|v| &v.checks).filter(|c| c.outcome == Outcome::Flag) {
                    let score = c.score.map_or_else(|| "—".to_owned(), |s| format!("{s:.3}"));
                    let limit = c.limit.map_or_else(String::new, |l| format!(" (limit {l:.3})"));
                    let _ = write!(
                        html,
                        "<li>output {}: <b>{}</b> {score}{limit}: {}</li>",
                        o.index,
                        c.check.name(),
                        escape(c.reason.as_deref().unwrap_or("flagged")),
                    );
                }
            }
        }
        None => {
            let _ = write!(html, "<li>{}</li>", escape(&row.quality_reasons));
        }
    }
    let sku = shell_word(&row.sku);
    let _ = write!(
        html,
        "</ul><p>Keep it as it is, or generate it again with a new seed (paid again):</p><pre class=\"cmd\">backdrop accept --sku {s}\nbackdrop retry --review --sku {s}</pre></div>",
        s = escape(&sku),
    );
}

/// A SKU as one shell word: as it is when it holds only safe characters, else single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-+:@/=,".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn cost(row: &ReportRow) -> String {
    if row.provider == "seedance" {
        format!("{} credits ({})", format_amount(row.credits), format_dollars(row.dollars))
    } else {
        format_dollars(row.dollars)
    }
}

fn picture(html: &mut String, row: &ReportRow, side: &str, p: &Picture) {
    match p {
        Picture::Embedded { uri, label } => {
            let _ = write!(
                html,
                "<img class=\"thumb\" src=\"{uri}\" alt=\"{} {side}\" title=\"{}\" decoding=\"async\" tabindex=\"0\">",
                escape(&row.sku),
                escape(label),
            );
        }
        Picture::Remote { url } => {
            let _ = write!(
                html,
                "<div class=\"ph\">remote image (not fetched)<br><a href=\"{u}\" rel=\"noreferrer noopener\" target=\"_blank\">{u}</a></div>",
                u = escape(url),
            );
        }
        Picture::Stored { url, label, note } => {
            let _ = write!(
                html,
                "<div class=\"ph\">{}<br><a href=\"{}\" rel=\"noreferrer noopener\" target=\"_blank\">open the stored object</a><br><small>{}</small></div>",
                escape(label),
                escape(url),
                escape(note),
            );
        }
        Picture::Missing { label, reason } => {
            let _ = write!(
                html,
                "<div class=\"ph missing\">{}<br><small>{}</small></div>",
                escape(label),
                escape(reason)
            );
        }
    }
}

/// Everything up to `<body>`: styles and the CSP that keeps the page offline (only `data:`
/// images, inline styles and script).
const PAGE_START: &str = r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>backdrop report</title>
<style>
[hidden]{display:none!important}
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f5;color:#18181b}
header{background:#18181b;color:#fafafa;padding:12px 20px;position:sticky;top:0;z-index:1}
h1{font-size:18px;margin:0 0 4px}.meta{margin:2px 0;color:#d4d4d8}code{font-size:12px}
.filters{margin-top:8px;display:flex;gap:6px;flex-wrap:wrap}
.filters button{border:1px solid #52525b;background:#27272a;color:#fafafa;border-radius:14px;padding:3px 10px;cursor:pointer}
.filters button[aria-pressed=true]{background:#fafafa;color:#18181b}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px;padding:16px 20px}
.card{background:#fff;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0002}
.card h2{font-size:15px;margin:0 0 6px;display:flex;justify-content:space-between;gap:8px;overflow-wrap:anywhere}
.name{font-weight:400;color:#52525b}.hint{font-size:12px}
.badge{font-size:12px;font-weight:600;border-radius:10px;padding:1px 8px;background:#e4e4e7;white-space:nowrap}
.st-done{background:#bbf7d0;color:#14532d}.st-failed{background:#fecaca;color:#7f1d1d}
.st-ambiguous{background:#fde68a;color:#78350f}.st-pending,.st-waiting{background:#e0e7ff;color:#312e81}
.reused{color:#1e40af;margin:4px 0}
.error{background:#fef2f2;color:#991b1b;border-left:3px solid #dc2626;padding:4px 8px;margin:4px 0;white-space:pre-wrap;overflow-wrap:anywhere}
.warn{background:#fffbeb;color:#92400e;padding:4px 8px;margin:4px 0}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:8px}.pair.trio{grid-template-columns:1fr 1fr 1fr}
.review{background:#f5f3ff;border-left:3px solid #7c3aed;padding:4px 8px;margin:4px 0}.review ul{margin:2px 0;padding-left:18px}
.cmd{background:#18181b;color:#fafafa;padding:4px 8px;border-radius:4px;font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere;margin:4px 0}
.st-review{background:#ddd6fe;color:#4c1d95}figure{margin:0;display:flex;flex-direction:column;gap:4px}
figcaption{font-size:12px;color:#71717a;text-transform:uppercase;letter-spacing:.05em}
.thumb{width:100%;max-width:320px;height:auto;border-radius:4px;cursor:zoom-in;background:#fafafa;border:1px solid #e4e4e7}
.ph{min-height:100px;border:2px dashed #d4d4d8;border-radius:4px;display:flex;flex-direction:column;align-items:center;justify-content:center;text-align:center;color:#71717a;font-size:12px;padding:6px;overflow-wrap:anywhere}
.ph.missing{border-color:#fca5a5}
details{margin-top:6px}.prompt{white-space:pre-wrap;overflow-wrap:anywhere;color:#3f3f46}
dl{display:grid;grid-template-columns:auto 1fr;gap:0 8px;margin:6px 0 0;font-size:12px;color:#52525b}dd{margin:0;overflow-wrap:anywhere}
#lightbox{position:fixed;inset:0;background:#000c;display:flex;align-items:center;justify-content:center;z-index:2;cursor:zoom-out}
#lightbox img{max-width:92vw;max-height:88vh;min-width:min(640px,92vw);image-rendering:auto}
#lightbox p{position:absolute;bottom:8px;color:#fff;margin:0}
</style></head>
<body>
"#;

/// The lightbox, the filter buttons, and the decode check (`data-decoded="ok/total"` on the
/// body once every picture has loaded) that the browser test reads.
const PAGE_TAIL: &str = r#"</main>
<div id="lightbox" hidden><img id="lightbox-img" alt=""><p id="lightbox-cap"></p></div>
<script>
(function () {
  var box = document.getElementById('lightbox');
  var big = document.getElementById('lightbox-img');
  var cap = document.getElementById('lightbox-cap');
  function open(img) { big.src = img.src; big.alt = img.alt; cap.textContent = img.alt; box.hidden = false; }
  document.getElementById('grid').addEventListener('click', function (e) {
    if (e.target.classList && e.target.classList.contains('thumb')) open(e.target);
  });
  document.getElementById('grid').addEventListener('keydown', function (e) {
    if (e.key === 'Enter' && e.target.classList.contains('thumb')) open(e.target);
  });
  box.addEventListener('click', function () { box.hidden = true; });
  document.addEventListener('keydown', function (e) { if (e.key === 'Escape') box.hidden = true; });
  var buttons = document.querySelectorAll('[data-filter]');
  buttons.forEach(function (b) {
    b.addEventListener('click', function () {
      var f = b.dataset.filter;
      document.querySelectorAll('.card').forEach(function (c) {
        c.hidden = f !== 'all' && c.dataset.state !== f;
      });
      buttons.forEach(function (x) { x.setAttribute('aria-pressed', String(x === b)); });
    });
  });
  window.addEventListener('load', function () {
    var imgs = document.querySelectorAll('img.thumb');
    var ok = 0;
    imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) ok++; });
    document.body.dataset.decoded = ok + '/' + imgs.length;
  });
})();
</script>
</body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support::summary;

    #[test]
    fn skus_become_one_shell_word() {
        assert_eq!(shell_word("MUG-001"), "MUG-001");
        assert_eq!(shell_word("it's a mug"), "'it'\\''s a mug'");
        assert_eq!(shell_word("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn a_review_card_comes_first_with_its_flags_difference_and_commands() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("R")).unwrap();
        let scene = |w: u32, h: u32, color: [u8; 3]| {
            image::RgbImage::from_fn(w, h, |x, y| {
                let inside = (w / 3..2 * w / 3).contains(&x) && (h / 3..2 * h / 3).contains(&y);
                image::Rgb(if inside { color } else { [255; 3] })
            })
        };
        scene(400, 400, [200, 30, 30]).save(out.join("R/0.png")).unwrap();
        let input = dir.path().join("in.png");
        scene(300, 300, [30, 60, 200]).save(&input).unwrap();
        let mut summary = summary();
        let mut held = summary.rows[0].clone();
        held.sku = "R <1>".into();
        held.state = JobState::Review;
        held.inputs = vec![input.display().to_string()];
        held.outputs =
            vec![crate::report::ReportOutput { path: "R/0.png".into(), ..held.outputs[0].clone() }];
        held.quality = Some(
            r#"{"outputs":[{"index":0,"verdict":{"checks":[{"check":"color","outcome":"flag","score":52.5,"limit":10.0,"reason":"the product's colour changed"}],"input_region":null,"output_region":null},"error":null}]}"#
                .into(),
        );
        summary.rows.push(held);

        let mut buf = Vec::new();
        HtmlFormatter::new(out).write_report(&summary, &mut buf).unwrap();
        let html = String::from_utf8(buf).unwrap();
        let first = html.find("<article").unwrap();
        assert!(html[first..].starts_with("<article class=\"card\" data-state=\"review\">"));
        assert!(html.contains(
            "<li>output 0: <b>color</b> 52.500 (limit 10.000): the product&#39;s colour changed</li>"
        ));
        assert!(html.contains(
            "backdrop accept --sku &#39;R &lt;1&gt;&#39;\nbackdrop retry --review --sku &#39;R &lt;1&gt;&#39;"
        ));
        let img = &html[html.find("<img class=\"thumb diff\" src=\"data:image/png;base64,").unwrap()..];
        assert!(img.contains("width=\"256\" height=\"256\""), "{}", &img[..img.find('>').unwrap()].len());
        let b64 = &img["<img class=\"thumb diff\" src=\"data:image/png;base64,".len()..];
        let b64 = &b64[..b64.find('"').unwrap()];
        let png =
            image::load_from_memory(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap();
        assert_eq!((png.width(), png.height()), (256, 256));
    }

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape("<b a='1' c=\"2\">&</b>"),
            "&lt;b a=&#39;1&#39; c=&quot;2&quot;&gt;&amp;&lt;/b&gt;"
        );
        assert!(matches!(escape("plain"), Cow::Borrowed("plain")));
    }

    #[test]
    fn output_paths_cannot_leave_the_output_folder() {
        assert!(safe_relative("A/0.png").is_some());
        assert!(safe_relative("./A/0.png").is_some());
        assert!(safe_relative("../secret.png").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative("A/../../x.png").is_none());
    }

    #[test]
    fn transparent_pixels_flatten_to_white() {
        let mut img = image::RgbaImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        let flat = flatten_on_white(&DynamicImage::ImageRgba8(img));
        assert_eq!(flat.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(flat.get_pixel(1, 0).0, [10, 20, 30]);
    }

    #[test]
    fn gallery_embeds_downscaled_images_and_escapes_text() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("A")).unwrap();
        let big =
            image::RgbImage::from_fn(1000, 500, |x, _| image::Rgb([u8::try_from(x % 256).unwrap(), 90, 200]));
        big.save(out.join("A/0.png")).unwrap();
        let before = dir.path().join("before.png");
        big.save(&before).unwrap();
        let mut summary = summary();
        summary.rows[0].inputs = vec![before.display().to_string(), "https://cdn.example/x.png".into()];
        summary.rows[1].prompt = "<script>alert(1)</script>".into();
        summary.rows[1].name = Some("Stoneware <mug>".into());

        let mut buf = Vec::new();
        HtmlFormatter::new(out).write_report(&summary, &mut buf).unwrap();
        let html = String::from_utf8(buf).unwrap();

        assert!(!html.contains("<script>alert(1)"), "prompt must be escaped");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("=HYPERLINK(&quot;x&quot;)"));
        assert!(
            html.contains("<span class=\"sku\">B</span> <span class=\"name\">Stoneware &lt;mug&gt;</span>")
        );
        assert!(html.contains("href=\"https://cdn.example/x.png\""));
        // A/1.png does not exist: a placeholder with the reason, not a failure.
        assert!(html.contains("A/1.png<br><small>cannot open"));
        // The failed row comes first.
        let failed = html.find("data-state=\"failed\"").unwrap();
        let done = html.find("data-state=\"done\"").unwrap();
        assert!(failed < done);

        let uris: Vec<&str> =
            html.match_indices("data:image/jpeg;base64,").map(|(i, _)| &html[i..]).collect();
        assert_eq!(uris.len(), 2, "before and after of row A");
        for uri in uris {
            let b64 = &uri["data:image/jpeg;base64,".len()..uri.find('"').unwrap()];
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
            let img = image::load_from_memory(&bytes).unwrap();
            assert_eq!((img.width(), img.height()), (DEFAULT_THUMB_PX, DEFAULT_THUMB_PX / 2));
        }
    }
}
