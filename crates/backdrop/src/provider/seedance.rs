//! The Seedance REST protocol: synchronous text-to-image, edits submitted with `async: true` (or
//! synchronously with `--sync`) and polled at `/v1/requests/{id}`, the id checked and
//! percent-encoded as one path segment. Owns [`Seedance`], its [`SeedanceOptions`] and the
//! request and answer shapes of that API.

use serde::{Deserialize, Serialize};

use super::http::{self, Auth, Dialect, InlinePolicy};
use super::{JobResult, PollOutcome, Provider, ProviderError, Submission};
use crate::domain::ApiKey;
use crate::domain::job::{JobSpec, Task};
use crate::domain::{OutputRef, RequestRef};

/// The public endpoint.
pub const DEFAULT_BASE_URL: &str = "https://api.seedance.it.com";

/// Text-to-image (always synchronous).
const GENERATE_PATH: &str = "/v1/images/generate";
/// The one documented edit endpoint; the model is implied by the path.
const EDIT_PATH: &str = "/v1/seedream/v4.5/edit";
/// Status of an asynchronous request.
const REQUESTS_PATH: &str = "/v1/requests";

/// How edits are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedanceOptions {
    /// Send edits without `async` and get the images in the answer (one long request).
    pub sync: bool,
    /// Sent as `webhook_url` in every edit body when set.
    pub webhook_url: Option<String>,
    /// Local input files.
    pub inline: InlinePolicy,
}

/// A Seedance API client.
#[derive(Debug, Clone)]
pub struct Seedance {
    client: reqwest::Client,
    base: String,
    auth: Auth,
    opts: SeedanceOptions,
}

impl Seedance {
    /// A client for `base_url` (use [`DEFAULT_BASE_URL`] for the real service).
    ///
    /// # Errors
    /// [`ProviderError::Input`] when the base URL is not an http(s) URL or the key cannot be put
    /// in a header.
    pub fn new(
        client: reqwest::Client,
        base_url: &str,
        key: ApiKey,
        opts: SeedanceOptions,
    ) -> Result<Self, ProviderError> {
        check_base(base_url)?;
        Ok(Self { client, base: base_url.trim_end_matches('/').to_owned(), auth: Auth::bearer(key)?, opts })
    }

    async fn generate(&self, job: &JobSpec) -> Result<Submission, ProviderError> {
        let (width, height) = job.params.dimensions().map_or((None, None), |(w, h)| (Some(w), Some(h)));
        if let (None, Some(size)) = (width, &job.params.size) {
            tracing::warn!(sku = %job.sku, size, "seedance text-to-image takes WIDTHxHEIGHT sizes; using its default");
        }
        let body = GenerateBody {
            model: &job.model,
            prompt: &job.prompt,
            width,
            height,
            num_images: job.params.num_images,
            seed: job.params.seed,
        };
        let request = self.client.post(http::join(&self.base, GENERATE_PATH)).json(&body);
        let answer = http::send(request, &self.auth, Dialect::Seedance, "seedance generate").await?;
        let generated: GenerateAnswer = answer.json("seedance generate answer", &self.auth)?;
        let result = generated.outputs.into_result()?;
        Ok(Submission::Completed { request_id: recordable(generated.id), result })
    }

