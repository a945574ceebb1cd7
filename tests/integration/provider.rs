//! Narrow tests of the two provider protocols and the downloader against small servers on
//! 127.0.0.1:0: a scripted axum app that records every request, and raw TCP servers for the
//! failures axum cannot produce (a connection dropped after the request, a truncated body, an
//! endless answer). Downloads go the way production sends them: `Fetcher::download`, then the
//! batching `Persister`.

use std::collections::VecDeque;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use backdrop::domain::{ApiKey, JobSpec, OutputRef, Params, RequestRef, SavedOutput, Task};
use backdrop::fetch::guard::AddressClass;
use backdrop::fetch::{AddressPolicy, DownloadClient, FetchError, Fetcher, Persister};
use backdrop::provider::fal::{Fal, FalOptions};
use backdrop::provider::http::{self, InlinePolicy};
use backdrop::provider::seedance::{Seedance, SeedanceOptions};
use backdrop::provider::{ErrorClass, PollOutcome, Provider, ProviderError, StopReason, Submission};
use serde_json::{Value, json};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const KEY: &str = "sk-sentinel-7f3a9c21d4e8b6f0";

fn key() -> ApiKey {
    ApiKey::new(KEY)
}

fn client() -> reqwest::Client {
    http::client(Duration::from_secs(10)).unwrap()
}

/// The download client, allowing the loopback addresses every test server here listens on.
fn downloads() -> DownloadClient {
    DownloadClient::new(Duration::from_secs(10), AddressPolicy::allowing([AddressClass::Loopback])).unwrap()
}

/// One output the way production saves it: received by `Fetcher::download`, then made durable
/// (header check, sync, rename) by the batching `Persister`.
async fn fetch(
    fetcher: &Fetcher,
    sku: &str,
    index: u32,
    output: &OutputRef,
) -> Result<SavedOutput, FetchError> {
    let received = fetcher.download(sku, index, output).await?;
    let persister = Persister::start(fetcher.out_dir());
    let mut saved = persister.persist(vec![received], true).await?;
    assert_eq!(saved.len(), 1);
    Ok(saved.remove(0))
}

/// One request the mock saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    auth: Option<String>,
    body: Value,
}

/// One scripted answer.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn reply(status: u16, body: &Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

impl Reply {
    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

#[derive(Default)]
struct MockState {
    seen: Mutex<Vec<Seen>>,
    replies: Mutex<VecDeque<Reply>>,
    /// When set, error bodies echo the Authorization header (a careless server).
    echo_auth: bool,
}

/// An axum server answering every request with the next scripted reply (the last one repeats).
struct Mock {
    base: String,
    state: Arc<MockState>,
}

impl Mock {
    async fn start() -> Self {
        Self::start_with(false).await
    }

    async fn start_with(echo_auth: bool) -> Self {
        let state = Arc::new(MockState { echo_auth, ..MockState::default() });
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, state }
    }

    fn push(&self, r: Reply) {
        self.state.replies.lock().unwrap().push_back(r);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn handle(State(state): State<Arc<MockState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    state.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        auth: auth.clone(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    });
    let next = {
        let mut replies = state.replies.lock().unwrap();
        if replies.len() > 1 { replies.pop_front() } else { replies.front().cloned() }
    };
    let mut r = next.unwrap_or_else(|| reply(500, &json!({"error": {"code": "unscripted"}})));
    if state.echo_auth && r.status >= 400 {
        r.body = json!({"error": {"code": "unauthorized", "message": format!("bad {}", auth.unwrap_or_default())}})
            .to_string()
            .into_bytes();
    }
    let mut response = Response::new(Body::from(r.body));
    *response.status_mut() = StatusCode::from_u16(r.status).unwrap();
    for (name, value) in r.headers {
        response.headers_mut().insert(HeaderName::from_static(name), HeaderValue::from_str(&value).unwrap());
    }
    response
}

fn edit_job(inputs: &[&str]) -> JobSpec {
    JobSpec {
        id: 7,
        sku: "SKU-1".into(),
        task: Task::Edit,
        model: "seedream-v4-5".into(),
        prompt: "Replace the background with polished marble".into(),
        inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
        params: Params { num_images: 2, output_format: Some("png".into()), size: None, seed: Some(42) },
    }
}

fn seedance(base: &str, sync: bool, webhook: Option<&str>, inline: InlinePolicy) -> Seedance {
    let opts = SeedanceOptions { sync, webhook_url: webhook.map(Into::into), inline };
    Seedance::new(client(), base, key(), opts).unwrap()
}

fn fal(base: &str, webhook: Option<&str>) -> Fal {
    Fal::new(
        client(),
        base,
        key(),
        FalOptions { webhook_url: webhook.map(Into::into), inline: InlinePolicy::refuse() },
    )
    .unwrap()
}

fn rref(id: &str) -> RequestRef {
    RequestRef { request_id: id.into(), status_url: None, response_url: None, cancel_url: None }
}

// ---------------------------------------------------------------------------------------------
// seedance

#[tokio::test]
async fn seedance_async_edit_then_polls_to_completion() {
    let mock = Mock::start().await;
    let p = seedance(&mock.base, false, Some("https://hooks.example/s?t=1"), InlinePolicy::refuse());
    mock.push(reply(200, &json!({"request_id": "req-1", "status": "queued"})));
    let sub = p.submit(&edit_job(&["https://cdn.example/a.png"])).await.unwrap();
    assert_eq!(sub, Submission::Accepted(rref("req-1")));

    let seen = &mock.seen()[0];
    assert_eq!((seen.method.as_str(), seen.path.as_str()), ("POST", "/v1/seedream/v4.5/edit"));
    assert_eq!(seen.auth.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(seen.body["async"], true);
    assert_eq!(seen.body["image_urls"], json!(["https://cdn.example/a.png"]));
    assert_eq!(seen.body["num_images"], 2);
    assert_eq!(seen.body["seed"], 42);
    assert_eq!(seen.body["webhook_url"], "https://hooks.example/s?t=1");

    for status in ["queued", "in_progress", "some_new_state"] {
        mock.push(reply(200, &json!({"request_id": "req-1", "status": status})));
    }
    mock.push(reply(
        200,
        &json!({"request_id": "req-1", "status": "completed", "seed": 9, "credits_used": 16,
                "images": [{"url": "https://cdn.example/o1.png", "width": 1024, "height": 1024},
                           {"url": "https://cdn.example/o2.png"}]}),
    ));
    // Drop the async answer the mock still holds at the front.
    mock.state.replies.lock().unwrap().pop_front();
    for _ in 0..3 {
        assert_eq!(p.poll(&rref("req-1")).await.unwrap(), PollOutcome::Running { queue_position: None });
    }
    let PollOutcome::Completed(result) = p.poll(&rref("req-1")).await.unwrap() else { panic!() };
    assert_eq!(result.images.len(), 2);
    assert_eq!(result.images[0].width, Some(1024));
    assert_eq!(result.charged, Some(16.0));
    assert_eq!(result.seed, Some(9));
    let polls = mock.seen();
    assert!(polls[1..].iter().all(|s| s.method == "GET" && s.path == "/v1/requests/req-1"), "{polls:?}");
}

#[tokio::test]
async fn seedance_failed_status_is_a_generation_error() {
    let mock = Mock::start().await;
    let p = seedance(&mock.base, false, None, InlinePolicy::refuse());
    mock.push(reply(
        200,
        &json!({"request_id": "r", "status": "failed", "error": {"code": "content_policy", "message": "flagged"}}),
    ));
    let err = p.poll(&rref("r")).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Generation(m) if m.contains("flagged")), "{err:?}");
    assert_eq!(err.poll_class(), ErrorClass::Fail);
}

