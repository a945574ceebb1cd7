//! `backdrop accept`: a person looked at rows the quality gate held (`review`) and accepts their
//! outputs as they are: the rows become `done`, each after the template's export presets made its
//! exports (with the presets and output folder the last run recorded). Nothing is sent to a
//! provider and nothing is paid.

use std::fmt::Write as _;

use crate::cli::{AcceptArgs, GlobalArgs};
use crate::error::Error;
use crate::exit::ExitCode;
use backdrop::fetch::Persister;
use backdrop::pipeline::export::Exporter;
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
    let mut text = String::new();
    let mut held = Vec::new();
    let accepted = match exporter(&store).await? {
        // An empty list to `accept_review` means every review row: only rows whose exports were
        // made are accepted, by name.
        Some(exporter) => {
            let mut ready = Vec::new();
            for row in store.review_candidates(skus).await? {
                match exporter.export(&row.outputs, &row.have, true).await {
                    Ok(made) => {
                        store.record_exports(row.job_id, &made).await?;
                        ready.push(row.sku);
                    }
                    Err(e) => {
                        let _ = writeln!(
                            text,
                            "not accepted, exports cannot be made: {}: {e}",
                            one_line(&row.sku)
                        );
                        held.push(row.sku);
                    }
                }
            }
            if ready.is_empty() { Vec::new() } else { store.accept_review(&ready).await? }
        }
        None => store.accept_review(skus).await?,
    };
    store.close().await;
    for sku in &accepted {
        let _ = writeln!(text, "accepted {}", one_line(sku));
    }
    for sku in args.sku.iter().filter(|s| !accepted.contains(s) && !held.contains(s)) {
        let _ = writeln!(text, "not in review, left as it is: {}", one_line(sku));
    }
    let _ = writeln!(text, "{} row(s) accepted: now done", accepted.len());
    print_stdout(&text)?;
    if !held.is_empty() {
        return Err(Error::Other {
            message: format!(
                "{} row(s) stay in review: their exports cannot be made (see above)",
                held.len()
            ),
            exit: ExitCode::RowsFailed,
        });
    }
    if !args.sku.is_empty() && accepted.is_empty() {
        return Err(Error::Other {
            message: "none of the given SKUs is a review row; nothing was accepted".into(),
            exit: ExitCode::Usage,
        });
    }
    Ok(ExitCode::Success)
}

/// The exporter of the presets and output folder the last run recorded; none without presets.
async fn exporter(store: &Store) -> Result<Option<Exporter>, Error> {
    let Some((out_dir, json)) = store.export_settings().await? else { return Ok(None) };
    let presets = Exporter::presets_from_json(&json)
        .map_err(|message| Error::Other { message, exit: ExitCode::Fatal })?;
    Ok(Exporter::new(&presets, &out_dir, Persister::start(&out_dir)))
}
