//! The provider trait every remote API implements, the results it hands back, and
//! [`ProviderError`]: the one place where an API failure is classified as retry, fail the row,
//! stop the run, or ambiguous (a paid request may have left and we cannot know). Only an answer
//! the API itself wrote proves that a paid request was not charged; everything else after the
//! request left is ambiguous on a submit.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{JobSpec, OutputRef, RequestRef};

pub mod fal;
pub mod http;
pub mod seedance;

/// What to do about an error: decided once, here, for every caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Transient (429, a 5xx the API itself wrote, a connection never made, any failure of a
    /// poll): try again later.
    Retry,
    /// Permanent for this row (400, 422, content policy, a failed generation): record and move on.
    Fail,
    /// The whole run must stop (see [`StopReason`]).
    Stop(StopReason),
    /// A submit may have reached the server and been charged, but no request id came back (a
    /// timeout or reset after sending, a 5xx the API did not write, an unreadable 2xx).
    Ambiguous,
}

/// Why a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// 401/403: the API rejected the key.
    KeyRejected,
    /// 402: not enough credits (nothing was charged).
    OutOfCredits,
}

/// What a 429 says it is about, as the API itself wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// Too many requests per unit of time (seedance `rate_limited`, fal `rate_limited`).
    Rate,
    /// Too many requests in flight (`concurrency_limit_exceeded`, fal's `concurrency_limit`).
    InFlight,
    /// A 429 whose code says neither (then `Retry-After`, or its absence, is the hint).
    Unsaid,
}

/// The error codes that name a cap on requests in flight.
const IN_FLIGHT_CODES: &[&str] = &["concurrency_limit_exceeded", "concurrency_limit", "too_many_in_flight"];
/// The error codes that name a rate limit.
const RATE_CODES: &[&str] = &["rate_limited", "rate_limit_exceeded"];

/// A failure talking to a provider. Never contains the API key: the key only lives in a header.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The API answered with an error status.
    #[error("HTTP {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Http {
        /// The HTTP status.
        status: u16,
        /// The API's error code (`rate_limited`, `insufficient_credits`, fal's `error_type`).
        code: Option<String>,
        /// The API's message, as given.
        message: String,
        /// A `Retry-After` the server sent.
        retry_after: Option<Duration>,
        /// fal's `X-Fal-Retryable` header, when present.
        retryable_hint: Option<bool>,
        /// fal's `X-Fal-Request-Timeout-Type: user` (a 504 the user's own timeout caused).
        user_timeout: bool,
        /// The answer has the API's own documented error shape (see
        /// [`http::Dialect`]): only then does a 5xx prove a paid request was not charged.
        from_api: bool,
    },
    /// The request never reached the server (connection refused, DNS): safe to retry.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The request may have reached the server, but no answer came (timeout, reset, drop).
    #[error("no answer{}: {message}", if *.sent { " after the request was sent" } else { "" })]
    NoAnswer {
        /// True when the body may have been delivered (so a submit may have been charged).
        sent: bool,
        /// What happened.
        message: String,
    },
    /// The answer could not be understood (bad JSON, missing fields, a request id that cannot
    /// be used).
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// A 2xx answer larger than [`http::MAX_BODY_BYTES`]; reading stopped at the cap.
    #[error("the answer is larger than {limit} bytes, the cap on what backdrop reads")]
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
    },
    /// The generation itself failed (seedance `failed` status, fal result with an error).
    #[error("generation failed: {0}")]
    Generation(String),
    /// The row's input cannot be sent (local file too large for a data URI, unreadable file).
    #[error("bad input: {0}")]
    Input(String),
}