#[tokio::test]
async fn seedance_sync_edit_and_generate_answer_at_once() {
    let mock = Mock::start().await;
    let p = seedance(&mock.base, true, None, InlinePolicy::refuse());
    mock.push(reply(
        200,
        &json!({"images": [{"url": "https://cdn/o.png", "width": 8, "height": 8, "content_type": "image/png"}],
                "seed": 1, "credits_used": 8}),
    ));
    let Submission::Completed { request_id, result } =
        p.submit(&edit_job(&["https://cdn/a.png"])).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(request_id, None);
    assert_eq!(result.images[0].content_type.as_deref(), Some("image/png"));
    assert!(mock.seen()[0].body.get("async").is_none(), "sync sends no async flag");

    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(
        200,
        &json!({"id": "gen-1", "model": "seedream-v4-5", "created": 1, "credits_used": 8, "credits_remaining": 92,
                "images": [{"url": "https://cdn/g.png", "width": 2048, "height": 1152, "seed": 3}]}),
    ));
    let mut job = edit_job(&[]);
    job.task = Task::Generate;
    job.params.size = Some("2048x1152".into());
    let Submission::Completed { request_id, result } = p.submit(&job).await.unwrap() else { panic!() };
    assert_eq!(request_id.as_deref(), Some("gen-1"));
    assert_eq!(result.credits_remaining, Some(92.0));
    let seen = &mock.seen()[1];
    assert_eq!(seen.path, "/v1/images/generate");
    assert_eq!(
        (seen.body["model"].as_str(), seen.body["width"].as_u64(), seen.body["height"].as_u64()),
        (Some("seedream-v4-5"), Some(2048), Some(1152))
    );
}

#[tokio::test]
async fn seedance_errors_map_to_classes_with_retry_after() {
    let mock = Mock::start().await;
    let p = seedance(&mock.base, false, None, InlinePolicy::refuse());
    let job = edit_job(&["https://cdn/a.png"]);

    mock.push(
        reply(429, &json!({"error": {"code": "rate_limited", "message": "slow down"}}))
            .header("retry-after", "7"),
    );
    let err = p.submit(&job).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(err.class(), ErrorClass::Retry);
    assert_eq!(err.to_string(), "HTTP 429 rate_limited: slow down");

    mock.state.replies.lock().unwrap().clear();
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    mock.push(
        reply(429, &json!({"error": {"code": "rate_limited", "message": "m"}})).header("retry-after", date),
    );
    let wait = p.submit(&job).await.unwrap_err().retry_after().unwrap();
    assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120), "{wait:?}");

    let cases = [
        (
            402,
            json!({"error": {"code": "insufficient_credits", "message": "low", "credits_required": 16, "credits_available": 3}}),
            ErrorClass::Stop(StopReason::OutOfCredits),
        ),
        (
            401,
            json!({"error": {"code": "unauthorized", "message": "bad key"}}),
            ErrorClass::Stop(StopReason::KeyRejected),
        ),
        (400, json!({"error": {"code": "invalid_request", "message": "bad url"}}), ErrorClass::Fail),
        (500, json!({"error": {"code": "server_error", "message": "oops"}}), ErrorClass::Retry),
    ];
    for (status, body, class) in cases {
        mock.state.replies.lock().unwrap().clear();
        mock.push(reply(status, &body));
        let err = p.submit(&job).await.unwrap_err();
        assert_eq!(err.status(), Some(status));
        assert_eq!(err.class(), class, "{err}");
        if status == 402 {
            assert!(err.to_string().contains("required 16, available 3"), "{err}");
        }
    }
}

