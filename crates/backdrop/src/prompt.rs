//! Prompt templates: a body with `{column}` placeholders and `{{`/`}}` escapes, after optional TOML
//! front matter between `+++` lines (model, task, num_images, output_format, size, seed, and the
//! `[quality]` and `[export.NAME]` tables).
//! [`Template`] parses once and renders each catalog row into a reused buffer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::ProviderKind;
use crate::domain::job::{Params, Task};
use crate::domain::text::{control_name, is_forbidden_in_prompt};

/// The longest rendered prompt sent, in characters (Unicode scalar values), when the provider
/// documents no limit. Neither Seedance nor fal documents one; this is far above any product
/// prompt and far below what a runaway catalog cell can hold (a megabyte prompt was once sent,
/// and charged).
pub const DEFAULT_MAX_PROMPT_CHARS: usize = 10_000;

/// The longest prompt `provider` is sent, in characters.
#[must_use]
pub const fn max_prompt_chars(provider: ProviderKind) -> usize {
    match provider {
        // Neither API documents a maximum: both get the default.
        ProviderKind::Seedance | ProviderKind::Fal => DEFAULT_MAX_PROMPT_CHARS,
    }
}

/// Checks a rendered prompt before it can be sent: at most `max_chars` characters, and no
/// control character but tab, newline and carriage return (NUL, ESC, BEL, the rest of C0, DEL
/// and C1 are refused: an API may cut the text at a NUL, and a terminal echoing it obeys ESC).
///
/// # Errors
/// What is wrong, for a person: the length, or the first control character and where it is.
pub fn check_rendered(prompt: &str, max_chars: usize) -> Result<(), String> {
    if let Some((at, c)) = prompt.chars().enumerate().find(|(_, c)| is_forbidden_in_prompt(*c)) {
        let name = control_name(c).unwrap_or("control character");
        return Err(format!(
            "the prompt holds a control character, U+{:04X} ({name}), at character {}",
            u32::from(c),
            at + 1
        ));
    }
    // Counting stops one past the limit: a huge prompt is not walked to its end.
    let chars = prompt.chars().take(max_chars + 1).count();
    if chars > max_chars {
        return Err(format!(
            "the prompt is longer than {max_chars} characters ({} in all)",
            prompt.chars().count()
        ));
    }
    Ok(())
}
use crate::quality::{ExportPreset, QualitySettings};

/// Errors parsing a template file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromptError {
    /// The template file could not be read.
    #[error("cannot read prompt template {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The front matter is not valid TOML, has an unknown key or an out-of-range value.
    #[error("prompt template {path}: front matter: {message}")]
    FrontMatter {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line in the file.
        message: String,
    },
    /// The body has an unclosed `{`, a stray `}` or an empty placeholder.
    #[error("prompt template {path}: line {line}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Line in the file (1-based).
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The body is empty.
    #[error("prompt template {path} has no prompt text")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

impl PromptError {
    /// A bad template never fixes itself.
    #[must_use]
    pub const fn is_retryable(&self) -> bool {
        false
    }
}

/// The optional TOML header of a template. Unknown keys are errors (typos must not be silently
/// ignored: a misspelt `num_images` would change what the user pays for).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontMatter {
    /// Model name or fal model id.
    pub model: Option<String>,
    /// `edit` (default) or `generate`.
    pub task: Option<Task>,
    /// Images per row, 1–6.
    pub num_images: Option<u32>,
    /// `png` or `jpeg`.
    pub output_format: Option<String>,
    /// `WIDTHxHEIGHT` or a fal size name.
    pub size: Option<String>,
    /// Seed for reproducible output.
    pub seed: Option<i64>,
    /// The quality gate's settings (`[quality]`); absent, the defaults apply.
    #[serde(default)]
    pub quality: Option<QualitySettings>,
    /// Derived files made from each accepted output, by name (`[export.NAME]`).
    #[serde(default)]
    pub export: BTreeMap<String, ExportPreset>,
}

/// One piece of a template body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Literal text (escapes already resolved).
    Text(String),
    /// A `{column}` placeholder.
    Field(String),
}

/// A parsed template body: literal text and placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    parts: Vec<Part>,
}

