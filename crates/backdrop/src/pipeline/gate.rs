//! The quality gate in the pipeline: before a row is `done`, each of its verified outputs is
//! judged against its input ([`crate::quality::assess`], or `assess_output` for text-to-image
//! rows) off the async runtime's threads, a few at a time; a flagged row is held as `review`.
//! Owns [`Gate`]: fetching and caching decoded inputs, and the verdicts' stored form [`Judgement`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::DynamicImage;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::domain::{JobSpec, Task};
use crate::fetch::{DownloadClient, guard};
use crate::provider::http::{InlinePolicy, resolve_input};
use crate::quality::{self, QualitySettings, Verdict};

/// Decoded inputs kept at once: rows of one catalog often share a picture, and a decoded
/// 4096² picture is 64 MB, so the cache stays small and is emptied when full.
const CACHE_ENTRIES: usize = 16;

/// One output's judgement, as stored in `jobs.quality`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputJudgement {
    /// The output's index within its row.
    pub index: u32,
    /// Every check's score and outcome, when the output could be checked.
    pub verdict: Option<Verdict>,
    /// Why it could not be checked (the input unreachable, an image that does not decode).
    pub error: Option<String>,
}

/// A row's judgement: one entry per output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Per output, in index order.
    pub outputs: Vec<OutputJudgement>,
    /// For a held row whose input is a URL: the copy of the input the gate judged against, kept
    /// under the output folder (relative path, [`INPUT_COPIES`]), so the report's gallery shows
    /// and compares the very pixels the gate saw without fetching anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_copy: Option<String>,
}

/// The folder, under the output folder, of the inputs the gate kept for held rows, named by
/// their content's sha256: a name the default output names cannot produce (a SKU kept verbatim
/// has no lowercase letters, a hashed one always has a `~`).
pub const INPUT_COPIES: &str = "review-inputs";

impl Judgement {
    /// True when an output was flagged or could not be checked: the row is held for review. An
    /// output that could not be checked is held rather than passed, since nothing vouches for it.
    #[must_use]
    pub fn holds(&self) -> bool {
        self.outputs.iter().any(|o| o.error.is_some() || o.verdict.as_ref().is_some_and(|v| !v.passed()))
    }

    /// The reasons for holding, joined with `; ` (empty when it passed).
    #[must_use]
    pub fn reasons(&self) -> String {
        let mut parts = Vec::new();
        for o in &self.outputs {
            if let Some(e) = &o.error {
                parts.push(format!("output {}: not checked: {e}", o.index));
            } else if let Some(v) = &o.verdict
                && !v.passed()
            {
                parts.push(format!("output {}: {}", o.index, v.summary()));
            }
        }
        parts.join("; ")
    }
}

/// The gate of one run: its template's settings, the downloads' guarded client for inputs, a
/// bound on checks at once and a small cache of decoded inputs.
pub struct Gate {
    settings: QualitySettings,
    client: DownloadClient,
    /// Where a held row's fetched input is kept for the gallery ([`INPUT_COPIES`]).
    out_dir: PathBuf,
    max_input_bytes: u64,
    permits: Semaphore,
    cache: Mutex<HashMap<String, Fetched>>,
}