#[tokio::test]
async fn local_inputs_are_inlined_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.jpg");
    image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10])).save(&path).unwrap();
    let local = path.to_str().unwrap();

    let mock = Mock::start().await;
    mock.push(reply(200, &json!({"request_id": "r", "status": "queued"})));
    let refused = seedance(&mock.base, false, None, InlinePolicy::refuse());
    let err = refused.submit(&edit_job(&[local])).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Input(m) if m.contains("--inline-local-images")), "{err}");
    let small = seedance(&mock.base, false, None, InlinePolicy { allowed: true, max_bytes: 50 });
    let err = small.submit(&edit_job(&[local])).await.unwrap_err();
    assert!(err.to_string().contains("inline limit"), "{err}");
    assert!(mock.seen().is_empty(), "nothing is sent for a refused input");

    let allowed = seedance(&mock.base, false, None, InlinePolicy { allowed: true, max_bytes: 1_000_000 });
    allowed.submit(&edit_job(&[local, "https://cdn/ref.png"])).await.unwrap();
    let urls = &mock.seen()[0].body["image_urls"];
    assert!(urls[0].as_str().unwrap().starts_with("data:image/jpeg;base64,/9j/"), "{urls}");
    assert_eq!(urls[1], "https://cdn/ref.png");
}

// ---------------------------------------------------------------------------------------------
// fal

#[tokio::test]
async fn fal_submit_uses_key_auth_webhook_query_and_returns_urls_as_given() {
    let mock = Mock::start().await;
    let p = fal(&mock.base, Some("https://hooks.example/fal?a=1&b=2"));
    // Deliberately unlike any URL a client would build.
    let status_url = format!("{}/odd/place/status-of/abc", mock.base);
    let response_url = format!("{}/elsewhere/result/abc", mock.base);
    mock.push(reply(
        200,
        &json!({"request_id": "abc", "status": "IN_QUEUE", "status_url": status_url, "response_url": response_url,
                "cancel_url": format!("{}/c/abc", mock.base), "queue_position": 4}),
    ));
    let mut job = edit_job(&["https://cdn/a.png", "https://cdn/b.png"]);
    job.params.size = Some("2048x1536".into());
    // Queued behind 4 others: the scheduler's window hears the position.
    let Submission::Queued { request: r, position: 4 } = p.submit(&job).await.unwrap() else { panic!() };
    assert_eq!(r.request_id, "abc");
    assert_eq!(r.status_url.as_deref(), Some(status_url.as_str()));
    assert_eq!(r.response_url.as_deref(), Some(response_url.as_str()));

    let seen = &mock.seen()[0];
    assert_eq!(seen.path, "/fal-ai/bytedance/seedream/v4.5/edit");
    assert_eq!(seen.auth.as_deref(), Some(format!("Key {KEY}").as_str()));
    let query = seen.query.as_deref().unwrap();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    assert_eq!(pairs, [("fal_webhook".to_owned(), "https://hooks.example/fal?a=1&b=2".to_owned())]);
    assert_eq!(seen.body["image_urls"], json!(["https://cdn/a.png", "https://cdn/b.png"]));
    assert_eq!(seen.body["image_size"], json!({"width": 2048, "height": 1536}));
    assert_eq!(seen.body["num_images"], 2);
    assert_eq!(seen.body["seed"], 42);

    // Poll: queued, running, completed, then the result from response_url.
    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(202, &json!({"status": "IN_QUEUE", "queue_position": 3})));
    mock.push(reply(202, &json!({"status": "IN_PROGRESS"})));
    mock.push(reply(200, &json!({"status": "COMPLETED"})));
    mock.push(reply(200, &json!({"images": [{"url": "https://cdn/out.png", "content_type": "image/png", "width": 2048, "height": 1536}]})));
    assert_eq!(p.poll(&r).await.unwrap(), PollOutcome::Running { queue_position: Some(3) });
    assert_eq!(p.poll(&r).await.unwrap(), PollOutcome::Running { queue_position: None });
    let PollOutcome::Completed(result) = p.poll(&r).await.unwrap() else { panic!() };
    assert_eq!(result.images[0].url, "https://cdn/out.png");
    assert_eq!(result.charged, None);
    let paths: Vec<String> = mock.seen()[1..].iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/odd/place/status-of/abc",
            "/odd/place/status-of/abc",
            "/odd/place/status-of/abc",
            "/elsewhere/result/abc"
        ]
    );
}

#[tokio::test]
async fn fal_failed_results_and_error_headers() {
    let mock = Mock::start().await;
    let p = fal(&mock.base, None);
    let r = RequestRef {
        request_id: "x".into(),
        status_url: Some(format!("{}/s/x", mock.base)),
        response_url: Some(format!("{}/r/x", mock.base)),
        cancel_url: None,
    };
    mock.push(reply(200, &json!({"status": "COMPLETED"})));
    mock.push(reply(422, &json!({"detail": [{"loc": ["body", "prompt"], "msg": "flagged by the safety checker", "type": "content_policy_violation"}]})));
    let err = p.poll(&r).await.unwrap_err();
    assert_eq!(err.status(), Some(422));
    assert!(err.to_string().contains("body.prompt: flagged"), "{err}");
    assert_eq!(err.poll_class(), ErrorClass::Fail);

    let job = edit_job(&["https://cdn/a.png"]);
    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(422, &json!({"detail": "temporarily unprocessable"})).header("x-fal-retryable", "true"));
    let err = p.submit(&job).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Retry);
    assert!(err.to_string().contains("temporarily unprocessable"));

    mock.state.replies.lock().unwrap().clear();
    mock.push(
        reply(504, &json!({"detail": "timed out", "error_type": "request_timeout"}))
            .header("x-fal-request-timeout-type", "user")
            .header("x-fal-error-type", "request_timeout"),
    );
    let err = p.submit(&job).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Fail);

    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(503, &json!({"detail": "busy"})).header("x-fal-error-type", "runner_unavailable"));
    let err = p.submit(&job).await.unwrap_err();
    let ProviderError::Http { code, .. } = &err else { panic!("{err:?}") };
    assert_eq!(code.as_deref(), Some("runner_unavailable"));
    assert_eq!(err.class(), ErrorClass::Retry);

    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(200, &json!({"request_id": "y", "status": "IN_QUEUE"})));
    let err = p.submit(&job).await.unwrap_err();
    assert!(matches!(err, ProviderError::Decode(_)), "no URLs to follow: {err:?}");
    assert_eq!(err.class(), ErrorClass::Ambiguous);

    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(
        200,
        &json!({"request_id": "z", "status_url": "http://attacker.invalid/s/z", "response_url": format!("{}/r/z", mock.base)}),
    ));
    let err = p.submit(&job).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Decode(m) if m.contains("another host")), "{err:?}");
}

