//! The fal.ai queue protocol: `POST {base}/{model_id}` answers with a request id and
//! three URLs that are stored and used exactly as given; polls `GET status_url`, then fetches the
//! output from `response_url`. Owns [`Fal`], [`FalOptions`] and the model-id mapping [`model_id`];
//! local input files go up to fal's storage first ([`upload`]).

pub mod upload;
pub mod webhook;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{self, Auth, Dialect, InlinePolicy};
use super::{JobResult, PollOutcome, Provider, ProviderError, Submission};
use crate::domain::ApiKey;
use crate::domain::job::{JobSpec, Task};
use crate::domain::{OutputRef, RequestRef};

/// The public queue endpoint.
pub const DEFAULT_BASE_URL: &str = "https://queue.fal.run";

/// fal silently keeps only the last 10 inputs; backdrop refuses more instead.
pub const MAX_INPUT_IMAGES: usize = 10;

/// The `image_size` enum names fal accepts (anything else is sent as given and fal judges).
const SIZE_NAMES: &[&str] = &[
    "square_hd",
    "square",
    "portrait_4_3",
    "portrait_16_9",
    "landscape_4_3",
    "landscape_16_9",
    "auto_2K",
    "auto_4K",
];

/// How requests are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FalOptions {
    /// Sent as `?fal_webhook=<url-encoded>` on every submit when set.
    pub webhook_url: Option<String>,
    /// Local input files.
    pub inline: InlinePolicy,
}

/// A fal queue API client.
#[derive(Debug, Clone)]
pub struct Fal {
    client: reqwest::Client,
    base: String,
    auth: Auth,
    opts: FalOptions,
    /// Uploads local input files; without it they follow the inline policy.
    uploader: Option<Arc<upload::Uploader>>,
}

/// The fal model id for a job's model and task: a model containing `/` is already a fal id;
/// `seedream-v4-5` / `seedream-v4.5` and `seedream-v4` map to Seedream's edit or text-to-image
/// endpoints.
///
/// # Errors
/// [`ProviderError::Input`] for a short name fal does not know.
pub fn model_id(model: &str, task: Task) -> Result<String, ProviderError> {
    if model.contains('/') {
        return Ok(model.trim_matches('/').to_owned());
    }
    let version = match model.trim().to_ascii_lowercase().as_str() {
        "seedream-v4-5" | "seedream-v4.5" => "v4.5",
        "seedream-v4" => "v4",
        _ => {
            return Err(ProviderError::Input(format!(
                "model {model:?} has no fal id: use seedream-v4-5, seedream-v4 or a full fal model id"
            )));
        }
    };
    let endpoint = match task {
        Task::Edit => "edit",
        Task::Generate => "text-to-image",
    };
    Ok(format!("fal-ai/bytedance/seedream/{version}/{endpoint}"))
}

/// `image_size` from `Params.size`: `{width, height}` for `WxH`, the enum name otherwise.
fn image_size(job: &JobSpec) -> Option<Value> {
    if let Some((width, height)) = job.params.dimensions() {
        return Some(serde_json::json!({ "width": width, "height": height }));
    }
    let size = job.params.size.as_deref()?.trim();
    if !SIZE_NAMES.contains(&size) {
        tracing::warn!(sku = %job.sku, size, "unknown fal image_size; sent as given");
    }
    Some(Value::String(size.to_owned()))
}

impl Fal {
    /// A client for `base_url` (use [`DEFAULT_BASE_URL`] for the real service).
    ///
    /// # Errors
    /// [`ProviderError::Input`] when the base URL is not an http(s) URL or the key cannot be put
    /// in a header.
    pub fn new(
        client: reqwest::Client,
        base_url: &str,
        key: ApiKey,
        opts: FalOptions,
    ) -> Result<Self, ProviderError> {
        match url::Url::parse(base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => return Err(ProviderError::Input(format!("API base {base_url:?} is not an http(s) URL"))),
        }
        Ok(Self {
            client,
            base: base_url.trim_end_matches('/').to_owned(),
            auth: Auth::fal(key)?,
            opts,
            uploader: None,
        })
    }

    /// The same client, uploading local input files to fal's storage before each submit.
    #[must_use]
    pub fn with_uploader(mut self, uploader: Arc<upload::Uploader>) -> Self {
        self.uploader = Some(uploader);
        self
    }