impl ProviderError {
    /// How the pipeline must react when this error answers a **submit** (a paid request).
    #[must_use]
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Http { status, retry_after, retryable_hint, user_timeout, from_api, .. } => {
                classify_status(*status, retry_after.is_some(), *retryable_hint, *user_timeout, *from_api)
            }
            Self::Connect(_) => ErrorClass::Retry,
            Self::NoAnswer { sent: false, .. } => ErrorClass::Retry,
            Self::NoAnswer { sent: true, .. } => ErrorClass::Ambiguous,
            // A 2xx we cannot read may have been charged: do not resubmit blindly.
            Self::Decode(_) | Self::TooLarge { .. } => ErrorClass::Ambiguous,
            Self::Generation(_) | Self::Input(_) => ErrorClass::Fail,
        }
    }

    /// How to react when this error answers a **poll** or a result fetch: those cost nothing,
    /// so anything that is not a clear verdict is retried.
    #[must_use]
    pub fn poll_class(&self) -> ErrorClass {
        match self.class() {
            ErrorClass::Ambiguous => ErrorClass::Retry,
            other => other,
        }
    }

    /// True when trying again may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retry
    }

    /// The server's `Retry-After`, if it sent one.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// For a 429: what the API's own error code says it is about. `None` for anything else.
    #[must_use]
    pub fn throttled(&self) -> Option<Throttled> {
        match self {
            Self::Http { status: 429, code, .. } => Some(match code.as_deref() {
                Some(c) if IN_FLIGHT_CODES.contains(&c) => Throttled::InFlight,
                Some(c) if RATE_CODES.contains(&c) => Throttled::Rate,
                _ => Throttled::Unsaid,
            }),
            _ => None,
        }
    }

    /// The HTTP status, if the server answered.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn classify_status(
    status: u16,
    has_retry_after: bool,
    hint: Option<bool>,
    user_timeout: bool,
    from_api: bool,
) -> ErrorClass {
    match status {
        401 | 403 => ErrorClass::Stop(StopReason::KeyRejected),
        402 => ErrorClass::Stop(StopReason::OutOfCredits),
        408 | 429 => ErrorClass::Retry,
        504 if user_timeout => ErrorClass::Fail,
        // A gateway's page or an empty 5xx: the API behind it may have charged the request.
        500..=599 if !from_api => ErrorClass::Ambiguous,
        500..=599 => ErrorClass::Retry,
        // A 4xx with a Retry-After is the server asking us to come back.
        _ if has_retry_after => ErrorClass::Retry,
        _ if hint == Some(true) => ErrorClass::Retry,
        _ => ErrorClass::Fail,
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The output images.
    pub images: Vec<OutputRef>,
    /// What the provider says it charged (credits for seedance; fal does not say).
    pub charged: Option<f64>,
    /// Seedance's `credits_remaining`, for the low-balance warning.
    pub credits_remaining: Option<f64>,
    /// The seed used, when the model returns it.
    pub seed: Option<i64>,
}

impl JobResult {
    /// Keeps only the first `requested` images. Listing more than were asked for breaks the
    /// protocol (the charge is for the requested count, and a hostile list could fill the disk):
    /// the row keeps the requested count and the rest are never downloaded. Answers how many
    /// images were listed when there were too many, for the caller's warning.
    pub fn keep_requested(&mut self, requested: u32) -> Option<usize> {
        let requested = usize::try_from(requested).unwrap_or(usize::MAX);
        let listed = self.images.len();
        (listed > requested).then(|| {
            self.images.truncate(requested);
            listed
        })
    }
}

/// The answer to a submit.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    /// Queued: persist the reference, then poll it.
    Accepted(RequestRef),
    /// Accepted (and paid) but waiting in the provider's queue behind `position` other requests
    /// (fal's `queue_position` above 0): the account runs all it may at once. Persisted and
    /// polled like [`Submission::Accepted`].
    Queued {
        /// Where to find it again.
        request: RequestRef,
        /// Requests ahead of it in the provider's queue.
        position: u32,
    },
    /// Answered synchronously with the outputs (seedance generate, or edit without `async`).
    Completed {
        /// An id to record, when the API gives one.
        request_id: Option<String>,
        /// The result.
        result: JobResult,
    },
}

/// The answer to a poll.
#[derive(Debug, Clone, PartialEq)]
pub enum PollOutcome {
    /// Still queued or running.
    Running {
        /// Position in the provider's queue, when it says.
        queue_position: Option<u32>,
    },
    /// Finished with outputs.
    Completed(JobResult),
}