#[tokio::test]
async fn fal_refuses_more_than_ten_inputs_before_sending() {
    let mock = Mock::start().await;
    let p = fal(&mock.base, None);
    let inputs: Vec<String> = (0..11).map(|i| format!("https://cdn/{i}.png")).collect();
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let err = p.submit(&edit_job(&refs)).await.unwrap_err();
    assert!(matches!(&err, ProviderError::Input(m) if m.contains("at most 10")), "{err}");
    assert!(mock.seen().is_empty());
}

// ---------------------------------------------------------------------------------------------
// transport failures

/// A server that reads one whole request (head and body), then closes without answering.
async fn drop_after_request() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if request_complete(&buf) {
                    break;
                }
            }
            drop(sock);
        }
    });
    base
}

fn request_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
        .unwrap_or(0);
    buf.len() >= end + 4 + len
}

#[tokio::test]
async fn a_dropped_connection_after_the_request_is_ambiguous_and_refused_is_connect() {
    let base = drop_after_request().await;
    let job = edit_job(&["https://cdn/a.png"]);
    let err = seedance(&base, false, None, InlinePolicy::refuse()).submit(&job).await.unwrap_err();
    assert!(matches!(err, ProviderError::NoAnswer { sent: true, .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Ambiguous);
    assert_eq!(err.poll_class(), ErrorClass::Retry);
    let err = fal(&base, None).submit(&job).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Ambiguous, "{err:?}");

    // A port nobody listens on: bind, note it, close.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = seedance(&base, false, None, InlinePolicy::refuse()).submit(&job).await.unwrap_err();
    assert!(matches!(err, ProviderError::Connect(_)), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Retry);
}

#[tokio::test]
async fn a_slow_answer_times_out_as_ambiguous_and_garbage_is_decode() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            // Hold the connection open, never answer.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(sock);
            });
        }
    });
    let opts = SeedanceOptions { sync: false, webhook_url: None, inline: InlinePolicy::refuse() };
    let quick = Seedance::new(http::client(Duration::from_millis(300)).unwrap(), &base, key(), opts).unwrap();
    let err = quick.submit(&edit_job(&["https://cdn/a.png"])).await.unwrap_err();
    assert!(matches!(err, ProviderError::NoAnswer { sent: true, .. }), "{err:?}");

    let mock = Mock::start().await;
    let mut r = reply(200, &json!({}));
    r.body = format!("<html>{KEY}</html>").into_bytes();
    mock.push(r);
    let err = seedance(&mock.base, false, None, InlinePolicy::refuse())
        .submit(&edit_job(&["https://cdn/a.png"]))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Decode(_)), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Ambiguous);
    assert!(!format!("{err} {err:?}").contains(KEY));
}

/// Set in the child process that [`the_key_never_appears_in_errors_or_logs`] starts.
const LOG_CHILD: &str = "BACKDROP_TEST_KEY_LOG_CHILD";

/// Every error a provider can produce, from servers that echo the Authorization header back,
/// must not show the key in Display or Debug, nor in any log line at any level.
///
/// The log half runs in a child process of this test binary with a global TRACE subscriber:
/// tracing caches callsite interest process-wide, so a thread-local subscriber in a binary whose
/// other tests run in parallel misses events at random.
#[tokio::test]
async fn the_key_never_appears_in_errors_or_logs() {
    if std::env::var_os(LOG_CHILD).is_some() {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
        key_scenario().await;
        return;
    }
    key_scenario().await;

    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "provider::the_key_never_appears_in_errors_or_logs",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LOG_CHILD, "1")
        .output()
        .await
        .unwrap();
    let logs =
        format!("{}{}", String::from_utf8_lossy(&child.stdout), String::from_utf8_lossy(&child.stderr));
    assert!(child.status.success(), "child failed: {logs}");
    assert!(logs.contains("1 passed"), "the child ran the test: {logs}");
    assert!(logs.contains("error answer") && logs.contains("no answer"), "the errors were logged: {logs}");
    assert!(logs.contains("TRACE"), "trace level was on: {logs}");
    assert!(!logs.contains(KEY), "key in logs");
    assert!(!logs.contains("sk-sentinel"), "key prefix in logs");
}