/// A decoded input and, for a URL, the bytes it was decoded from (kept if the row is held).
type Fetched = (Arc<DynamicImage>, Option<Arc<Vec<u8>>>);

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate judging outputs with `settings`, keeping held rows' fetched inputs under `out_dir`;
    /// inputs larger than `max_input_bytes` are not downloaded. At most one check per CPU runs at
    /// once.
    #[must_use]
    pub fn new(
        settings: QualitySettings,
        client: DownloadClient,
        out_dir: &Path,
        max_input_bytes: u64,
    ) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self {
            settings,
            client,
            out_dir: out_dir.to_path_buf(),
            max_input_bytes,
            permits: Semaphore::new(cpus),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Judges a row's outputs (each its index and the file holding its received, verified
    /// bytes) against its inputs. Never fails: what cannot be checked is recorded as such.
    pub async fn judge(&self, task: Task, inputs: &[String], outputs: &[(u32, &Path)]) -> Judgement {
        let (input, fetched) = match (task, inputs.first()) {
            (Task::Edit, Some(reference)) => match self.input(reference).await {
                Ok((image, bytes)) => (Some(image), bytes),
                Err(e) => {
                    warn!(error = %e, "quality gate: the input cannot be read; holding the row for review");
                    return Judgement {
                        outputs: outputs
                            .iter()
                            .map(|&(index, _)| OutputJudgement {
                                index,
                                verdict: None,
                                error: Some(e.clone()),
                            })
                            .collect(),
                        input_copy: None,
                    };
                }
            },
            _ => (None, None),
        };
        let mut judged = Vec::with_capacity(outputs.len());
        for &(index, path) in outputs {
            let (verdict, error) = match self.check(input.clone(), path).await {
                Ok(v) => (Some(v), None),
                Err(e) => (None, Some(e)),
            };
            judged.push(OutputJudgement { index, verdict, error });
        }
        let mut judgement = Judgement { outputs: judged, input_copy: None };
        if judgement.holds()
            && let Some(bytes) = fetched
        {
            judgement.input_copy = self.keep_input(&bytes).await;
        }
        judgement
    }

    /// Writes a held row's fetched input under the output folder, once per content (written
    /// whole, then renamed into place). A failure costs the gallery its picture, not the row:
    /// it is logged and `None` returned.
    async fn keep_input(&self, bytes: &[u8]) -> Option<String> {
        use sha2::{Digest as _, Sha256};
        // Outputs in a bucket: there is no local output folder to keep it in.
        if crate::fetch::object::is_object_url(&self.out_dir.to_string_lossy()) {
            return None;
        }
        let name = format!("{INPUT_COPIES}/{}", hex::encode(Sha256::digest(bytes)));
        let path = self.out_dir.join(&name);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Some(name);
        }
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let written = async {
            tokio::fs::create_dir_all(self.out_dir.join(INPUT_COPIES)).await?;
            tokio::fs::write(&tmp, bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        match written {
            Ok(()) => Some(name),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                warn!(error = %e, "quality gate: cannot keep a copy of the input for the report");
                None
            }
        }
    }

    async fn check(&self, input: Option<Arc<DynamicImage>>, path: &Path) -> Result<Verdict, String> {
        let bytes =
            tokio::fs::read(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || {
            let output = quality::decode(&bytes, "output")?;
            match input {
                Some(input) => quality::assess(&input, &output, &settings),
                None => quality::assess_output(&output, &settings),
            }
        })
        .await
        .map_err(|e| format!("the check stopped: {e}"))?
        .map_err(|e| e.to_string())
    }

    /// The decoded input, from the cache or fetched (a URL through the downloads' guarded
    /// client, under the downloads' size cap) or read (a local file).
    async fn input(&self, reference: &str) -> Result<Fetched, String> {
        if let Ok(cache) = self.cache.lock()
            && let Some((image, bytes)) = cache.get(reference)
        {
            return Ok((Arc::clone(image), bytes.clone()));
        }
        let bytes = Arc::new(self.input_bytes(reference).await?);
        // Only a URL's bytes are kept (for a held row's copy): a file or a data: URI is at hand.
        // The scheme is read from the first characters: a data: URI may be megabytes long.
        let scheme = reference.get(..8).unwrap_or(reference).to_ascii_lowercase();
        let kept =
            (scheme.starts_with("http://") || scheme.starts_with("https://")).then(|| Arc::clone(&bytes));
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let decoded = tokio::task::spawn_blocking(move || quality::decode(&bytes, "input"))
            .await
            .map_err(|e| format!("the decode stopped: {e}"))?
            .map_err(|e| e.to_string())?;
        let decoded = Arc::new(decoded);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(reference.to_owned(), (Arc::clone(&decoded), kept.clone()));
        }
        Ok((decoded, kept))
    }

    async fn input_bytes(&self, reference: &str) -> Result<Vec<u8>, String> {
        let lower = reference.get(..8).unwrap_or(reference).to_ascii_lowercase();
        if lower.starts_with("data:") {
            return data_uri_bytes(reference).ok_or_else(|| "the input data URI does not decode".to_owned());
        }
        let fetched = if lower.starts_with("http://") || lower.starts_with("https://") {
            reference.to_owned()
        } else if reference.contains("://") {
            // A bucket object: read through a presigned URL, as the provider reads it, so the
            // cloud credentials serve only to sign.
            resolve_input(reference, InlinePolicy::refuse()).await.map_err(|e| e.to_string())?
        } else {
            return tokio::fs::read(reference)
                .await
                .map_err(|e| format!("cannot read the input {reference}: {e}"));
        };
        let url = url::Url::parse(&fetched).map_err(|e| format!("the input URL does not parse: {e}"))?;
        guard::check_url(&url, self.client.policy())
            .map_err(|why| format!("the input URL is refused: {why}"))?;
        let response =
            self.client.client().get(url).send().await.map_err(|e| format!("cannot fetch the input: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the input's host answered HTTP {}", status.as_u16()));
        }
        let limit = usize::try_from(self.max_input_bytes).unwrap_or(usize::MAX);
        crate::provider::http::read_capped(response, limit)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| format!("cannot read the input: {e}"))
    }
}

/// The bytes of a base64 `data:` URI (the only kind a catalog or the inliner makes).
fn data_uri_bytes(uri: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let (head, body) = uri.split_once(',')?;
    head.ends_with(";base64").then_some(())?;
    base64::engine::general_purpose::STANDARD.decode(body.trim()).ok()
}

/// The scheduler's one call: with a gate, a row's stored judgement (JSON) and whether it is held
/// for review; without one (`--no-quality-gate`, `[quality] enabled = false`), nothing and done.
pub async fn judge_row(
    gate: Option<&Gate>,
    job: &JobSpec,
    outputs: &[(u32, &Path)],
) -> (Option<String>, bool) {
    let Some(gate) = gate else { return (None, false) };
    let judgement = gate.judge(job.task, &job.inputs, outputs).await;
    let held = judgement.holds();
    if held {
        warn!(reasons = %judgement.reasons(), "quality gate: held for review");
    }
    (serde_json::to_string(&judgement).ok(), held)
}
