//! `backdrop retry`: puts failed, ambiguous or named rows back to pending for the next `run`.
//! Ambiguous rows are listed with their risk (a paid request may already have gone out) before
//! they are re-queued; rows with a live saved request are left for `run` to resume; a failed row
//! whose paid result is saved is re-queued for its download only; rows the provider already
//! charged are resubmitted only with `--pay-again`, whose warning says they are paid for again.
//! `--review` regenerates rows the quality gate held, each with a new seed, after saying what
//! that costs; their old outputs are moved aside under the output folder and recorded.

use std::fmt::Write as _;

use crate::cli::{GlobalArgs, RetryArgs};
use crate::error::Error;
use crate::exit::ExitCode;
use backdrop::report::rfc3339;
use backdrop::store::{JobState, KeepReason, KeptOutput, Requeue, RequeuePlan, RunLock, Store};

use super::status::{config_file, one_line, print_stdout, require_existing, state_path};

/// Runs `backdrop retry`.
///
/// # Errors
/// Exit 2 when the state database does not exist, a run holds it, or none of the `--sku`
/// values names a row; a database error otherwise.
pub(crate) async fn execute(global: &GlobalArgs, args: &RetryArgs) -> Result<ExitCode, Error> {
    if args.review {
        return execute_review(global, args).await;
    }
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
            KeepReason::Charged if job.state == JobState::Review => format!(
                "left as review: the provider already charged for it and the quality gate held it; \
                 `backdrop accept --sku {s}` keeps its output, `backdrop retry --review --sku {s}` generates \
                 it again with a new seed and pays again",
                s = one_line(&job.sku)
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

/// `backdrop retry --review`: the rows the quality gate held (all, or the `--sku` ones) go back to
/// pending with a new seed each. What that costs is printed first; then each row's old outputs
/// are moved to `OUT/review-kept/N/` (N: the row's retry number) and synced, and only then is the
/// state file changed, recording the seeds and where the old files are. If that change fails,
/// the files are moved back.
async fn execute_review(global: &GlobalArgs, args: &RetryArgs) -> Result<ExitCode, Error> {
    let file = config_file(global)?;
    let path = state_path(&args.state, file.as_ref());
    require_existing(&path)?;
    let out_dir = args
        .out
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.out.clone()))
        .unwrap_or_else(|| std::path::PathBuf::from(crate::config::DEFAULT_OUT));
    if backdrop::fetch::object::is_object_url(&out_dir.to_string_lossy()) {
        return Err(Error::Other {
            message: format!(
                "retry --review keeps the old outputs by moving them aside inside the output folder, which \
                 cannot be done in a bucket ({}); nothing was re-queued",
                out_dir.display()
            ),
            exit: ExitCode::Usage,
        });
    }
    let prices = file.as_ref().and_then(|f| f.prices.clone()).unwrap_or_default();
    let lock = RunLock::acquire(&path)?;
    let store = Store::open_locked(&lock).await?;
    let plan = store.plan_review_retry(&args.sku).await?;

    let mut text = String::new();
    for sku in &plan.unknown {
        let _ = writeln!(text, "unknown SKU: {} (not in {})", one_line(sku), path.display());
    }
    for (sku, state) in &plan.not_review {
        let _ = writeln!(text, "{}: left as {state}: not held for review", one_line(sku));
    }
    if plan.rows.is_empty() {
        store.close().await;
        text.push_str("nothing to re-queue: no row is held for review\n");
        print_stdout(&text)?;
        return if !args.sku.is_empty() && plan.unknown.len() == dedup_len(&args.sku) {
            Err(Error::Other {
                message: "none of the given SKUs is in the state database; nothing was re-queued".into(),
                exit: ExitCode::Usage,
            })
        } else {
            Ok(ExitCode::Success)
        };
    }
    let _ = writeln!(
        text,
        "warning: --review: {} row(s) held for review are re-queued to be generated again with a new seed: \
         the next run PAYS FOR THEM AGAIN, {}:",
        plan.rows.len(),
        estimate(&plan.rows, &prices)
    );
    for row in &plan.rows {
        let old = row.old_seed.map_or_else(|| "none".to_owned(), |s| s.to_string());
        let _ = writeln!(
            text,
            "  {}  (seed {old} -> {}, {} image(s); its {} old output(s) kept in {})",
            one_line(&row.sku),
            row.new_seed,
            row.images,
            row.outputs.len(),
            out_dir.join(backdrop::store::REVIEW_KEPT_DIR).join(row.retry.to_string()).display()
        );
    }
    // Printed before the change, so the cost is on screen even if something below fails.
    print_stdout(&text)?;

    let mut moves: Vec<(backdrop::store::ReviewRetry, Vec<KeptOutput>)> = Vec::new();
    let mut notes = String::new();
    for row in plan.rows {
        match keep_aside(&out_dir, &row) {
            Ok((kept, missing)) => {
                for p in missing {
                    let _ = writeln!(
                        notes,
                        "{}: output {p} is not in {} (nothing to keep)",
                        one_line(&row.sku),
                        out_dir.display()
                    );
                }
                moves.push((row, kept));
            }
            Err(e) => {
                undo_moves(&out_dir, &moves);
                store.close().await;
                return Err(Error::io(format!("keeping the old outputs of {} aside", one_line(&row.sku)), e));
            }
        }
    }
    let moved = match store.apply_review_retry(&moves).await {
        Ok(moved) => moved,
        Err(e) => {
            undo_moves(&out_dir, &moves);
            store.close().await;
            return Err(e.into());
        }
    };
    // Rows that left review between the plan and the change keep their files where they were.
    let left: Vec<_> = moves.iter().filter(|(r, _)| !moved.contains(&r.sku)).cloned().collect();
    undo_moves(&out_dir, &left);
    store.close().await;
    let rows = if moved.len() == 1 { "row" } else { "rows" };
    let _ = writeln!(
        notes,
        "re-queued {} {rows} held for review, each with a new seed; `backdrop run` generates them again \
         (old outputs kept under {})",
        moved.len(),
        out_dir.join(backdrop::store::REVIEW_KEPT_DIR).display()
    );
    print_stdout(&notes)?;
    Ok(ExitCode::Success)
}

