//! `backdrop accept`: a person looked at rows the quality gate held (`review`) and accepts their
//! outputs as they are: the rows become `done`. Nothing is sent to a provider and nothing is paid.

use std::fmt::Write as _;

use crate::cli::{AcceptArgs, GlobalArgs};
use crate::error::Error;
use crate::exit::ExitCode;
use backdrop::store::{RunLock, Store};

use super::status::{config_file, one_line, print_stdout, require_existing, state_path};

/// Runs `backdrop accept`.
///
/// # Errors
/// Exit 2 when the state database does not exist, a run holds it, or `--sku` names no review
/// row; a database error otherwise.
pub(crate) async fn execute(global: &GlobalArgs, args: &AcceptArgs) -> Result<ExitCode, Error> {
    let path = state_path(&args.state, config_file(global)?.as_ref());
    require_existing(&path)?;
    // A run writes these rows' states: wait for none to be running.
    let lock = RunLock::acquire(&path)?;
    let store = Store::open_locked(&lock).await?;
    let skus: &[String] = if args.all_review { &[] } else { &args.sku };
    let accepted = store.accept_review(skus).await?;
    store.close().await;
    let mut text = String::new();
    for sku in &accepted {
        let _ = writeln!(text, "accepted {}", one_line(sku));
    }
    for sku in args.sku.iter().filter(|s| !accepted.contains(s)) {
        let _ = writeln!(text, "not in review, left as it is: {}", one_line(sku));
    }
    let _ = writeln!(text, "{} row(s) accepted: now done", accepted.len());
    print_stdout(&text)?;
    if !args.sku.is_empty() && accepted.is_empty() {
        return Err(Error::Other {
            message: "none of the given SKUs is a review row; nothing was accepted".into(),
            exit: ExitCode::Usage,
        });
    }
    Ok(ExitCode::Success)
}
