//! Exports in a run and in `accept`: [`Exporter`] renders a row's outputs through the template's
//! `[export.NAME]` presets on blocking threads (one per CPU at most), writes each file durably
//! through the run's [`Persister`] like a download, reads it back, and answers what to record;
//! [`backfill`] makes what `done` rows lack, with no request to any provider.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::gate::{Judgement, OutputJudgement};
use crate::domain::{SavedExport, SavedOutput};
use crate::fetch::{self, FetchError, Persister};
use crate::quality::{self, ExportPreset, QualityError};
use crate::store::{ExportCandidate, Store, StoreError};

/// Rows read per page by [`backfill`].
const PAGE: i64 = 256;

/// Why an export could not be made. The original is paid for and durable either way.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The original cannot be read, or is no longer the file that was recorded.
    #[error("output {index}: the original {path} {why}")]
    Source {
        /// The output's index.
        index: u32,
        /// The original, relative to the output folder.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Decoding the original or rendering the preset failed.
    #[error("export {preset} of output {index}: {source}")]
    Render {
        /// The preset's name.
        preset: String,
        /// The output's index.
        index: u32,
        /// The image libraries' error.
        #[source]
        source: QualityError,
    },
    /// Writing, syncing or reading back the file failed.
    #[error("export {preset} of output {index}: {source}")]
    Write {
        /// The preset's name (`*` when the output's files failed together).
        preset: String,
        /// The output's index.
        index: u32,
        /// The file error.
        #[source]
        source: FetchError,
    },
    /// A blocking task stopped (a panic in an image library).
    #[error("the export stopped: {0}")]
    Stopped(String),
}

impl ExportError {
    /// The output folder itself is failing (full, read-only...): every later file would fail too.
    #[must_use]
    pub fn is_output_failure(&self) -> bool {
        matches!(self, Self::Write { source, .. } if source.is_output_failure())
    }

    /// Trying again later may succeed (a write that failed); the same pixels give the same
    /// render failure, and a changed original stays changed.
    #[must_use]
    pub const fn is_retryable(&self) -> bool {
        matches!(self, Self::Write { .. } | Self::Stopped(_))
    }

