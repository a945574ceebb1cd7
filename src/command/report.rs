//! `backdrop report`: renders the state database as CSV, versioned JSON or a self-contained
//! HTML gallery, to `--output FILE` (written whole, then renamed into place) or stdout. Reads
//! only the store and local files: it never calls an API.

use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::cli::{GlobalArgs, ReportArgs};
use crate::config::DEFAULT_OUT;
use crate::error::Error;
use crate::exit::ExitCode;
use backdrop::report::html::HtmlFormatter;
use backdrop::report::{Format, ReportError, ReportFormatter, RunSummary, formatter};

use super::status::{config_file, require_existing, state_path};

/// Runs `backdrop report`.
///
/// # Errors
/// Exit 2 when the state database does not exist; a database or write error otherwise.
pub(crate) async fn execute(global: &GlobalArgs, args: &ReportArgs) -> Result<ExitCode, Error> {
    let file = config_file(global)?;
    let path = state_path(&args.state, file.as_ref());
    require_existing(&path)?;
    let out_dir = args
        .out
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.out.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));
    let store = backdrop::store::Store::open(&path).await?;
    let summary = RunSummary::load(&store).await?;
    store.close().await;

    let fmt = match (args.format, object_links(&out_dir, &summary).await?) {
        (Format::Html, Some(links)) => {
            let note = format!(
                "link valid {} from the report's time",
                humantime::format_duration(backdrop::fetch::object::GALLERY_URL_LIFETIME)
            );
            Box::new(HtmlFormatter::new(out_dir.clone()).with_links(links, &note))
        }
        _ => formatter(args.format, &out_dir),
    };
    let output = args.output.clone();
    let rows = summary.rows.len();
    // Decoding and downscaling images is CPU work: keep it off the async workers.
    let written =
        tokio::task::spawn_blocking(move || write(fmt.as_ref(), &summary, output.as_deref())).await.map_err(
            |e| Error::Other { message: format!("report writer stopped: {e}"), exit: ExitCode::Fatal },
        )?;
    match written {
        Ok(()) => {
            if let Some(output) = &args.output {
                let format = format!("{:?}", args.format).to_lowercase();
                tracing::info!("wrote the {format} report of {rows} rows to {}", output.display());
            }
            Ok(ExitCode::Success)
        }
        Err(WriteError::Report(e)) if args.output.is_none() && e.is_broken_pipe() => Ok(ExitCode::Success),
        Err(WriteError::Report(e)) => Err(Error::Other { message: e.to_string(), exit: ExitCode::Fatal }),
        Err(WriteError::Io(context, e)) => Err(Error::io(context, e)),
    }
}

/// With `--out s3://...` (or `gs://`, `az://`): every output's presigned GET URL, valid
/// `GALLERY_URL_LIFETIME`, for the gallery's links. Signing is local (credentials from the
/// cloud's environment); nothing is fetched.
async fn object_links(
    out: &Path,
    summary: &RunSummary,
) -> Result<Option<std::collections::HashMap<String, String>>, Error> {
    let url = out.to_string_lossy();
    if !backdrop::fetch::object::is_object_url(&url) {
        return Ok(None);
    }
    let failed = |e: backdrop::fetch::object::ObjectError| Error::Other {
        message: e.to_string(),
        exit: ExitCode::Usage,
    };
    let target = backdrop::fetch::object::ObjectTarget::from_url(&url).map_err(failed)?;
    let mut links = std::collections::HashMap::new();
    for output in summary.rows.iter().flat_map(|r| &r.outputs) {
        let signed = target
            .signed_get(&output.path, backdrop::fetch::object::GALLERY_URL_LIFETIME)
            .await
            .map_err(failed)?;
        links.insert(output.path.clone(), signed);
    }
    Ok(Some(links))
}

enum WriteError {
    Report(ReportError),
    Io(String, std::io::Error),
}

fn write(fmt: &dyn ReportFormatter, summary: &RunSummary, output: Option<&Path>) -> Result<(), WriteError> {
    let Some(output) = output else {
        let mut out = BufWriter::new(std::io::stdout().lock());
        return fmt.write_report(summary, &mut out).map_err(WriteError::Report);
    };
    // Write beside the target and rename, so an old report is never replaced by half a new one.
    let mut tmp_name = output.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let io = |what: &str, e| WriteError::Io(format!("{what} {}", tmp.display()), e);
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        let mut out = BufWriter::new(file);
        fmt.write_report(summary, &mut out).map_err(WriteError::Report)?;
        let file = out.into_inner().map_err(|e| io("writing", e.into_error()))?;
        file.sync_all().map_err(|e| io("syncing", e))?;
        std::fs::rename(&tmp, output)
            .map_err(|e| WriteError::Io(format!("renaming {} to {}", tmp.display(), output.display()), e))
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is clutter, not harm.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    flush_dir(output);
    Ok(())
}

/// The rename is durable only once the directory is synced; a failure here is not worth
/// failing a report over.
fn flush_dir(output: &Path) {
    let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