async fn key_scenario() {
    let mock = Mock::start_with(true).await;
    let job = edit_job(&["https://cdn/a.png"]);
    let mut errors: Vec<ProviderError> = Vec::new();
    for status in [400, 401, 402, 403, 422, 429, 500, 503] {
        mock.state.replies.lock().unwrap().clear();
        mock.push(reply(status, &json!({})));
        errors
            .push(seedance(&mock.base, false, None, InlinePolicy::refuse()).submit(&job).await.unwrap_err());
        errors.push(fal(&mock.base, None).submit(&job).await.unwrap_err());
        errors.push(
            seedance(&mock.base, false, None, InlinePolicy::refuse()).poll(&rref("r")).await.unwrap_err(),
        );
    }
    mock.state.replies.lock().unwrap().clear();
    let mut garbage = reply(200, &json!({}));
    garbage.body = format!("not json: Bearer {KEY}").into_bytes();
    mock.push(garbage);
    errors.push(fal(&mock.base, None).submit(&job).await.unwrap_err());
    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(200, &json!({"status": "failed", "error": {"message": format!("key {KEY} refused")}})));
    errors
        .push(seedance(&mock.base, false, None, InlinePolicy::refuse()).poll(&rref("r")).await.unwrap_err());
    errors.push(
        seedance(&drop_after_request().await, false, None, InlinePolicy::refuse())
            .submit(&job)
            .await
            .unwrap_err(),
    );
    errors.push(ProviderError::Input(format!("{:?}", key())));

    assert!(
        mock.seen().iter().all(|s| s.auth.as_deref().is_some_and(|a| a.ends_with(KEY))),
        "the key was sent"
    );
    for e in &errors {
        let shown = format!("{e} | {e:?}");
        assert!(!shown.contains(KEY), "key leaked: {shown}");
        assert!(!shown.contains("sk-sentinel"), "key prefix leaked: {shown}");
    }
    let seedance_debug = format!("{:?}", seedance(&mock.base, false, None, InlinePolicy::refuse()));
    assert!(!seedance_debug.contains(KEY), "{seedance_debug}");
}

// ---------------------------------------------------------------------------------------------
// downloads

/// A PNG of noise (so it does not compress: its size is about `3 * w * h` bytes).
fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_F491u32;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let [a, b, c, _] = state.to_be_bytes();
        image::Rgb([a, b, c])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg_bytes() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(16, 8, image::Rgb([10, 200, 30]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

/// A valid PNG whose header claims `w` x `h` (the IHDR is patched and its CRC recomputed).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = png_bytes(1, 1);
    // Signature (8) + length (4) + "IHDR" (4), then width and height.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn blob(status: u16, bytes: Vec<u8>, content_type: &str) -> Reply {
    Reply { status, headers: vec![("content-type", content_type.to_owned())], body: bytes }
}

fn output(url: String) -> OutputRef {
    OutputRef { url, content_type: None, width: None, height: None }
}

/// Every regular file under `dir`, relative.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                pending.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn downloads_are_verified_hashed_and_named_from_the_bytes() {
    let mock = Mock::start().await;
    let out = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(downloads(), out.path(), "{sku}/{index}.{ext}", 1_000_000);
    let png = png_bytes(64, 32);
    // The server lies about the type: the bytes decide.
    mock.push(blob(200, png.clone(), "application/octet-stream"));
    let saved = fetch(&fetcher, "SKU-1", 0, &output(format!("{}/o/1", mock.base))).await.unwrap();
    assert_eq!(saved.path, Path::new("SKU-1/0.png"));
    assert_eq!((saved.width, saved.height, saved.bytes), (64, 32, png.len() as u64));
    assert_eq!(saved.content_type, "image/png");
    assert_eq!(saved.sha256, format!("{:x}", sha2::Sha256::digest(&png)));
    assert_eq!(std::fs::read(out.path().join(&saved.path)).unwrap(), png);

    mock.state.replies.lock().unwrap().clear();
    mock.push(blob(200, jpeg_bytes(), "image/png"));
    let saved = fetch(&fetcher, "sku/../x", 1, &output(format!("{}/o/2", mock.base))).await.unwrap();
    assert_eq!(saved.content_type, "image/jpeg");
    assert!(saved.path.to_string_lossy().ends_with("/1.jpg"), "{:?}", saved.path);
    assert!(
        saved.path.components().all(|c| matches!(c, std::path::Component::Normal(_)))
            && saved.path.components().count() == 2,
        "{:?}",
        saved.path
    );
    assert_eq!((saved.width, saved.height), (16, 8));
    assert_eq!(files(out.path()).len(), 2, "{:?}", files(out.path()));
}

#[tokio::test]
async fn bad_downloads_leave_nothing_behind() {
    let mock = Mock::start().await;
    let out = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(downloads(), out.path(), "{sku}/{index}.{ext}", 10_000);
    let url = format!("{}/o", mock.base);
    let check = async |r: Reply| {
        mock.state.replies.lock().unwrap().clear();
        mock.push(r);
        fetch(&fetcher, "SKU-2", 0, &output(url.clone())).await.unwrap_err()
    };

    let err = check(blob(200, b"<html>oops</html>".to_vec(), "image/png")).await;
    assert!(matches!(err, FetchError::NotImage { .. }) && err.is_retryable(), "{err:?}");

    let err = check(blob(200, png_bytes(200, 200), "image/png")).await;
    assert!(matches!(err, FetchError::TooLarge { .. }) && !err.is_retryable(), "{err:?}");

    let err = check(blob(200, png_claiming(20_000, 10), "image/png")).await;
    assert!(matches!(err, FetchError::TooManyPixels { .. }) && !err.is_retryable(), "{err:?}");
    let err = check(blob(200, png_claiming(9_000, 9_000), "image/png")).await;
    assert!(matches!(err, FetchError::TooManyPixels { .. }), "81 MP: {err:?}");

    for status in [403, 404, 410] {
        let err = check(blob(status, b"gone".to_vec(), "text/plain")).await;
        assert!(err.is_expired() && !err.is_retryable(), "{status}: {err:?}");
    }
    let err = check(blob(503, b"busy".to_vec(), "text/plain")).await;
    assert!(err.is_retryable() && !err.is_expired(), "{err:?}");

    assert!(files(out.path()).is_empty(), "{:?}", files(out.path()));
}

