//! The JSON report: the [`RunSummary`] itself, pretty-printed, with `"version": 1` at the top so
//! scripts can check the shape they parse. Fields are only ever added within a version.

use std::io::Write;

use super::{ReportError, ReportFormatter, RunSummary};

/// Writes the summary as one JSON document.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFormatter;

impl ReportFormatter for JsonFormatter {
    fn write_report(&self, summary: &RunSummary, out: &mut dyn Write) -> Result<(), ReportError> {
        serde_json::to_writer_pretty(&mut *out, summary)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support::summary;

    #[test]
    fn json_is_versioned_and_keeps_catalog_order() {
        let mut buf = Vec::new();
        JsonFormatter.write_report(&summary(), &mut buf).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["rows"][0]["sku"], "=HYPERLINK(\"x\")");
        assert_eq!(v["rows"][1]["state"], "failed");
        assert_eq!(v["rows"][0]["outputs"][0]["path"], "A/0.png");
        assert_eq!(v["rows"][0]["exports"][0]["path"], "amazon/A/0.jpg");
        assert_eq!(v["rows"][0]["exports"][0]["preset"], "amazon");
        assert_eq!(v["rows"][1]["exports"], serde_json::json!([]));
        assert_eq!(v["counts"]["total"], 2);
        assert_eq!(v["spent"]["seedance_credits"], 30.0);
    }
}