    /// The model input for a job.
    async fn body(&self, job: &JobSpec) -> Result<SubmitBody, ProviderError> {
        let image_urls = match job.task {
            Task::Generate => None,
            Task::Edit => {
                if job.inputs.is_empty() {
                    return Err(ProviderError::Input("an edit needs at least one input image".into()));
                }
                if job.inputs.len() > MAX_INPUT_IMAGES {
                    return Err(ProviderError::Input(format!(
                        "{} input images; fal takes at most {MAX_INPUT_IMAGES} (it would silently drop the rest)",
                        job.inputs.len()
                    )));
                }
                let mut urls = Vec::with_capacity(job.inputs.len());
                for input in &job.inputs {
                    urls.push(http::resolve_input(input, self.opts.inline).await?);
                }
                Some(urls)
            }
        };
        Ok(SubmitBody {
            prompt: job.prompt.clone(),
            image_urls,
            num_images: job.params.num_images,
            image_size: image_size(job),
            seed: job.params.seed,
        })
    }

    /// Fetches the output of a completed request from its `response_url`.
    async fn result(&self, request: &RequestRef) -> Result<JobResult, ProviderError> {
        let url = request.response_url.as_deref().ok_or_else(|| {
            ProviderError::Decode(format!("request {} has no saved response_url", request.request_id))
        })?;
        let answer = http::send(self.client.get(url), &self.auth, Dialect::Fal, "fal result").await?;
        let value: Value = answer.json("fal result", &self.auth)?;
        let output: Output = match serde_json::from_value(value.clone()) {
            Ok(output) => output,
            Err(e) => {
                // A 2xx that is not an output: the model's failure, if it says one.
                return Err(match failure_message(&value) {
                    Some(message) => ProviderError::Generation(http::truncate(&self.auth.redact(&message))),
                    None => ProviderError::Decode(format!("fal result: {e}")),
                });
            }
        };
        let images: Vec<OutputRef> = output
            .images
            .into_iter()
            .map(|i| OutputRef { url: i.url, content_type: i.content_type, width: i.width, height: i.height })
            .collect();
        if images.is_empty() {
            let message = failure_message(&value).unwrap_or_else(|| "the result has no images".into());
            return Err(ProviderError::Generation(http::truncate(&self.auth.redact(&message))));
        }
        Ok(JobResult { images, charged: None, credits_remaining: None, seed: output.seed })
    }
}

/// True for an absolute local path (not a URL or a data URI).
fn is_local(input: &str) -> bool {
    let lower = input.get(..8).unwrap_or(input).to_ascii_lowercase();
    !(lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("data:"))
        && std::path::Path::new(input).is_absolute()
}

/// True when `url` has the scheme, host and port of `base`.
/// How long a status stream may stay open.
const STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The most a stream may buffer without finishing an event (a status event is a few hundred
/// bytes; logs are not asked for).
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Server-sent events, cut into each event's `data` (its `data:` lines joined by newlines).
///
/// Hand-written: fal's status stream uses only `data:` fields, which take a dozen lines here;
/// the maintained SSE clients bring their own HTTP stack and reconnect logic, where polling is
/// our fallback instead.
#[derive(Debug, Default)]
struct SseEvents {
    pending: Vec<u8>,
}

impl SseEvents {
    /// Adds a chunk; answers the data of every event it completed.
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, ProviderError> {
        self.pending.extend(chunk.iter().filter(|b| **b != b'\r'));
        let mut done = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                done.push(data.join("\n"));
            }
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            return Err(ProviderError::TooLarge { limit: MAX_EVENT_BYTES });
        }
        Ok(done)
    }
}

