//! `backdrop retry`: puts failed, ambiguous or named rows back to pending for the next `run`.
//! Ambiguous rows are listed with their risk (a paid request may already have gone out) before
//! they are re-queued; rows with a live saved request are left for `run` to resume; a failed row
//! whose paid result is saved is re-queued for its download only; rows the provider already
//! charged are resubmitted only with `--pay-again`, whose warning says they are paid for again.

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
    let lock = RunLock::acquire(&path)?;
    let store = Store::open_locked(&lock).await?;
    let which = Requeue {
        failed: args.failed,
        ambiguous: args.ambiguous,
        skus: args.sku.clone(),
        pay_again: args.pay_again,
    };
    let plan = store.plan_requeue(&which).await?;
    let due: std::collections::HashMap<String, i64> =
        store.downloads_due().await?.into_iter().map(|d| (d.sku, d.deadline)).collect();

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
    let paid_again: Vec<_> = plan.paid_again().collect();
    if !paid_again.is_empty() {
        let _ = writeln!(
            text,
            "warning: --pay-again: {} row(s) the provider already charged are re-queued: the next run pays \
             for them again:",
            paid_again.len()
        );
        for job in &paid_again {
            let _ = writeln!(text, "  {}  ({})", one_line(&job.sku), job.state);
        }
    }
    let now = backdrop::store::now_ms();
    for job in &plan.download {
        let _ = write!(
            text,
            "{}: paid, not downloaded: re-queued to download its saved result again (nothing is paid again)",
            one_line(&job.sku)
        );
        match due.get(&job.sku) {
            Some(&deadline) if deadline <= now => {
                let _ = write!(
                    text,
                    "; its output URLs expired at {}, so the download will likely fail (`--pay-again` submits \
                     it again and pays again)",
                    rfc3339(deadline)
                );
            }
            Some(&deadline) => {
                let _ = write!(text, "; its output URLs work until at least {}", rfc3339(deadline));
            }
            None => {}
        }
        text.push('\n');
    }
    for (job, reason) in &plan.kept {
        let why = match reason {
            KeepReason::AlreadyPending => "already pending".to_owned(),
            KeepReason::InFlight => format!(
                "left as {}: its paid request {} is saved and the next run resumes it",
                job.state,
                one_line(job.request_id.as_deref().unwrap_or("?"))
            ),
            KeepReason::Charged => format!(
                "left as {}: the provider already charged for it{}; `--pay-again` re-queues it and the next \
                 run pays for it again",
                job.state,
                job.request_id.as_deref().map(|r| format!(" (request {})", one_line(r))).unwrap_or_default()
            ),
        };
        let _ = writeln!(text, "{}: {why}", one_line(&job.sku));
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

/// `2 failed, 1 ambiguous, 3 for download only`: what the re-queued rows were, in life order.
fn by_state(plan: &RequeuePlan) -> String {
    let mut parts: Vec<String> = JobState::ALL
        .into_iter()
        .filter_map(|st| {
            let n = plan.requeue.iter().filter(|j| j.state == st).count();
            (n > 0).then(|| format!("{n} {st}"))
        })
        .collect();
    if !plan.download.is_empty() {
        parts.push(format!("{} for download only", plan.download.len()));
    }
    parts.join(", ")
}

fn dedup_len(skus: &[String]) -> usize {
    let mut seen: Vec<&String> = skus.iter().collect();
    seen.sort();
    seen.dedup();
    seen.len()
}