/// A raw server that announces `announced` bytes, sends `body`, and closes.
async fn short_body_server(announced: usize, body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let head =
                format!("HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {announced}\r\n\r\n");
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(&body).await;
            let _ = sock.flush().await;
            drop(sock);
        }
    });
    base
}

#[tokio::test]
async fn a_truncated_body_is_retryable_and_leaves_no_file() {
    let png = png_bytes(32, 32);
    let base = short_body_server(png.len() + 5000, png[..png.len() / 2].to_vec()).await;
    let out = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(downloads(), out.path(), "{sku}/{index}.{ext}", 1_000_000);
    let err = fetch(&fetcher, "SKU-3", 0, &output(format!("{base}/o"))).await.unwrap_err();
    assert!(matches!(err, FetchError::Interrupted { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(files(out.path()).is_empty(), "{:?}", files(out.path()));
}

/// A raw server that sends `body` without Content-Length and marks its end by closing.
async fn close_delimited_server(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\nconnection: close\r\n\r\n")
                .await;
            // A few bytes first: the type must still be recognised.
            let _ = sock.write_all(&body[..3]).await;
            let _ = sock.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = sock.write_all(&body[3..]).await;
            drop(sock);
        }
    });
    base
}

#[tokio::test]
async fn close_delimited_bodies_are_capped_and_checked_for_their_end() {
    let out = tempfile::tempdir().unwrap();
    let png = png_bytes(100, 100);

    let base = close_delimited_server(png.clone()).await;
    let small = Fetcher::new(downloads(), out.path(), "{sku}/{index}.{ext}", 5_000);
    let err = fetch(&small, "SKU-4", 0, &output(format!("{base}/o"))).await.unwrap_err();
    assert!(matches!(err, FetchError::TooLarge { .. }), "{err:?}");

    let fetcher = Fetcher::new(downloads(), out.path(), "{sku}/{index}.{ext}", 1_000_000);
    let base = close_delimited_server(png[..png.len() - 100].to_vec()).await;
    let err = fetch(&fetcher, "SKU-4", 0, &output(format!("{base}/o"))).await.unwrap_err();
    assert!(matches!(err, FetchError::Interrupted { .. }) && err.is_retryable(), "{err:?}");
    assert!(files(out.path()).is_empty(), "{:?}", files(out.path()));

    let base = close_delimited_server(png.clone()).await;
    let saved = fetch(&fetcher, "SKU-4", 0, &output(format!("{base}/o"))).await.unwrap();
    assert_eq!((saved.width, saved.height), (100, 100));
    assert_eq!(files(out.path()), ["SKU-4/0.png"]);
}

// ---------------------------------------------------------------------------------------------
// issue 15: answers only the API wrote prove "not charged"

fn rref_fal(base: &str) -> RequestRef {
    RequestRef {
        request_id: "x".into(),
        status_url: Some(format!("{base}/s/x")),
        response_url: Some(format!("{base}/r/x")),
        cancel_url: None,
    }
}

/// A 5xx without the API's own error shape (a gateway's HTML page, an empty body, the other
/// API's shape) is ambiguous on a submit: it may have been charged. A 5xx the API wrote is
/// retried. Polls cost nothing, so any 5xx on a poll is retried.
#[tokio::test]
async fn a_5xx_is_retried_only_when_the_api_itself_wrote_it() {
    let mock = Mock::start().await;
    let job = edit_job(&["https://cdn/a.png"]);
    let page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>".to_vec();
    let cases = [
        (blob(502, page.clone(), "text/html"), "seedance", ErrorClass::Ambiguous),
        (blob(502, page.clone(), "text/html"), "fal", ErrorClass::Ambiguous),
        (blob(503, Vec::new(), "text/plain"), "seedance", ErrorClass::Ambiguous),
        (blob(504, Vec::new(), "text/plain"), "fal", ErrorClass::Ambiguous),
        (reply(503, &json!({"detail": "busy"})), "seedance", ErrorClass::Ambiguous),
        (reply(502, &json!({"error": {"code": "server_error"}})), "fal", ErrorClass::Ambiguous),
        (reply(500, &json!({"error": "upstream said no"})), "seedance", ErrorClass::Ambiguous),
        (
            reply(500, &json!({"error": {"code": "server_error", "message": "oops"}})),
            "seedance",
            ErrorClass::Retry,
        ),
        (
            reply(503, &json!({"detail": "busy", "error_type": "runner_unavailable"})),
            "fal",
            ErrorClass::Retry,
        ),
        // fal's own edge sets X-Fal-* headers; a generic proxy does not.
        (blob(502, page, "text/html").header("x-fal-error-type", "bad_gateway"), "fal", ErrorClass::Retry),
    ];
    for (answer, provider, class) in cases {
        let shown = String::from_utf8_lossy(&answer.body).into_owned();
        mock.state.replies.lock().unwrap().clear();
        mock.push(answer);
        let (submitted, polled) = if provider == "seedance" {
            let p = seedance(&mock.base, false, None, InlinePolicy::refuse());
            (p.submit(&job).await.unwrap_err(), p.poll(&rref("r")).await.unwrap_err())
        } else {
            let p = fal(&mock.base, None);
            (p.submit(&job).await.unwrap_err(), p.poll(&rref_fal(&mock.base)).await.unwrap_err())
        };
        assert_eq!(submitted.class(), class, "{provider} submit, {shown}: {submitted:?}");
        assert_eq!(polled.poll_class(), ErrorClass::Retry, "{provider} poll, {shown}: {polled:?}");
    }
}