fn same_origin(base: &str, url: &str) -> bool {
    match (url::Url::parse(base), url::Url::parse(url)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// The failure a result body describes, in fal's `detail`/`error` shapes.
fn failure_message(value: &Value) -> Option<String> {
    let field = value.get("detail").or_else(|| value.get("error"))?;
    Some(match field {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.get("msg").and_then(Value::as_str).map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    })
}

impl Provider for Fal {
    fn name(&self) -> &'static str {
        "fal"
    }

    fn base_url(&self) -> &str {
        &self.base
    }

    #[tracing::instrument(skip_all, fields(sku = %job.sku, job = job.id))]
    async fn prepare(&self, job: &JobSpec) -> Result<JobSpec, ProviderError> {
        let Some(uploader) = &self.uploader else { return Ok(job.clone()) };
        if job.task != Task::Edit {
            return Ok(job.clone());
        }
        let mut inputs = Vec::with_capacity(job.inputs.len());
        for input in &job.inputs {
            inputs.push(if is_local(input) { uploader.url_for(input).await? } else { input.clone() });
        }
        Ok(JobSpec { inputs, ..job.clone() })
    }

    #[tracing::instrument(skip_all, fields(sku = %job.sku, job = job.id))]
    async fn submit(&self, job: &JobSpec) -> Result<Submission, ProviderError> {
        let model = model_id(&job.model, job.task)?;
        let body = self.body(job).await?;
        let mut request = self.client.post(http::join(&self.base, &model)).json(&body);
        if let Some(hook) = &self.opts.webhook_url {
            request = request.query(&[("fal_webhook", hook)]);
        }
        let answer = http::send(request, &self.auth, Dialect::Fal, "fal submit").await?;
        let queued: Queued = answer.json("fal submit answer", &self.auth)?;
        let request_id = queued
            .request_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| ProviderError::Decode("fal submit answer has no request_id".into()))?;
        // Without these the request cannot be followed (rebuilt URLs 404 for some models), so it
        // is reported as undecodable: the pipeline treats the submit as ambiguous.
        let (Some(status_url), Some(response_url)) = (queued.status_url, queued.response_url) else {
            return Err(ProviderError::Decode(format!(
                "fal accepted request {request_id} without status_url and response_url"
            )));
        };
        // The key goes with every poll: never to a host other than the one the user configured.
        for url in [&status_url, &response_url] {
            if !same_origin(&self.base, url) {
                return Err(ProviderError::Decode(format!(
                    "fal accepted request {request_id} but names {url} on another host than {}; \
                     backdrop sends the key only to the API base",
                    self.base
                )));
            }
        }
        tracing::debug!(request_id, queue_position = queued.queue_position, "fal accepted");
        let request = RequestRef {
            request_id,
            status_url: Some(status_url),
            response_url: Some(response_url),
            cancel_url: queued.cancel_url,
        };
        // A position above 0 means the account already runs as many requests as it may and
        // this one waits behind others: the scheduler's window hears it.
        Ok(match queued.queue_position {
            Some(position) if position > 0 => Submission::Queued { request, position },
            _ => Submission::Accepted(request),
        })
    }

    #[tracing::instrument(skip_all, fields(request_id = %request.request_id))]
    async fn poll(&self, request: &RequestRef) -> Result<PollOutcome, ProviderError> {
        let url = request.status_url.as_deref().ok_or_else(|| {
            ProviderError::Decode(format!("request {} has no saved status_url", request.request_id))
        })?;
        let answer = http::send(self.client.get(url), &self.auth, Dialect::Fal, "fal status").await?;
        let status: Status = answer.json("fal status answer", &self.auth)?;
        match status.status.as_deref() {
            // There is no FAILED status (fal's queue documents only IN_QUEUE, IN_PROGRESS and
            // COMPLETED): a failure shows on the result.
            Some("COMPLETED") => Ok(PollOutcome::Completed(self.result(request).await?)),
            // IN_QUEUE, IN_PROGRESS, and anything new: still running.
            _ => Ok(PollOutcome::Running { queue_position: status.queue_position }),
        }
    }

    #[tracing::instrument(skip_all, fields(request_id = %request.request_id))]
    async fn watch(&self, request: &RequestRef) -> Result<bool, ProviderError> {
        use futures::StreamExt as _;
        let Some(status_url) = request.status_url.as_deref() else { return Ok(false) };
        let url = format!("{}/stream", status_url.trim_end_matches('/'));
        // A stream lasts as long as the generation: the client's per-request timeout would cut
        // it, so it gets a day; polling takes over if it breaks.
        let get = self.client.get(url).header(reqwest::header::ACCEPT, "text/event-stream");
        let response =
            http::open_stream(get.timeout(STREAM_TIMEOUT), &self.auth, Dialect::Fal, "fal status stream")
                .await?;
        let mut events = SseEvents::default();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| http::transport_error(&e, "fal status stream", &self.auth))?;
            for data in events.push(&chunk)? {
                // Each event is a status body; an unreadable one is skipped (polling confirms).
                let status: Option<Status> = serde_json::from_str(&data).ok();
                if status.is_some_and(|s| s.status.as_deref() == Some("COMPLETED")) {
                    return Ok(true);
                }
            }
        }
        Err(ProviderError::NoAnswer {
            sent: true,
            message: "fal status stream ended before COMPLETED".into(),
        })
    }

    #[tracing::instrument(skip_all, fields(request_id = %request.request_id))]
    async fn cancel(&self, request: &RequestRef) -> Result<bool, ProviderError> {
        // The key goes with the cancel: never to a host other than the one the user configured.
        let Some(url) = request.cancel_url.as_deref().filter(|url| same_origin(&self.base, url)) else {
            return Ok(false);
        };
        match http::send(self.client.put(url), &self.auth, Dialect::Fal, "fal cancel").await {
            // 202 `CANCELLATION_REQUESTED`: it was still queued, and fal does not charge it.
            Ok(answer) => {
                let status: Status = answer.json("fal cancel answer", &self.auth)?;
                Ok(status.status.as_deref() == Some("CANCELLATION_REQUESTED"))
            }
            // 400 `IN_PROGRESS`, `ALREADY_COMPLETED`, `ALREADY_CANCELLED`: it runs, or ran.
            Err(e) if e.status() == Some(400) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[derive(Serialize)]
struct SubmitBody {
    prompt: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_urls: Option<Vec<String>>,
    num_images: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_size: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
}

#[derive(Deserialize)]
struct Queued {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    status_url: Option<String>,
    #[serde(default)]
    response_url: Option<String>,
    #[serde(default)]
    cancel_url: Option<String>,
    #[serde(default)]
    queue_position: Option<u32>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    queue_position: Option<u32>,
}

#[derive(Deserialize)]
struct Output {
    images: Vec<OutputImage>,
    #[serde(default)]
    seed: Option<i64>,
}

#[derive(Deserialize)]
struct OutputImage {
    url: String,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::Params;

    fn job(size: Option<&str>) -> JobSpec {
        JobSpec {
            id: 1,
            sku: "A1".into(),
            task: Task::Edit,
            model: "seedream-v4-5".into(),
            prompt: "p".into(),
            inputs: vec!["https://x/a.png".into()],
            params: Params { size: size.map(Into::into), ..Params::default() },
        }
    }

    #[test]
    fn short_names_cost_what_their_fal_ids_cost() {
        let prices = crate::money::PriceTable::new(crate::domain::ProviderKind::Fal, &Default::default());
        for short in ["seedream-v4-5", "seedream-v4.5", "seedream-v4"] {
            for task in [Task::Edit, Task::Generate] {
                let id = model_id(short, task).unwrap();
                assert!(prices.unit_price(&id).is_some(), "{id} is priced");
                assert_eq!(prices.unit_price(short), prices.unit_price(&id), "{short} {task:?}");
            }
        }
    }

    #[test]
    fn model_ids_map_by_task() {
        assert_eq!(model_id("seedream-v4-5", Task::Edit).unwrap(), "fal-ai/bytedance/seedream/v4.5/edit");
        assert_eq!(
            model_id("seedream-v4.5", Task::Generate).unwrap(),
            "fal-ai/bytedance/seedream/v4.5/text-to-image"
        );
        assert_eq!(model_id("seedream-v4", Task::Edit).unwrap(), "fal-ai/bytedance/seedream/v4/edit");
        assert_eq!(model_id("fal-ai/some/model", Task::Edit).unwrap(), "fal-ai/some/model");
        assert!(matches!(model_id("seedream-v3", Task::Edit), Err(ProviderError::Input(_))));
    }

    #[test]
    fn image_size_is_an_object_or_a_name() {
        assert_eq!(
            image_size(&job(Some("2048x1536"))),
            Some(serde_json::json!({"width": 2048, "height": 1536}))
        );
        assert_eq!(image_size(&job(Some("square_hd"))), Some(Value::String("square_hd".into())));
        assert_eq!(image_size(&job(None)), None);
    }

    #[test]
    fn the_key_only_goes_to_the_configured_host() {
        assert!(same_origin("https://queue.fal.run", "https://queue.fal.run/fal-ai/x/requests/1/status"));
        assert!(!same_origin("https://queue.fal.run", "https://evil.example/fal-ai/x/requests/1/status"));
        assert!(!same_origin("https://queue.fal.run", "http://queue.fal.run/x"));
        assert!(!same_origin("http://127.0.0.1:8080", "http://127.0.0.1:9090/x"));
        assert!(!same_origin("https://queue.fal.run", "not a url"));
    }

    #[test]
    fn server_sent_events_are_cut_into_their_data_across_chunks() {
        let mut sse = SseEvents::default();
        assert!(sse.push(b"data: {\"status\": \"IN_QU").unwrap().is_empty());
        let got = sse.push(b"EUE\"}\r\n\r\n: keep-alive\n\ndata: {\"status\":\"COMPLETED\"}\n\n").unwrap();
        assert_eq!(got, vec![r#"{"status": "IN_QUEUE"}"#.to_owned(), r#"{"status":"COMPLETED"}"#.to_owned()]);
        let mut sse = SseEvents::default();
        assert!(sse.push(&vec![b'x'; MAX_EVENT_BYTES + 1]).is_err());
    }

    #[test]
    fn failures_in_result_bodies_are_read() {
        let v = serde_json::json!({"detail": [{"msg": "content policy violation"}]});
        assert_eq!(failure_message(&v).as_deref(), Some("content policy violation"));
        assert_eq!(failure_message(&serde_json::json!({"images": []})), None);
    }
}
