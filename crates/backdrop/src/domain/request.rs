//! The provider's handle on a paid request ([`RequestRef`]: its id and, for fal, the URLs it
//! handed back) and on one finished output ([`OutputRef`]: where to download it).

use serde::{Deserialize, Serialize};

/// Where a submitted request can be found again. Persisted the moment it comes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRef {
    /// The provider's request id.
    pub request_id: String,
    /// fal: the status URL, used as given.
    pub status_url: Option<String>,
    /// fal: the result URL, used as given.
    pub response_url: Option<String>,
    /// fal: the cancel URL.
    pub cancel_url: Option<String>,
}

/// One output image as the provider describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    /// Where to download it (valid 24 h on seedance, 7 days on fal).
    pub url: String,
    /// The content type the provider claims.
    pub content_type: Option<String>,
    /// Width the provider claims.
    pub width: Option<u32>,
    /// Height the provider claims.
    pub height: Option<u32>,
}