/// A remote image API. One implementation per wire protocol; the pipeline is generic over it.
pub trait Provider: Send + Sync + 'static {
    /// The provider's name (`seedance`, `fal`), for logs and the store.
    fn name(&self) -> &'static str;

    /// The API base URL requests go to (downloads may also reach addresses of its kind: a base
    /// on 127.0.0.1 allows loopback downloads).
    fn base_url(&self) -> &str;

    /// Work a job needs before its paid request, done before its intent is committed: it is not
    /// paid and is retried on its own (fal uploads local input files here). Answers the job to
    /// submit; the default is the job as it is.
    ///
    /// # Errors
    /// A [`ProviderError`]: [`ErrorClass::Stop`] stops the run, anything else fails the row
    /// (nothing was paid).
    fn prepare(&self, job: &JobSpec) -> impl Future<Output = Result<JobSpec, ProviderError>> + Send {
        std::future::ready(Ok(job.clone()))
    }

    /// Whether [`Provider::submit`] answers only when the generation is done (a synchronous
    /// call): then the server's acceptance is not heard until the end, and the caller counts the
    /// submit as taken when it leaves (a refusal, which comes at once, still says otherwise).
    /// The default is false (answered with a request id at once).
    fn answers_at_completion(&self, job: &JobSpec) -> bool {
        let _ = job;
        false
    }

    /// Sends the paid request. The caller has already committed its intent to the store.
    ///
    /// # Errors
    /// A [`ProviderError`]; [`ProviderError::class`] says what to do.
    fn submit(&self, job: &JobSpec) -> impl Future<Output = Result<Submission, ProviderError>> + Send;

    /// Asks where a saved request is; fetches its result once it is complete.
    ///
    /// # Errors
    /// A [`ProviderError`]; [`ProviderError::poll_class`] says what to do. A generation that
    /// failed on the provider's side is [`ProviderError::Generation`].
    fn poll(&self, request: &RequestRef) -> impl Future<Output = Result<PollOutcome, ProviderError>> + Send;

    /// Follows a saved request by the provider's push (fal's status stream) until it is done:
    /// answers `Ok(true)` the moment the provider says so (then one poll fetches the result),
    /// `Ok(false)` when the protocol has no push.
    ///
    /// # Errors
    /// A [`ProviderError`] when the stream cannot be opened or ends before the request is done;
    /// the caller falls back to polling.
    fn watch(&self, request: &RequestRef) -> impl Future<Output = Result<bool, ProviderError>> + Send {
        let _ = request;
        async { Ok(false) }
    }

    /// Cancels a request that still waits in the provider's queue. Answers true only when the
    /// API itself says it was cancelled before it started (then it is not charged); false when
    /// it cannot be (it started or finished, or the protocol has no cancel).
    ///
    /// # Errors
    /// A [`ProviderError`] when the API could not be asked.
    fn cancel(&self, request: &RequestRef) -> impl Future<Output = Result<bool, ProviderError>> + Send {
        let _ = request;
        async { Ok(false) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> ProviderError {
        http_with(status, None, false)
    }

    fn http_with(status: u16, retryable_hint: Option<bool>, user_timeout: bool) -> ProviderError {
        ProviderError::Http {
            status,
            code: None,
            message: "m".into(),
            retry_after: None,
            retryable_hint,
            user_timeout,
            from_api: true,
        }
    }

    #[test]
    fn statuses_are_classified_as_the_spec_says() {
        assert_eq!(http(400).class(), ErrorClass::Fail);
        assert_eq!(http(422).class(), ErrorClass::Fail);
        assert_eq!(http(401).class(), ErrorClass::Stop(StopReason::KeyRejected));
        assert_eq!(http(403).class(), ErrorClass::Stop(StopReason::KeyRejected));
        assert_eq!(http(402).class(), ErrorClass::Stop(StopReason::OutOfCredits));
        assert_eq!(http(429).class(), ErrorClass::Retry);
        for s in [500, 502, 503, 504] {
            assert_eq!(http(s).class(), ErrorClass::Retry, "{s}");
        }
        let user_504 = http_with(504, None, true);
        assert_eq!(user_504.class(), ErrorClass::Fail);
        let hinted = http_with(422, Some(true), false);
        assert_eq!(hinted.class(), ErrorClass::Retry);
    }

    #[test]
    fn a_5xx_the_api_did_not_write_is_ambiguous_on_a_submit_only() {
        for status in [500, 502, 503, 504] {
            let gateway = ProviderError::Http {
                status,
                code: None,
                message: "<html>Bad Gateway</html>".into(),
                retry_after: None,
                retryable_hint: None,
                user_timeout: false,
                from_api: false,
            };
            assert_eq!(gateway.class(), ErrorClass::Ambiguous, "{status}");
            assert_eq!(gateway.poll_class(), ErrorClass::Retry, "{status}: polls cost nothing");
        }
        let big = ProviderError::TooLarge { limit: 10 };
        assert_eq!((big.class(), big.poll_class()), (ErrorClass::Ambiguous, ErrorClass::Retry));
    }

    #[test]
    fn extra_outputs_are_cut_to_the_requested_count() {
        let image = |i: usize| OutputRef {
            url: format!("https://cdn/{i}.png"),
            content_type: None,
            width: None,
            height: None,
        };
        let mut result = JobResult {
            images: (0..100).map(image).collect(),
            charged: None,
            credits_remaining: None,
            seed: None,
        };
        assert_eq!(result.keep_requested(2), Some(100));
        assert_eq!(result.images, vec![image(0), image(1)]);
        assert_eq!(result.keep_requested(2), None);
        assert_eq!(result.keep_requested(6), None);
        assert_eq!(result.images.len(), 2);
    }

    #[test]
    fn a_429_says_what_it_is_about_through_its_code() {
        let with_code = |status: u16, code: Option<&str>| ProviderError::Http {
            status,
            code: code.map(str::to_owned),
            message: "m".into(),
            retry_after: None,
            retryable_hint: None,
            user_timeout: false,
            from_api: true,
        };
        assert_eq!(with_code(429, Some("concurrency_limit_exceeded")).throttled(), Some(Throttled::InFlight));
        assert_eq!(with_code(429, Some("rate_limited")).throttled(), Some(Throttled::Rate));
        assert_eq!(with_code(429, Some("something_else")).throttled(), Some(Throttled::Unsaid));
        assert_eq!(with_code(429, None).throttled(), Some(Throttled::Unsaid));
        assert_eq!(with_code(503, Some("rate_limited")).throttled(), None);
        assert_eq!(ProviderError::Connect("x".into()).throttled(), None);
    }

    #[test]
    fn a_submit_that_may_have_left_is_ambiguous_but_a_poll_is_retried() {
        let e = ProviderError::NoAnswer { sent: true, message: "reset".into() };
        assert_eq!(e.class(), ErrorClass::Ambiguous);
        assert_eq!(e.poll_class(), ErrorClass::Retry);
        let e = ProviderError::NoAnswer { sent: false, message: "refused".into() };
        assert_eq!(e.class(), ErrorClass::Retry);
        assert_eq!(ProviderError::Connect("refused".into()).class(), ErrorClass::Retry);
    }
}
