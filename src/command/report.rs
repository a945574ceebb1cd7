//! `backdrop report`: renders the state database as CSV, versioned JSON or a self-contained
//! HTML gallery, to `--output FILE` (written whole, then renamed into place) or stdout; an HTML
//! gallery asked for at a terminal goes to `report.html` instead. Reads only the store and
//! local files: it never calls an API.

use std::io::{BufWriter, IsTerminal as _};
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
    let to_terminal = std::io::stdout().is_terminal();
    let default_exists = Path::new(DEFAULT_HTML_FILE).exists();
    let output = destination(args.format, args.output.as_deref(), to_terminal, default_exists)
        .map_err(|message| Error::Other { message, exit: ExitCode::Usage })?;
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
    let rows = summary.rows.len();
    // Decoding and downscaling images is CPU work: keep it off the async workers.
    let target = output.clone();
    let written =
        tokio::task::spawn_blocking(move || write(fmt.as_ref(), &summary, target.as_deref())).await.map_err(
            |e| Error::Other { message: format!("report writer stopped: {e}"), exit: ExitCode::Fatal },
        )?;
    match written {
        Ok(()) => {
            match (&output, &args.output) {
                (Some(file), None) if !global.quiet => eprintln!(
                    "wrote the html report of {rows} rows to {} (open it in a browser; --output FILE \
                     names another file, and piped the report goes to stdout)",
                    file.display()
                ),
                (Some(file), _) => {
                    let format = args.format.as_str();
                    tracing::info!("wrote the {format} report of {rows} rows to {}", file.display());
                }
                (None, _) => {}
            }
            Ok(ExitCode::Success)
        }
        Err(WriteError::Report(e)) if output.is_none() && e.is_broken_pipe() => Ok(ExitCode::Success),
        Err(WriteError::Report(e)) => Err(Error::Other { message: e.to_string(), exit: ExitCode::Fatal }),
        Err(WriteError::Io(context, e)) => Err(Error::io(context, e)),
    }
}

/// Where an HTML report asked for at a terminal goes: a page of embedded pictures is no use
/// on a screen.
pub(crate) const DEFAULT_HTML_FILE: &str = "report.html";

/// Where the report goes: `--output`, else stdout, except an HTML report with stdout at a
/// terminal, which goes to [`DEFAULT_HTML_FILE`] (never over an existing one). `Err` is the
/// message of a usage error.
fn destination(
    format: Format,
    output: Option<&Path>,
    stdout_is_terminal: bool,
    default_exists: bool,
) -> Result<Option<PathBuf>, String> {
    match output {
        Some(file) => Ok(Some(file.to_owned())),
        None if format == Format::Html && stdout_is_terminal => {
            if default_exists {
                Err(format!(
                    "the html report is a web page, not for a terminal, and {DEFAULT_HTML_FILE} already \
                     exists: pass --output {DEFAULT_HTML_FILE} to replace it, or --output FILE"
                ))
            } else {
                Ok(Some(PathBuf::from(DEFAULT_HTML_FILE)))
            }
        }
        None => Ok(None),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_at_a_terminal_goes_to_a_file_and_piped_to_stdout() {
        let file = |p: &str| Ok(Some(PathBuf::from(p)));
        // Piped, or not html: stdout.
        assert_eq!(destination(Format::Html, None, false, false), Ok(None));
        assert_eq!(destination(Format::Html, None, false, true), Ok(None));
        assert_eq!(destination(Format::Csv, None, true, false), Ok(None));
        assert_eq!(destination(Format::Json, None, true, true), Ok(None));
        // At a terminal: report.html, never over an existing one.
        assert_eq!(destination(Format::Html, None, true, false), file(DEFAULT_HTML_FILE));
        let refused = destination(Format::Html, None, true, true).unwrap_err();
        assert!(refused.contains("already exists") && refused.contains("--output"), "{refused}");
        // --output always wins.
        let out = Some(Path::new("r.html"));
        assert_eq!(destination(Format::Html, out, true, true), file("r.html"));
        assert_eq!(destination(Format::Csv, out, false, false), file("r.html"));
    }
}
