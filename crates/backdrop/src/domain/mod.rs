//! The vocabulary every other module speaks, with no behaviour beyond parsing and naming: which
//! provider, the API key, a request rate, one job's shape, the provider's handle on a paid
//! request, an output saved to disk, and outside text made safe for a terminal ([`text`]). It
//! imports nothing else of backdrop, so anyone may use it.

pub mod job;
mod output;
mod provider;
mod rate;
mod request;
mod secret;
pub mod text;

pub use job::{JobSpec, Params, Task};
pub use output::{SavedExport, SavedOutput};
pub use provider::{
    DEFAULT_FAL_EDIT_MODEL, DEFAULT_FAL_GENERATE_MODEL, DEFAULT_SEEDANCE_MODEL, ProviderKind,
};
pub use rate::Rate;
pub use request::{OutputRef, RequestRef};
pub use secret::ApiKey;