/// A server that answers every request with a chunked JSON body of `total` bytes (no
/// Content-Length), counting the bytes it managed to send before the client went away.
async fn endless_json_server(total: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !request_complete(&buf) {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head =
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let open = br#"{"request_id":"r","status":"queued","padding":""#.to_vec();
                let filler = vec![b'x'; 64 * 1024];
                let mut left = total;
                let mut first = Some(open);
                loop {
                    let data: Vec<u8> = match first.take() {
                        Some(open) => open,
                        None if left > 0 => {
                            let n = left.min(filler.len());
                            left -= n;
                            filler[..n].to_vec()
                        }
                        None => break,
                    };
                    let mut framed = format!("{:x}\r\n", data.len()).into_bytes();
                    framed.extend_from_slice(&data);
                    framed.extend_from_slice(b"\r\n");
                    if sock.write_all(&framed).await.is_err() {
                        return;
                    }
                    counter.fetch_add(data.len(), Ordering::SeqCst);
                }
                let _ = sock.write_all(b"2\r\n\"}\r\n0\r\n\r\n").await;
            });
        }
    });
    (base, sent)
}

/// A 64 MiB answer is refused at the cap while it streams: the poll fails cleanly (and is
/// retried: it cost nothing), the submit is ambiguous (the API took it), and the server never
/// got to send most of it.
#[tokio::test]
async fn oversized_answers_stop_at_the_cap_while_streaming() {
    use std::sync::atomic::Ordering;
    let total = 64 * 1024 * 1024;
    let (base, sent) = endless_json_server(total).await;
    let p = seedance(&base, false, None, InlinePolicy::refuse());
    let err = p.poll(&rref("r")).await.unwrap_err();
    assert!(matches!(err, ProviderError::TooLarge { limit } if limit == http::MAX_BODY_BYTES), "{err:?}");
    assert_eq!(err.poll_class(), ErrorClass::Retry);
    assert!(err.to_string().contains("larger than"), "{err}");
    // The client hung up after the cap: the server's writes fail soon after (the two sockets'
    // buffers hold a few MB at most).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = sent.load(Ordering::SeqCst);
    assert!(written < total / 4, "the client read on: {written} of {total} bytes were sent");

    let err = p.submit(&edit_job(&["https://cdn/a.png"])).await.unwrap_err();
    assert!(matches!(err, ProviderError::TooLarge { .. }), "{err:?}");
    assert_eq!(err.class(), ErrorClass::Ambiguous);
    let err = fal(&base, None).poll(&rref_fal(&base)).await.unwrap_err();
    assert!(matches!(err, ProviderError::TooLarge { .. }), "{err:?}");

    // Announced as too large: refused without reading.
    let mock = Mock::start().await;
    mock.push(blob(200, vec![b' '; http::MAX_BODY_BYTES + 1], "application/json"));
    let err = seedance(&mock.base, false, None, InlinePolicy::refuse()).poll(&rref("r")).await.unwrap_err();
    assert!(matches!(err, ProviderError::TooLarge { .. }), "{err:?}");

    // Just under the cap is an answer like any other.
    mock.state.replies.lock().unwrap().clear();
    let padding = "x".repeat(http::MAX_BODY_BYTES - 100);
    mock.push(reply(200, &json!({"request_id": "r", "status": "queued", "padding": padding})));
    let polled = seedance(&mock.base, false, None, InlinePolicy::refuse()).poll(&rref("r")).await.unwrap();
    assert_eq!(polled, PollOutcome::Running { queue_position: None });
}

/// Seedance request ids become a path segment of every poll: ids that would change the path
/// (`..` polls `/v1/requests` itself) make the submit ambiguous; usable ids are percent-encoded.
#[tokio::test]
async fn seedance_request_ids_must_be_plain_path_segments() {
    let mock = Mock::start().await;
    let p = seedance(&mock.base, false, None, InlinePolicy::refuse());
    let job = edit_job(&["https://cdn/a.png"]);
    for bad in ["..", ".", "a/b", "a\\b", "x/../y", "..%2f", "id\u{1b}[2J", "id\u{7}"] {
        mock.state.replies.lock().unwrap().clear();
        mock.push(reply(200, &json!({"request_id": bad, "status": "queued"})));
        let err = p.submit(&job).await.unwrap_err();
        assert!(matches!(err, ProviderError::Decode(_)), "{bad:?}: {err:?}");
        assert_eq!(err.class(), ErrorClass::Ambiguous, "{bad:?}");
        let shown = err.to_string();
        assert!(!shown.chars().any(char::is_control), "{bad:?}: control characters shown raw: {shown:?}");
    }
    assert!(mock.seen().iter().all(|s| s.method == "POST"), "nothing was polled");

    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(200, &json!({"request_id": "a b?c#d%e", "status": "queued"})));
    let Submission::Accepted(request) = p.submit(&job).await.unwrap() else { panic!() };
    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(200, &json!({"status": "queued"})));
    p.poll(&request).await.unwrap();
    assert_eq!(mock.seen().last().unwrap().path, "/v1/requests/a%20b%3Fc%23d%25e");

    // A synchronous answer already holds its images: an unusable id is just not recorded.
    mock.state.replies.lock().unwrap().clear();
    mock.push(reply(200, &json!({"id": "..", "images": [{"url": "https://cdn/g.png"}], "credits_used": 8})));
    let mut generate = job.clone();
    generate.task = Task::Generate;
    let Submission::Completed { request_id, result } = p.submit(&generate).await.unwrap() else { panic!() };
    assert_eq!((request_id, result.images.len()), (None, 1));
}