impl Body {
    /// Parses a body. `first_line` is the file line the body starts on (for messages).
    ///
    /// # Errors
    /// `(line, message)` for an unclosed `{`, a stray `}` or an empty placeholder.
    pub fn parse(text: &str, first_line: usize) -> Result<Self, (usize, String)> {
        let mut parts = Vec::new();
        let mut text_buf = String::new();
        let mut line = first_line;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text_buf.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text_buf.push('}');
                }
                '}' => return Err((line, "stray `}` (write `}}` for a literal brace)".into())),
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        match c {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' | '\n' => break,
                            c => name.push(c),
                        }
                    }
                    if !closed {
                        return Err((line, "unclosed `{` (write `{{` for a literal brace)".into()));
                    }
                    let name = name.trim();
                    if name.is_empty() {
                        return Err((line, "empty placeholder `{}`".into()));
                    }
                    if !text_buf.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text_buf)));
                    }
                    parts.push(Part::Field(name.to_owned()));
                }
                '\n' => {
                    line += 1;
                    // Templates are hard-wrapped for reading: a single newline joins lines with a
                    // space, a blank line keeps a paragraph break.
                    if chars.peek() == Some(&'\n') || text_buf.ends_with('\n') {
                        text_buf.push('\n');
                    } else {
                        text_buf.push(' ');
                    }
                }
                c => text_buf.push(c),
            }
        }
        if !text_buf.is_empty() {
            parts.push(Part::Text(text_buf));
        }
        Ok(Self { parts })
    }

    /// The placeholder names, in order of appearance (repeats included).
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    /// The parts, for callers that bind placeholders to column indexes once.
    #[must_use]
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Renders into `out` (cleared first). `lookup` gives a placeholder's value; `None` means the
    /// name is not a column, and is returned as the error.
    ///
    /// # Errors
    /// The first placeholder `lookup` does not know.
    pub fn render_into<'v, F>(&self, out: &mut String, mut lookup: F) -> Result<(), &str>
    where
        F: FnMut(&str) -> Option<&'v str>,
    {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(name) => out.push_str(lookup(name).ok_or(name.as_str())?),
            }
        }
        Ok(())
    }
}

/// A prompt template file: front matter and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    path: PathBuf,
    front: FrontMatter,
    body: Body,
}

impl Template {
    /// Reads and parses a template file.
    ///
    /// # Errors
    /// [`PromptError::Read`] when the file cannot be read; see [`Template::parse`].
    pub fn load(path: &Path) -> Result<Self, PromptError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PromptError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text)
    }

    /// Parses template text; `path` is only used in messages.
    ///
    /// # Errors
    /// [`PromptError::FrontMatter`] for bad TOML, unknown keys or values out of range,
    /// [`PromptError::Syntax`] for a malformed body, [`PromptError::Empty`] for no text.
    pub fn parse(path: &Path, text: &str) -> Result<Self, PromptError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let (front, body_text, body_line) = split_front_matter(path, text)?;
        let front: FrontMatter = toml::from_str(front).map_err(|e| {
            let line = e.span().map_or(0, |s| front[..s.start.min(front.len())].matches('\n').count() + 2);
            let at = if line > 0 { format!("line {line}: ") } else { String::new() };
            PromptError::FrontMatter { path: path.to_owned(), message: format!("{at}{}", e.message().trim()) }
        })?;
        check_front(path, &front)?;
        let trimmed = body_text.trim();
        if trimmed.is_empty() {
            return Err(PromptError::Empty { path: path.to_owned() });
        }
        // Leading blank lines are dropped: count them so messages still name the file's line.
        let skipped = body_text[..body_text.len() - body_text.trim_start().len()].matches('\n').count();
        if let Some((offset, c)) = trimmed.char_indices().find(|(_, c)| is_forbidden_in_prompt(*c)) {
            let line = body_line + skipped + trimmed[..offset].matches('\n').count();
            let name = control_name(c).unwrap_or("control character");
            let message =
                format!("control character U+{:04X} ({name}): prompts may hold only text", u32::from(c));
            return Err(PromptError::Syntax { path: path.to_owned(), line, message });
        }
        let body = Body::parse(trimmed, body_line + skipped)
            .map_err(|(line, message)| PromptError::Syntax { path: path.to_owned(), line, message })?;
        Ok(Self { path: path.to_owned(), front, body })
    }

    /// The file this template came from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The front matter as written.
    #[must_use]
    pub fn front(&self) -> &FrontMatter {
        &self.front
    }

    /// The body.
    #[must_use]
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// The task (front matter, else edit).
    #[must_use]
    pub fn task(&self) -> Task {
        self.front.task.unwrap_or_default()
    }

    /// The quality gate's settings: the `[quality]` table, or the defaults (on), with the
    /// size the template asks for as the expected output size.
    #[must_use]
    pub fn quality(&self) -> QualitySettings {
        let mut settings = self.front.quality.clone().unwrap_or_default();
        settings.expected_size = self.params().dimensions();
        settings
    }

    /// The `[export.NAME]` presets, by name.
    #[must_use]
    pub fn exports(&self) -> &BTreeMap<String, ExportPreset> {
        &self.front.export
    }

    /// The generation parameters the front matter sets (defaults otherwise).
    #[must_use]
    pub fn params(&self) -> Params {
        Params {
            num_images: self.front.num_images.unwrap_or(1),
            output_format: self.front.output_format.clone(),
            size: self.front.size.clone(),
            seed: self.front.seed,
        }
    }
}