/// `16 cr ($0.16)`, or per model when the rows ask for several, through the price table (built-in
/// prices with the config's `[prices]` on top).
fn estimate(
    rows: &[backdrop::store::ReviewRetry],
    prices: &std::collections::BTreeMap<String, f64>,
) -> String {
    let mut images: std::collections::BTreeMap<(&str, &str), u64> = std::collections::BTreeMap::new();
    for r in rows {
        *images.entry((r.provider.as_str(), r.model.as_str())).or_default() += u64::from(r.images.max(1));
    }
    let parts: Vec<String> = images
        .into_iter()
        .map(|((provider, model), n)| {
            let priced = provider.parse::<backdrop::domain::ProviderKind>().ok().and_then(|kind| {
                let table = backdrop::money::PriceTable::new(kind, prices);
                table.images_price(model, n).map(|amount| table.unit().show(amount))
            });
            match priced {
                Some(shown) if rows.len() > 1 => format!("about {shown} for {n} image(s) of {model}"),
                Some(shown) => format!("about {shown}"),
                None => format!("{n} image(s) of {model} at an unknown price (add it to [prices])"),
            }
        })
        .collect();
    parts.join(", ")
}

/// Moves a row's outputs to `review-kept/N/` under `out`, each rename synced (file's new folder
/// and old folder). Returns what was kept and the outputs already absent. A file found at its
/// kept place and not at its own was moved by an earlier attempt that stopped before the state
/// file changed: it counts as kept.
fn keep_aside(
    out: &std::path::Path,
    row: &backdrop::store::ReviewRetry,
) -> std::io::Result<(Vec<KeptOutput>, Vec<String>)> {
    let mut kept = Vec::new();
    let mut missing = Vec::new();
    for o in &row.outputs {
        let rel = std::path::Path::new(&o.path);
        if !rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
        {
            missing.push(o.path.clone());
            continue;
        }
        let kept_as = backdrop::store::kept_path(&o.path, row.retry);
        let (from, to) = (out.join(rel), out.join(&kept_as));
        let record = KeptOutput { index: o.idx, path: o.path.clone(), kept_as, sha256: o.sha256.clone() };
        match std::fs::symlink_metadata(&from) {
            Ok(_) => {
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                if to.exists() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("{} already exists; not replacing it", to.display()),
                    ));
                }
                std::fs::rename(&from, &to)?;
                sync_parent(&to)?;
                sync_parent(&from)?;
                kept.push(record);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => kept.push(record),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(o.path.clone()),
            Err(e) => return Err(e),
        }
    }
    Ok((kept, missing))
}

/// Puts moved outputs back where they were (best effort: this runs on the way out of an error,
/// and a file left at its kept place is still there, not lost).
fn undo_moves(out: &std::path::Path, moves: &[(backdrop::store::ReviewRetry, Vec<KeptOutput>)]) {
    for k in moves.iter().flat_map(|(_, kept)| kept) {
        let (from, to) = (out.join(&k.kept_as), out.join(&k.path));
        if !to.exists() && std::fs::rename(&from, &to).is_ok() {
            let _ = sync_parent(&to);
        }
    }
}

fn sync_parent(path: &std::path::Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