    async fn edit(&self, job: &JobSpec) -> Result<Submission, ProviderError> {
        if job.inputs.is_empty() {
            return Err(ProviderError::Input("an edit needs at least one input image".into()));
        }
        if job.inputs.len() > 10 {
            return Err(ProviderError::Input(format!(
                "{} input images; the edit endpoint takes at most 10",
                job.inputs.len()
            )));
        }
        let mut image_urls = Vec::with_capacity(job.inputs.len());
        for input in &job.inputs {
            image_urls.push(http::resolve_input(input, self.opts.inline).await?);
        }
        let body = EditBody {
            prompt: &job.prompt,
            image_urls,
            num_images: job.params.num_images,
            output_format: job.params.output_format.as_deref(),
            seed: job.params.seed,
            r#async: !self.opts.sync,
            webhook_url: self.opts.webhook_url.as_deref(),
        };
        let request = self.client.post(http::join(&self.base, EDIT_PATH)).json(&body);
        let answer = http::send(request, &self.auth, Dialect::Seedance, "seedance edit").await?;
        let parsed: EditAnswer = answer.json("seedance edit answer", &self.auth)?;
        // Tolerant of either shape whatever was asked: images mean done, an id means queued.
        if parsed.outputs.has_images() {
            let result = parsed.outputs.into_result()?;
            return Ok(Submission::Completed { request_id: recordable(parsed.request_id), result });
        }
        match parsed.request_id {
            Some(request_id) if !request_id.is_empty() => {
                // The id becomes a path segment of every poll: one that is not a plain segment
                // (`..` would poll `/v1/requests` itself) cannot be followed, so the paid request
                // is ambiguous rather than failed.
                http::check_request_id(&request_id).map_err(|why| {
                    ProviderError::Decode(format!(
                        "seedance accepted the edit but {}",
                        self.auth.redact(&why)
                    ))
                })?;
                Ok(Submission::Accepted(RequestRef {
                    request_id,
                    status_url: None,
                    response_url: None,
                    cancel_url: None,
                }))
            }
            _ => {
                Err(ProviderError::Decode("seedance edit answer has neither images nor a request_id".into()))
            }
        }
    }
}

/// A synchronous answer's id, kept only if it could be used later: the images are already in
/// hand, so an unusable id is dropped (with a warning) rather than holding the row up.
fn recordable(id: Option<String>) -> Option<String> {
    let id = id.filter(|id| !id.is_empty())?;
    match http::check_request_id(&id) {
        Ok(()) => Some(id),
        Err(why) => {
            tracing::warn!(reason = %why, "ignoring the request id of a completed answer");
            None
        }
    }
}

fn check_base(base_url: &str) -> Result<(), ProviderError> {
    match url::Url::parse(base_url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        _ => Err(ProviderError::Input(format!("API base {base_url:?} is not an http(s) URL"))),
    }
}

impl Provider for Seedance {
    fn name(&self) -> &'static str {
        "seedance"
    }

    fn base_url(&self) -> &str {
        &self.base
    }

    fn answers_at_completion(&self, job: &JobSpec) -> bool {
        // Text-to-image is synchronous; an edit is unless sent with `async: true`.
        matches!(job.task, Task::Generate) || self.opts.sync
    }

    #[tracing::instrument(skip_all, fields(sku = %job.sku, job = job.id))]
    async fn submit(&self, job: &JobSpec) -> Result<Submission, ProviderError> {
        match job.task {
            Task::Generate => self.generate(job).await,
            Task::Edit => self.edit(job).await,
        }
    }

    #[tracing::instrument(skip_all, fields(request_id = %request.request_id))]
    async fn poll(&self, request: &RequestRef) -> Result<PollOutcome, ProviderError> {
        // Checked again here: a state file written before the check existed may hold any id.
        // Never sent, so the row waits (and a fresh run re-reads it) instead of polling elsewhere.
        http::check_request_id(&request.request_id).map_err(ProviderError::Decode)?;
        let mut url = url::Url::parse(&http::join(&self.base, REQUESTS_PATH))
            .map_err(|e| ProviderError::Input(format!("bad API base: {e}")))?;
        // `push` percent-encodes the segment (`?`, `#`, `%`, spaces...).
        url.path_segments_mut()
            .map_err(|()| ProviderError::Input("the API base cannot take a path".into()))?
            .push(&request.request_id);
        let answer =
            http::send(self.client.get(url), &self.auth, Dialect::Seedance, "seedance status").await?;
        let status: StatusAnswer = answer.json("seedance status answer", &self.auth)?;
        match status.status.as_deref() {
            Some("completed") => {
                let result = status.outputs.into_result().map_err(|e| {
                    ProviderError::Generation(format!("completed without a usable image: {e}"))
                })?;
                Ok(PollOutcome::Completed(result))
            }
            Some("failed") => {
                let message = status
                    .error
                    .as_ref()
                    .map_or_else(|| "the request failed (no reason given)".to_owned(), ErrorObject::describe);
                Err(ProviderError::Generation(http::truncate(&self.auth.redact(&message))))
            }
            // `queued`, `in_progress`, and anything undocumented: still running (only
            // `completed` and `failed` are final).
            _ => Ok(PollOutcome::Running { queue_position: status.queue_position }),
        }
    }
}