/// Error echoes are scrubbed before they are cut: the key at the 500-character cut, upper-cased
/// or percent-encoded never shows, in any error of either provider.
#[tokio::test]
async fn keys_echoed_at_the_cut_upper_cased_or_percent_encoded_are_scrubbed() {
    let mock = Mock::start().await;
    let job = edit_job(&["https://cdn/a.png"]);
    let lead = "x".repeat(500 - (KEY.len() - 1));
    let encoded: String = KEY.bytes().map(|b| format!("%{b:02X}")).collect();
    let mixed = format!("sk%2d{}", &KEY[3..].to_uppercase());
    let echoes = [
        format!("{lead}{KEY} and more"),
        format!("{lead}{} and more", KEY.to_uppercase()),
        format!("{lead}{encoded} and more"),
        format!("key={mixed}"),
    ];
    let mut errors = Vec::new();
    for echo in &echoes {
        for answer in [
            reply(400, &json!({"error": {"code": "invalid_request", "message": echo}})),
            reply(422, &json!({"detail": [{"loc": ["header"], "msg": echo, "type": "value_error"}]})),
            reply(422, &json!({"detail": echo})),
            blob(502, echo.clone().into_bytes(), "text/html"),
            blob(200, echo.clone().into_bytes(), "application/json"),
        ] {
            mock.state.replies.lock().unwrap().clear();
            mock.push(answer);
            errors.push(
                seedance(&mock.base, false, None, InlinePolicy::refuse()).submit(&job).await.unwrap_err(),
            );
            errors.push(fal(&mock.base, None).submit(&job).await.unwrap_err());
        }
        mock.state.replies.lock().unwrap().clear();
        mock.push(reply(200, &json!({"request_id": "r", "status": "failed", "error": {"message": echo}})));
        errors.push(
            seedance(&mock.base, false, None, InlinePolicy::refuse()).poll(&rref("r")).await.unwrap_err(),
        );
    }
    let partial = KEY[..KEY.len() - 1].to_lowercase();
    let partial_encoded: String = partial.bytes().map(|b| format!("%{b:02x}")).collect();
    for e in &errors {
        let shown = format!("{e} | {e:?}").to_lowercase();
        assert!(!shown.contains(&partial), "key leaked: {shown}");
        assert!(!shown.contains(&partial_encoded), "encoded key leaked: {shown}");
        assert!(!shown.contains(&KEY[3..KEY.len() - 1].to_lowercase()), "key body leaked: {shown}");
        assert!(!shown.contains(&mixed.to_lowercase()[..12]), "mixed encoding leaked: {shown}");
    }
}

// ---------------------------------------------------------------------------------------------
// issue 15: download redirects

/// A server whose `/r/{n}` redirects to `/r/{n-1}` until `/r/0` serves a PNG; `/to?url=` redirects
/// anywhere (never followed to a non-loopback address: the client refuses before connecting).
async fn redirect_server(png: Vec<u8>) -> String {
    async fn hop(
        axum::extract::Path(n): axum::extract::Path<u32>,
        State(png): State<Arc<Vec<u8>>>,
    ) -> Response {
        if n == 0 {
            let mut r = Response::new(Body::from(png.as_ref().clone()));
            r.headers_mut().insert("content-type", HeaderValue::from_static("image/png"));
            return r;
        }
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::FOUND;
        r.headers_mut().insert("location", HeaderValue::from_str(&format!("/r/{}", n - 1)).unwrap());
        r
    }
    async fn to(
        axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    ) -> Response {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        r.headers_mut().insert("location", HeaderValue::from_str(&q["url"]).unwrap());
        r
    }
    let app = axum::Router::new()
        .route("/r/{n}", axum::routing::get(hop))
        .route("/to", axum::routing::get(to))
        .with_state(Arc::new(png));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test]
async fn downloads_follow_at_most_three_redirects_and_only_where_allowed() {
    let png = png_bytes(8, 8);
    let base = redirect_server(png.clone()).await;
    let out = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(downloads(), out.path(), "{sku}/{index}.{ext}", 1_000_000);

    let saved = fetch(&fetcher, "R-3", 0, &output(format!("{base}/r/3"))).await.unwrap();
    assert_eq!(std::fs::read(out.path().join(&saved.path)).unwrap(), png);
    assert_eq!(saved.source_url, format!("{base}/r/3"));

    let err = fetch(&fetcher, "R-4", 0, &output(format!("{base}/r/4"))).await.unwrap_err();
    assert!(
        matches!(&err, FetchError::Refused { reason, .. } if reason.contains("more than 3 redirects")),
        "{err:?}"
    );
    assert!(!err.is_retryable() && !err.is_expired());

    // Targets a download may not reach: refused before any connection is made to them.
    for target in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://10.0.0.1/x.png",
        "http://[fd00::1]/x.png",
        "ftp://127.0.0.1/x.png",
        "file:///etc/passwd",
    ] {
        let url = format!(
            "{base}/to?url={}",
            url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
        );
        let err = fetch(&fetcher, "R-X", 0, &output(url)).await.unwrap_err();
        // reqwest does not even offer a `file:` location to the policy: the 307 comes back as is.
        let refused = matches!(err, FetchError::Refused { .. } | FetchError::Status { status: 307, .. });
        assert!(refused, "{target}: {err:?}");
        assert!(!err.is_retryable() && !err.is_expired(), "{target}");
    }

    // The API base decides: under a public-only policy (an API on the internet), the loopback
    // output URL itself is refused.
    let strict = Fetcher::new(
        DownloadClient::new(Duration::from_secs(5), AddressPolicy::public_only()).unwrap(),
        out.path(),
        "{sku}/{index}.{ext}",
        1_000_000,
    );
    let err = fetch(&strict, "R-0", 0, &output(format!("{base}/r/0"))).await.unwrap_err();
    assert!(matches!(&err, FetchError::Refused { reason, .. } if reason.contains("loopback")), "{err:?}");
    assert_eq!(files(out.path()), ["R-3/0.png"]);
}
