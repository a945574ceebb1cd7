//! The CSV report: one line per catalog row, in catalog order, under a fixed header
//! ([`CSV_HEADER`]) whose columns only change or move with [`super::REPORT_VERSION`]; a new
//! column may be appended at the end within a version (readers go by column name). Cells a
//! spreadsheet would read as a formula are neutralised with a leading `'`.

use std::io::Write;

use super::{ReportError, ReportFormatter, RunSummary, format_amount};

/// The header row, stable within a report version. `output_paths` and `sha256` hold one entry
/// per output file, joined by `;` in output order; `credits` is in the provider's unit
/// (seedance credits, fal dollars); `reused_from` is the SKU whose result the row shares (its
/// files are copies, its cost nothing), empty for a row that made its own request;
/// `export_paths` and `export_sha256` hold one entry per export file (output order, then preset
/// name), joined by `;`.
pub const CSV_HEADER: [&str; 15] = [
    "sku",
    "state",
    "provider",
    "request_id",
    "prompt",
    "output_paths",
    "sha256",
    "credits",
    "attempts",
    "error",
    "reused_from",
    "quality_scores",
    "quality_reasons",
    "export_paths",
    "export_sha256",
];

/// Writes the summary's rows as CSV.
#[derive(Debug, Clone, Copy, Default)]
pub struct CsvFormatter;

impl ReportFormatter for CsvFormatter {
    fn write_report(&self, summary: &RunSummary, out: &mut dyn Write) -> Result<(), ReportError> {
        let mut w = ::csv::Writer::from_writer(out);
        w.write_record(CSV_HEADER)?;
        for row in &summary.rows {
            let paths: Vec<&str> = row.outputs.iter().map(|o| o.path.as_str()).collect();
            let hashes: Vec<&str> = row.outputs.iter().map(|o| o.sha256.as_str()).collect();
            let export_paths: Vec<&str> = row.exports.iter().map(|e| e.path.as_str()).collect();
            let export_hashes: Vec<&str> = row.exports.iter().map(|e| e.sha256.as_str()).collect();
            let record = [
                row.sku.clone(),
                row.state.to_string(),
                row.provider.clone(),
                row.request_id.clone().unwrap_or_default(),
                row.prompt.clone(),
                paths.join(";"),
                hashes.join(";"),
                format_amount(row.credits),
                row.attempts.to_string(),
                row.error.clone().unwrap_or_default(),
                row.reused_from.clone().unwrap_or_default(),
                row.quality_scores.clone(),
                row.quality_reasons.clone(),
                export_paths.join(";"),
                export_hashes.join(";"),
            ];
            w.write_record(record.iter().map(|cell| neutralise(cell).into_owned()))?;
        }
        w.flush()?;
        Ok(())
    }
}

/// Makes a cell safe to open in a spreadsheet: one starting with `=`, `+`, `-`, `@`, a tab or a
/// carriage return would be read as a formula (OWASP "CSV injection"), so it gets a leading `'`.
#[must_use]
pub fn neutralise(cell: &str) -> std::borrow::Cow<'_, str> {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        std::borrow::Cow::Owned(format!("'{cell}"))
    } else {
        std::borrow::Cow::Borrowed(cell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support::summary;

    #[test]
    fn formula_cells_are_neutralised() {
        for bad in ["=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(neutralise(bad), format!("'{bad}"));
        }
        assert_eq!(neutralise("SKU-1"), "SKU-1");
        assert_eq!(neutralise(""), "");
    }

    #[test]
    fn one_line_per_row_under_the_stable_header() {
        let mut buf = Vec::new();
        CsvFormatter.write_report(&summary(), &mut buf).unwrap();
        let mut r = ::csv::Reader::from_reader(buf.as_slice());
        let header: Vec<String> = r.headers().unwrap().iter().map(str::to_owned).collect();
        assert_eq!(header, CSV_HEADER);
        let rows: Vec<::csv::StringRecord> = r.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(&rows[0][0], "'=HYPERLINK(\"x\")");
        assert_eq!(&rows[0][5], "A/0.png;A/1.png");
        assert_eq!(&rows[0][7], "30");
        assert_eq!(&rows[0][13], "amazon/A/0.jpg");
        assert_eq!(rows[0][14], "e".repeat(64));
        assert_eq!(&rows[1][13], "");
        assert_eq!(&rows[1][1], "failed");
        assert_eq!(&rows[1][9], "'-HTTP 422, \"content policy\"\nsecond line");
    }
}