#[derive(Serialize)]
struct GenerateBody<'a> {
    model: &'a str,
    prompt: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    height: Option<u32>,
    num_images: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
}

#[derive(Serialize)]
struct EditBody<'a> {
    prompt: &'a str,
    image_urls: Vec<String>,
    num_images: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_format: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    r#async: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook_url: Option<&'a str>,
}

#[derive(Deserialize)]
struct Image {
    url: String,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    content_type: Option<String>,
}

/// The outputs of a finished request, in the same fields whichever endpoint sent them.
#[derive(Deserialize)]
struct Outputs {
    #[serde(default)]
    images: Option<Vec<Image>>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    credits_used: Option<f64>,
    #[serde(default)]
    credits_remaining: Option<f64>,
}

impl Outputs {
    fn has_images(&self) -> bool {
        self.images.as_ref().is_some_and(|i| !i.is_empty())
    }

    fn into_result(self) -> Result<JobResult, ProviderError> {
        let images: Vec<OutputRef> = self
            .images
            .unwrap_or_default()
            .into_iter()
            .map(|i| OutputRef { url: i.url, content_type: i.content_type, width: i.width, height: i.height })
            .collect();
        if images.is_empty() {
            return Err(ProviderError::Decode("the answer has no images".into()));
        }
        Ok(JobResult {
            images,
            charged: self.credits_used,
            credits_remaining: self.credits_remaining,
            seed: self.seed,
        })
    }
}

/// `POST /v1/images/generate`: `{id, images, ...}`.
#[derive(Deserialize)]
struct GenerateAnswer {
    #[serde(default)]
    id: Option<String>,
    #[serde(flatten)]
    outputs: Outputs,
}

/// `POST /v1/seedream/v4.5/edit`: `{request_id, status}` when queued, the outputs when synchronous.
#[derive(Deserialize)]
struct EditAnswer {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(flatten)]
    outputs: Outputs,
}

/// `GET /v1/requests/{id}`.
#[derive(Deserialize)]
struct StatusAnswer {
    #[serde(default)]
    status: Option<String>,
    #[serde(flatten)]
    outputs: Outputs,
    #[serde(default)]
    queue_position: Option<u32>,
    #[serde(default)]
    error: Option<ErrorObject>,
}

/// `error` in a failed status: an object `{code, message}` or, tolerantly, a plain string.
#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorObject {
    Text(String),
    Object {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
    },
}

impl ErrorObject {
    fn describe(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Object { code, message } => match (code, message) {
                (Some(c), Some(m)) => format!("{m} ({c})"),
                (None, Some(m)) => m.clone(),
                (Some(c), None) => c.clone(),
                (None, None) => "the request failed (no reason given)".to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_body_sends_async_only_when_asked() {
        let body = EditBody {
            prompt: "p",
            image_urls: vec!["https://x/a.png".into()],
            num_images: 2,
            output_format: None,
            seed: Some(7),
            r#async: true,
            webhook_url: Some("https://hook/x"),
        };
        let v = serde_json::to_value(&body).unwrap();
        assert_eq!(v["async"], true);
        assert_eq!(v["webhook_url"], "https://hook/x");
        assert_eq!(v["seed"], 7);
        assert!(v.get("output_format").is_none());
        let v = serde_json::to_value(EditBody { r#async: false, webhook_url: None, ..body }).unwrap();
        assert!(v.get("async").is_none() && v.get("webhook_url").is_none());
    }

    #[test]
    fn failure_reasons_read_both_shapes() {
        let e: ErrorObject = serde_json::from_str(r#"{"code":"content_policy","message":"nope"}"#).unwrap();
        assert_eq!(e.describe(), "nope (content_policy)");
        let e: ErrorObject = serde_json::from_str(r#""plain""#).unwrap();
        assert_eq!(e.describe(), "plain");
    }

    #[test]
    fn a_base_url_must_be_http() {
        let client = http::client(std::time::Duration::from_secs(5)).unwrap();
        let opts = SeedanceOptions { sync: false, webhook_url: None, inline: InlinePolicy::refuse() };
        let key = ApiKey::new("sk-sentinel-seed");
        assert!(Seedance::new(client.clone(), "ftp://x", key.clone(), opts.clone()).is_err());
        assert!(Seedance::new(client, DEFAULT_BASE_URL, key, opts).is_ok());
    }
}