    /// The file error, when the output folder is failing.
    #[must_use]
    pub const fn output_failure(&self) -> Option<&FetchError> {
        match self {
            Self::Write { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One preset, with its recipe: the sha256 of its settings, so a changed preset is made again.
#[derive(Debug, Clone)]
struct Preset {
    name: String,
    preset: ExportPreset,
    recipe: String,
}

/// The sha256 of a preset's settings (its JSON form, fields in declaration order).
#[must_use]
pub fn recipe(preset: &ExportPreset) -> String {
    let json = serde_json::to_string(preset).unwrap_or_default();
    format!("{:x}", Sha256::digest(json.as_bytes()))
}

/// Makes a row's exports under one output folder.
pub struct Exporter {
    presets: Vec<Preset>,
    out_dir: PathBuf,
    persister: Persister,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.presets.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("Exporter").field("presets", &names).field("out_dir", &self.out_dir).finish()
    }
}

impl Exporter {
    /// An exporter for `presets` under `out_dir`, writing through `persister` (which must write
    /// to the same folder); `None` without presets.
    #[must_use]
    pub fn new(
        presets: &BTreeMap<String, ExportPreset>,
        out_dir: &Path,
        persister: Persister,
    ) -> Option<Self> {
        if presets.is_empty() {
            return None;
        }
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Some(Self {
            presets: presets
                .iter()
                .map(|(name, preset)| Preset {
                    name: name.clone(),
                    preset: preset.clone(),
                    recipe: recipe(preset),
                })
                .collect(),
            out_dir: out_dir.to_path_buf(),
            persister,
            permits: Arc::new(Semaphore::new(cpus)),
        })
    }

    /// The presets as JSON, as [`Store::save_export_settings`] keeps them for `accept`.
    #[must_use]
    pub fn presets_json(presets: &BTreeMap<String, ExportPreset>) -> String {
        serde_json::to_string(presets).unwrap_or_else(|_| "{}".into())
    }

    /// The presets from their JSON form.
    ///
    /// # Errors
    /// What does not parse.
    pub fn presets_from_json(json: &str) -> Result<BTreeMap<String, ExportPreset>, String> {
        serde_json::from_str(json).map_err(|e| format!("the recorded export presets do not parse: {e}"))
    }

    /// The output folder.
    #[must_use]
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Every export of `outputs` that is missing or stale in `have` (`(index, preset, recipe,
    /// source sha256)`, as recorded): `(output position in outputs, preset position)`.
    fn missing(
        &self,
        outputs: &[SavedOutput],
        have: &[(u32, String, String, String)],
    ) -> Vec<(usize, usize)> {
        let mut wanted = Vec::new();
        for (o, output) in outputs.iter().enumerate() {
            for (p, preset) in self.presets.iter().enumerate() {
                let current = have.iter().any(|(index, name, recipe, source)| {
                    *index == output.index
                        && *name == preset.name
                        && *recipe == preset.recipe
                        && *source == output.sha256
                });
                if !current {
                    wanted.push((o, p));
                }
            }
        }
        wanted
    }

    /// Makes every export of `outputs` (durable and verified, under the output folder) that
    /// `have` lacks: per output, the original is read, checked against its sha256 and decoded
    /// once, every preset rendered and staged on a blocking thread; the files are then made
    /// durable together (`urgent`: sync at once rather than wait for company) and read back.
    ///
    /// # Errors
    /// The first [`ExportError`]; files already renamed into place stay (they are made again
    /// and replaced next time).
    pub async fn export(
        &self,
        outputs: &[SavedOutput],
        have: &[(u32, String, String, String)],
        urgent: bool,
    ) -> Result<Vec<SavedExport>, ExportError> {
        let wanted = self.missing(outputs, have);
        let mut made = Vec::with_capacity(wanted.len());
        for (o, output) in outputs.iter().enumerate() {
            let presets: Vec<Preset> =
                wanted.iter().filter(|(wo, _)| *wo == o).map(|(_, p)| self.presets[*p].clone()).collect();
            if presets.is_empty() {
                continue;
            }
            let staged = self.render_and_stage(output.clone(), presets.clone()).await?;
            let saved = self
                .persister
                .persist(staged, urgent)
                .await
                .map_err(|source| ExportError::Write { preset: "*".into(), index: output.index, source })?;
            let out_dir = self.out_dir.clone();
            let check = saved.clone();
            tokio::task::spawn_blocking(move || {
                check.iter().try_for_each(|s| fetch::export::verify(&out_dir, s))
            })
            .await
            .map_err(|e| ExportError::Stopped(e.to_string()))?
            .map_err(|source| ExportError::Write {
                preset: "*".into(),
                index: output.index,
                source,
            })?;
            for (preset, file) in presets.into_iter().zip(saved) {
                made.push(SavedExport {
                    index: output.index,
                    preset: preset.name,
                    path: file.path,
                    sha256: file.sha256,
                    bytes: file.bytes,
                    width: file.width,
                    height: file.height,
                    content_type: file.content_type,
                    recipe: preset.recipe,
                    source_sha256: output.sha256.clone(),
                });
            }
        }
        Ok(made)
    }

    async fn render_and_stage(
        &self,
        output: SavedOutput,
        presets: Vec<Preset>,
    ) -> Result<Vec<fetch::Downloaded>, ExportError> {
        let _permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|e| ExportError::Stopped(e.to_string()))?;
        let out_dir = self.out_dir.clone();
        tokio::task::spawn_blocking(move || {
            let index = output.index;
            let source = |why: String| ExportError::Source { index, path: output.path.clone(), why };
            let bytes = std::fs::read(out_dir.join(&output.path))
                .map_err(|e| source(format!("cannot be read: {e}")))?;
            if format!("{:x}", Sha256::digest(&bytes)) != output.sha256 {
                return Err(source("no longer matches its recorded sha256".into()));
            }
            let image = quality::decode(&bytes, "output").map_err(|e| ExportError::Render {
                preset: "*".into(),
                index,
                source: e,
            })?;
            let mut staged = Vec::with_capacity(presets.len());
            for p in presets {
                let encoded = quality::render_export(&image, &p.preset).map_err(|e| ExportError::Render {
                    preset: p.name.clone(),
                    index,
                    source: e,
                })?;
                let format = p.preset.format;
                let relative = fetch::export::export_path(&p.name, &output.path, format.ext());
                staged.push(
                    fetch::export::stage(&out_dir, &relative, index, &encoded, format.content_type())
                        .map_err(|e| ExportError::Write { preset: p.name.clone(), index, source: e })?,
                );
            }
            Ok(staged)
        })
        .await
        .map_err(|e| ExportError::Stopped(e.to_string()))?
    }
}

/// The scheduler's one call, for a row whose outputs are durable and judged: without an
/// exporter or for a row held for review, nothing; otherwise its exports. An export that cannot
/// be made for a reason of its own (a render failure, a changed original) holds the row for
/// review with that reason, so a paid row is never failed nor paid again for it.
///
/// # Errors
/// The file error when the output folder is failing: the caller keeps the row for the next run.
pub async fn export_row(
    exporter: Option<&Exporter>,
    outputs: &[SavedOutput],
    quality: Option<String>,
    review: bool,
    urgent: bool,
) -> Result<(Option<String>, bool, Vec<SavedExport>), FetchError> {
    let Some(exporter) = exporter.filter(|_| !review) else { return Ok((quality, review, Vec::new())) };
    match exporter.export(outputs, &[], urgent).await {
        Ok(made) => Ok((quality, false, made)),
        Err(ExportError::Write { source, .. }) if source.is_output_failure() => Err(source),
        Err(e) => {
            warn!(error = %e, "exports cannot be made: the row is held for review");
            let mut judgement: Judgement =
                quality.as_deref().and_then(|q| serde_json::from_str(q).ok()).unwrap_or_default();
            let index = match &e {
                ExportError::Source { index, .. }
                | ExportError::Render { index, .. }
                | ExportError::Write { index, .. } => *index,
                ExportError::Stopped(_) => 0,
            };
            judgement.outputs.push(OutputJudgement {
                index,
                verdict: None,
                error: Some(format!("exports not made: {e}")),
            });
            Ok((serde_json::to_string(&judgement).ok(), true, Vec::new()))
        }
    }
}

/// What [`backfill`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backfilled {
    /// Rows that got exports.
    pub rows: u64,
    /// Export files made.
    pub files: u64,
    /// Rows whose exports could not be made (each logged; tried again next time).
    pub failed: u64,
}

/// Makes the exports `done` rows lack: a row reused from another, a preset added or changed
/// since, or files lost with their records. Reads only the output folder, never a provider.
///
/// # Errors
/// A database error; with the output folder failing, it stops and answers what it did.
pub async fn backfill(store: &Store, exporter: &Exporter) -> Result<Backfilled, StoreError> {
    let mut done = Backfilled::default();
    let mut after = 0;
    loop {
        let page = store.export_candidates(after, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.job_id;
        for ExportCandidate { job_id, sku, outputs, have } in page {
            if exporter.missing(&outputs, &have).is_empty() {
                continue;
            }
            match exporter.export(&outputs, &have, true).await {
                Ok(made) => {
                    store.record_exports(job_id, &made).await?;
                    done.rows += 1;
                    done.files += made.len() as u64;
                }
                Err(e) => {
                    warn!(sku = %crate::domain::text::terminal_safe_line(&sku), error = %e, "cannot make this row's exports");
                    done.failed += 1;
                    if e.is_output_failure() {
                        return Ok(done);
                    }
                }
            }
        }
    }
    if done.rows > 0 {
        info!(rows = done.rows, files = done.files, "made the exports done rows lacked (no request sent)");
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presets() -> BTreeMap<String, ExportPreset> {
        let mut p = BTreeMap::new();
        p.insert("square".to_owned(), toml::from_str("canvas = \"64x64\"\nformat = \"jpeg\"").unwrap());
        p.insert("small".to_owned(), toml::from_str("resize = \"20x20\"\nformat = \"webp\"").unwrap());
        p
    }

    fn original(dir: &Path) -> SavedOutput {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(40, 20)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        std::fs::create_dir_all(dir.join("A")).unwrap();
        std::fs::write(dir.join("A/0.png"), &png).unwrap();
        SavedOutput {
            index: 0,
            path: "A/0.png".into(),
            sha256: format!("{:x}", Sha256::digest(&png)),
            bytes: png.len() as u64,
            width: 40,
            height: 20,
            content_type: "image/png".into(),
            source_url: String::new(),
        }
    }

    #[tokio::test]
    async fn every_preset_of_every_output_is_made_once_and_a_changed_preset_again() {
        let dir = tempfile::tempdir().unwrap();
        let out = original(dir.path());
        let exporter = Exporter::new(&presets(), dir.path(), Persister::start(dir.path())).unwrap();
        let made = exporter.export(std::slice::from_ref(&out), &[], true).await.unwrap();
        assert_eq!(made.len(), 2);
        let small = made.iter().find(|e| e.preset == "small").unwrap();
        assert_eq!((small.path.as_path(), small.width, small.height), (Path::new("small/A/0.webp"), 20, 10));
        let square = made.iter().find(|e| e.preset == "square").unwrap();
        assert_eq!((square.width, square.height, square.content_type.as_str()), (64, 64, "image/jpeg"));
        let bytes = std::fs::read(dir.path().join(&square.path)).unwrap();
        assert_eq!(format!("{:x}", Sha256::digest(&bytes)), square.sha256);
        let have: Vec<_> = made
            .iter()
            .map(|e| (e.index, e.preset.clone(), e.recipe.clone(), e.source_sha256.clone()))
            .collect();
        assert!(exporter.export(std::slice::from_ref(&out), &have, true).await.unwrap().is_empty());
        let mut changed = presets();
        changed.insert("square".to_owned(), toml::from_str("canvas = \"32x32\"\nformat = \"png\"").unwrap());
        let exporter = Exporter::new(&changed, dir.path(), Persister::start(dir.path())).unwrap();
        let again = exporter.export(std::slice::from_ref(&out), &have, true).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].path, Path::new("square/A/0.png"));
    }

    #[tokio::test]
    async fn a_changed_original_holds_the_row_for_review_and_a_held_row_gets_none() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = original(dir.path());
        let exporter = Exporter::new(&presets(), dir.path(), Persister::start(dir.path())).unwrap();
        let (_, review, made) =
            export_row(Some(&exporter), std::slice::from_ref(&out), None, true, true).await.unwrap();
        assert!(review && made.is_empty());
        out.sha256 = "0".repeat(64);
        let (quality, review, made) =
            export_row(Some(&exporter), std::slice::from_ref(&out), None, false, true).await.unwrap();
        assert!(review && made.is_empty());
        let judgement: Judgement = serde_json::from_str(&quality.unwrap()).unwrap();
        assert!(judgement.reasons().contains("no longer matches"), "{}", judgement.reasons());
        assert!(!dir.path().join("square").exists());
    }
}
