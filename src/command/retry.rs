//! `backdrop retry`: puts failed, ambiguous or named rows back to pending for the next `run`.
//! Ambiguous rows are listed with their risk (a paid request may already have gone out) before
//! they are re-queued; rows with a live saved request are left for `run` to resume.

use std::fmt::Write as _;

use crate::cli::{GlobalArgs, RetryArgs};
use crate::error::Error;
use crate::exit::ExitCode;
use backdrop::report::rfc3339;
use backdrop::store::{JobState, KeepReason, Requeue, RequeuePlan, RunLock, Store};

use super::status::{config_file, one_line, print_stdout, require_existing, state_path};

/// Runs `backdrop retry`.
///
/// # Errors
/// Exit 2 when the state database does not exist, a run holds it, or none of the `--sku`
/// values names a row; a database error otherwise.
pub(crate) async fn execute(global: &GlobalArgs, args: &RetryArgs) -> Result<ExitCode, Error> {
    let path = state_path(&args.state, config_file(global)?.as_ref());
    require_existing(&path)?;
    // Re-queueing under a live run would race its claims, and a `submitting` row is only safe
    // to call ambiguous when no process can still be sending it.
    let _lock = RunLock::acquire(&path)?;
    let store = Store::open(&path).await?;
    let which = Requeue { failed: args.failed, ambiguous: args.ambiguous, skus: args.sku.clone() };
    let plan = store.plan_requeue(&which).await?;

    let mut text = String::new();
    for sku in &plan.unknown {
        let _ = writeln!(text, "unknown SKU: {} (not in {})", one_line(sku), path.display());
    }
    if !which.skus.is_empty() && plan.unknown.len() == dedup_len(&which.skus) {
        store.close().await;
        print_stdout(&text)?;
        return Err(Error::Other {
            message: "none of the given SKUs is in the state database; nothing was re-queued".into(),
            exit: ExitCode::Usage,
        });
    }
    let risky: Vec<_> = plan.at_risk().collect();
    if !risky.is_empty() {
        let _ = writeln!(
            text,
            "warning: {} ambiguous row(s): a paid request may already have gone out for them, so the next run \
             may be charged twice:",
            risky.len()
        );
        for job in &risky {
            let _ = writeln!(
                text,
                "  {}  ({}, {} attempt(s), last change {})",
                one_line(&job.sku),
                job.state,
                job.attempts,
                rfc3339(job.updated_at)
            );
        }
    }
    // A failed row with a saved request id was accepted, and may have been charged, by the
    // provider: the generation failed, or the provider no longer knows the request (it expired,
    // or it was held by a `run --simulate` that has since exited). Re-queueing it pays again.
    let paid: Vec<_> =
        plan.requeue.iter().filter(|j| j.state == JobState::Failed && j.request_id.is_some()).collect();
    if !paid.is_empty() {
        let _ = writeln!(
            text,
            "warning: {} failed row(s) had a request the provider accepted and may have charged for; \
             the next run submits them again and pays again:",
            paid.len()
        );
        for job in &paid {
            let _ = writeln!(
                text,
                "  {}  (request {}: {})",
                one_line(&job.sku),
                one_line(job.request_id.as_deref().unwrap_or("?")),
                one_line(job.error.as_deref().unwrap_or("no reason recorded"))
            );
        }
    }
    for (job, reason) in &plan.kept {
        let why = match reason {
            KeepReason::AlreadyPending => "already pending".to_owned(),
            KeepReason::InFlight => format!(
                "left as {}: its paid request {} is saved and the next run resumes it",
                job.state,
                one_line(job.request_id.as_deref().unwrap_or("?"))
            ),
        };
        let _ = writeln!(text, "{}: {why}", one_line(&job.sku));
    }
    let redo = plan.requeue.iter().filter(|j| j.state == JobState::Done).count();
    if redo > 0 {
        let _ = writeln!(text, "note: {redo} done row(s) re-queued: the next run pays for them again");
    }
    // Printed before the change, so the risk is on screen even if the update fails.
    print_stdout(&text)?;

    let moved = store.apply_requeue(&plan).await?;
    store.close().await;
    let summary = if moved == 0 {
        "nothing to re-queue".to_owned()
    } else {
        let rows = if moved == 1 { "row" } else { "rows" };
        format!("re-queued {moved} {rows} ({}); `backdrop run` processes them", by_state(&plan))
    };
    print_stdout(&format!("{summary}\n"))?;
    Ok(ExitCode::Success)
}

/// `2 failed, 1 ambiguous`: what the re-queued rows were, in life order.
fn by_state(plan: &RequeuePlan) -> String {
    JobState::ALL
        .into_iter()
        .filter_map(|st| {
            let n = plan.requeue.iter().filter(|j| j.state == st).count();
            (n > 0).then(|| format!("{n} {st}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn dedup_len(skus: &[String]) -> usize {
    let mut seen: Vec<&String> = skus.iter().collect();
    seen.sort();
    seen.dedup();
    seen.len()
}