/// Splits `+++\n<toml>\n+++\n<body>`; returns (toml, body, body's first line number).
fn split_front_matter<'t>(path: &Path, text: &'t str) -> Result<(&'t str, &'t str, usize), PromptError> {
    let mut lines = text.split_inclusive('\n');
    let Some(first) = lines.next() else { return Ok(("", text, 1)) };
    if first.trim_end() != "+++" {
        return Ok(("", text, 1));
    }
    let start = first.len();
    let mut offset = start;
    for (i, line) in lines.enumerate() {
        if line.trim_end() == "+++" {
            return Ok((&text[start..offset], &text[offset + line.len()..], i + 3));
        }
        offset += line.len();
    }
    Err(PromptError::FrontMatter { path: path.to_owned(), message: "no closing `+++` line".into() })
}

fn check_front(path: &Path, front: &FrontMatter) -> Result<(), PromptError> {
    let bad = |message: String| Err(PromptError::FrontMatter { path: path.to_owned(), message });
    if let Some(n) = front.num_images
        && !(1..=6).contains(&n)
    {
        return bad(format!("num_images = {n} is outside 1..=6"));
    }
    if let Some(f) = &front.output_format
        && !matches!(f.as_str(), "png" | "jpeg")
    {
        return bad(format!("output_format = {f:?}: use \"png\" or \"jpeg\""));
    }
    if let Some(quality) = &front.quality {
        quality.validate().map_err(|message| PromptError::FrontMatter { path: path.to_owned(), message })?;
    }
    for (name, preset) in &front.export {
        let usable =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !usable {
            return bad(format!("export.{name:?}: a preset's name may use only letters, digits, - and _"));
        }
        preset.validate().map_err(|m| PromptError::FrontMatter {
            path: path.to_owned(),
            message: format!("export.{name}: {m}"),
        })?;
    }
    if let Some(m) = &front.model
        && m.trim().is_empty()
    {
        return bad("model is empty".into());
    }
    if let Some(s) = &front.size {
        let probe = Params { size: Some(s.clone()), ..Params::default() };
        let named = s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if probe.dimensions().is_none() && !named {
            return bad(format!(
                "size = {s:?}: use WIDTHxHEIGHT (e.g. 2048x2048) or a size name (e.g. square_hd)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Template, PromptError> {
        Template::parse(Path::new("t.txt"), text)
    }

    fn render(t: &Template, cols: &[(&str, &str)]) -> Result<String, String> {
        let mut out = String::new();
        t.body()
            .render_into(&mut out, |n| cols.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
            .map_err(str::to_owned)?;
        Ok(out)
    }

    #[test]
    fn placeholders_and_escapes_render() {
        let t = parse("Put the {name} ({ color }) on marble. Literal {{braces}} stay.\n").unwrap();
        let out = render(&t, &[("name", "mug"), ("color", "red")]).unwrap();
        assert_eq!(out, "Put the mug (red) on marble. Literal {braces} stay.");
        assert_eq!(t.body().placeholders().collect::<Vec<_>>(), ["name", "color"]);
    }

    #[test]
    fn unknown_placeholder_is_named_at_render() {
        let t = parse("A {name} in {colour}").unwrap();
        assert_eq!(render(&t, &[("name", "mug")]).unwrap_err(), "colour");
    }

    #[test]
    fn syntax_errors_name_the_file_line() {
        let err = parse("+++\nseed = 1\n+++\n\nfirst\nsecond {name\n").unwrap_err();
        assert!(matches!(err, PromptError::Syntax { line: 6, .. }), "{err}");
        let err = parse("a } b").unwrap_err();
        assert!(err.to_string().contains("stray `}`"), "{err}");
        let err = parse("a {} b").unwrap_err();
        assert!(err.to_string().contains("empty placeholder"), "{err}");
        assert!(matches!(parse("+++\n+++\n  \n").unwrap_err(), PromptError::Empty { .. }));
    }

    #[test]
    fn front_matter_sets_task_model_and_params() {
        let t = parse(
            "+++\nmodel = \"seedream-v3\"\ntask = \"generate\"\nnum_images = 2\noutput_format = \"jpeg\"\nsize = \"2048x1152\"\nseed = 42\n+++\nA {category} banner\n",
        )
        .unwrap();
        assert_eq!(t.task(), Task::Generate);
        assert_eq!(t.front().model.as_deref(), Some("seedream-v3"));
        let p = t.params();
        assert_eq!((p.num_images, p.seed, p.dimensions()), (2, Some(42), Some((2048, 1152))));
        assert_eq!(p.output_format.as_deref(), Some("jpeg"));
        assert_eq!(render(&t, &[("category", "Kitchen")]).unwrap(), "A Kitchen banner");
    }

    #[test]
    fn front_matter_rejects_unknown_keys_and_bad_values() {
        let err = parse("+++\nseed = 1\nnum_image = 2\n+++\nx").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("num_image") && msg.contains("line 3"), "{msg}");
        assert!(parse("+++\nnum_images = 7\n+++\nx").unwrap_err().to_string().contains("1..=6"));
        assert!(parse("+++\noutput_format = \"gif\"\n+++\nx").is_err());
        assert!(parse("+++\ntask = \"paint\"\n+++\nx").is_err());
        assert!(parse("+++\nsize = \"big x\"\n+++\nx").is_err());
        assert!(parse("+++\nsize = \"square_hd\"\n+++\nx").is_ok());
        assert!(parse("+++\nseed = 1\nno closing").unwrap_err().to_string().contains("closing"));
    }

    #[test]
    fn front_matter_sets_quality_and_exports() {
        let t = parse(
            "+++\nsize = \"2048x2048\"\n[quality]\nmax_shift = 0.1\n[quality.checks]\ncolor = false\n\
             [quality.background]\nwhite_border = 6\nmin_fill = 0.85\n\
             [export.amazon]\ncanvas = \"2000x2000\"\nbackground = \"#ffffff\"\nformat = \"jpeg\"\nquality = 90\n+++\nx",
        )
        .unwrap();
        let q = t.quality();
        assert!(q.enabled && !q.checks.color && q.checks.shape);
        assert_eq!((q.max_shift, q.expected_size), (0.1, Some((2048, 2048))));
        assert_eq!((q.background.white_border, q.background.min_fill), (Some(6), Some(0.85)));
        assert_eq!(t.exports()["amazon"].canvas.as_deref(), Some("2000x2000"));
        // Absent, the gate is on with its defaults.
        assert_eq!(parse("x").unwrap().quality(), QualitySettings::default());
    }

    #[test]
    fn bad_quality_and_export_tables_are_refused() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        assert!(err("+++\n[quality]\nmax_shfit = 0.1\n+++\nx").contains("max_shfit"));
        assert!(err("+++\n[quality]\nmax_shift = 2.0\n+++\nx").contains("0..=1"));
        assert!(err("+++\n[quality.checks]\ncolour = false\n+++\nx").contains("colour"));
        assert!(err("+++\n[export.web]\nformat = \"webp\"\nquality = 80\n+++\nx").contains("export.web"));
        assert!(err("+++\n[export.\"a/b\"]\nformat = \"png\"\n+++\nx").contains("name"));
        assert!(err("+++\n[export.x]\ncanvas = \"2000x2000\"\n+++\nx").contains("format"));
    }

    #[test]
    fn no_front_matter_means_edit_one_image() {
        let t = parse("\u{feff}Just {name}").unwrap();
        assert_eq!(t.task(), Task::Edit);
        assert_eq!(t.params(), Params::default());
        assert_eq!(t.front(), &FrontMatter::default());
    }

    #[test]
    fn control_characters_in_a_template_name_their_line() {
        let err = parse("+++\nseed = 1\n+++\nfirst line\nsecond \x1b[2J line\n").unwrap_err();
        assert!(matches!(err, PromptError::Syntax { line: 5, .. }), "{err}");
        assert!(err.to_string().contains("U+001B (ESC)"), "{err}");
        assert!(parse("a\tb\r\nc").is_ok(), "tab, CR and LF are text");
        assert!(parse("bell\x07").unwrap_err().to_string().contains("BEL"));
    }

    #[test]
    fn rendered_prompts_are_bounded_and_free_of_control_characters() {
        assert_eq!(check_rendered("Put the mug\ton oak,\r\nsoft light", 100), Ok(()));
        assert_eq!(check_rendered(&"é".repeat(100), 100), Ok(()), "characters, not bytes");
        let err = check_rendered(&"x".repeat(101), 100).unwrap_err();
        assert!(err.contains("longer than 100 characters (101 in all)"), "{err}");
        for (text, name) in
            [("a\0b", "NUL"), ("a\x1bb", "ESC"), ("a\x07b", "BEL"), ("a\x7fb", "DEL"), ("a\u{85}b", "C1")]
        {
            let err = check_rendered(text, 100).unwrap_err();
            assert!(err.contains(name) && err.contains("at character 2"), "{text:?}: {err}");
        }
        assert_eq!(max_prompt_chars(ProviderKind::Fal), DEFAULT_MAX_PROMPT_CHARS);
    }

    #[test]
    fn shipped_templates_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../prompts");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            Template::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
        assert!(n >= 4, "at least four shipped templates");
    }
}
