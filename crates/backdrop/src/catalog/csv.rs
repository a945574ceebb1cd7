//! The CSV catalog source: a streaming reader (one record in memory at a time) that accepts a
//! UTF-8 BOM, CRLF and quoted newlines, and turns ragged rows and invalid UTF-8 into row
//! problems with their line and byte offset instead of aborting.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{CatalogError, Location, RawRow};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A CSV catalog being read.
#[derive(Debug)]
pub struct CsvSource {
    path: PathBuf,
    reader: csv::Reader<CrLf<File>>,
    columns: Result<Vec<String>, String>,
    record: csv::ByteRecord,
    /// Bytes skipped before the csv reader starts (the BOM), added back to byte offsets.
    skipped: u64,
}

impl CsvSource {
    /// Opens a CSV file and reads its header row.
    ///
    /// # Errors
    /// [`CatalogError::Io`] when the file cannot be read, [`CatalogError::Unusable`] when it is
    /// empty.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        let io = |source| CatalogError::Io { path: path.to_owned(), source };
        let mut file = File::open(path).map_err(io)?;
        let mut head = [0u8; 3];
        let n = read_up_to(&mut file, &mut head).map_err(io)?;
        let skipped = if head[..n] == *BOM {
            3
        } else {
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            0
        };
        let mut reader =
            csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(CrLf::new(file));
        let header = reader.byte_headers().map_err(|e| csv_error(path, e))?.clone();
        if header.is_empty() {
            return Err(CatalogError::Unusable {
                path: path.to_owned(),
                message: "the file is empty (expected a header row with a sku column)".into(),
            });
        }
        let columns = header
            .iter()
            .enumerate()
            .map(|(i, field)| {
                std::str::from_utf8(field).map(|s| s.trim().to_owned()).map_err(|e| {
                    let at = skipped + field_offset(&header, i) + e.valid_up_to() as u64;
                    format!("invalid UTF-8 at byte {at}")
                })
            })
            .collect();
        Ok(Self { path: path.to_owned(), reader, columns, record: csv::ByteRecord::new(), skipped })
    }

    /// The header's column names (trimmed), or its problem.
    pub fn columns(&self) -> &Result<Vec<String>, String> {
        &self.columns
    }

    /// The next record, or `None` at the end of the file.
    ///
    /// # Errors
    /// [`CatalogError::Io`] when reading fails part-way.
    pub fn next_row(&mut self) -> Result<Option<RawRow>, CatalogError> {
        loop {
            if !self.reader.read_byte_record(&mut self.record).map_err(|e| csv_error(&self.path, e))? {
                return Ok(None);
            }
            // A blank line (or one of spaces, which is what a CRLF blank line becomes) is not a row.
            let blank = self.record.len() == 1 && self.record[0].iter().all(u8::is_ascii_whitespace);
            if !blank {
                break;
            }
        }
        let (line, start) = self.record.position().map_or((0, 0), |p| (p.line(), p.byte()));
        let mut values = Vec::with_capacity(self.record.len());
        let mut bad = None;
        for (i, field) in self.record.iter().enumerate() {
            match std::str::from_utf8(field) {
                Ok(s) => values.push(s.trim().to_owned()),
                Err(e) => {
                    // Exact for unquoted fields; a quoted field is off by its quote characters.
                    let at = self.skipped + start + field_offset(&self.record, i) + e.valid_up_to() as u64;
                    bad = Some(format!("invalid UTF-8 at byte {at}"));
                    break;
                }
            }
        }
        let position = i64::try_from(line).unwrap_or(i64::MAX);
        Ok(Some(RawRow { location: Location::Line(line), position, values: bad.map_or(Ok(values), Err) }))
    }
}

/// Turns the `\r` of every `\r\n` into a space before the csv reader sees it.
///
/// Why: after a record that ends in `\r\n` the csv reader stops at the `\r`, so the next
/// record's position points at the `\n`, one line and one byte early. A space keeps every byte
/// offset exact, and cells are trimmed anyway (a quoted multi-line cell keeps its line breaks,
/// with a trailing space on each line).
#[derive(Debug)]
struct CrLf<R> {
    inner: BufReader<R>,
    /// A `\r` that ended the previous chunk, not yet emitted: the next byte decides.
    held_cr: bool,
}

impl<R: Read> CrLf<R> {
    fn new(inner: R) -> Self {
        Self { inner: BufReader::with_capacity(64 * 1024, inner), held_cr: false }
    }
}

impl<R: Read> Read for CrLf<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if out.is_empty() {
                return Ok(0);
            }
            let avail = self.inner.fill_buf()?;
            if avail.is_empty() {
                if self.held_cr {
                    self.held_cr = false;
                    out[0] = b'\r';
                    return Ok(1);
                }
                return Ok(0);
            }
            let mut n = 0;
            if self.held_cr {
                self.held_cr = false;
                out[0] = if avail[0] == b'\n' { b' ' } else { b'\r' };
                n = 1;
            }
            let take = avail.len().min(out.len() - n);
            out[n..n + take].copy_from_slice(&avail[..take]);
            self.inner.consume(take);
            let end = n + take;
            for i in n..end.saturating_sub(1) {
                if out[i] == b'\r' && out[i + 1] == b'\n' {
                    out[i] = b' ';
                }
            }
            let mut emitted = end;
            if out[end - 1] == b'\r' && take > 0 {
                self.held_cr = true;
                emitted -= 1;
            }
            if emitted > 0 {
                return Ok(emitted);
            }
        }
    }
}

/// Offset of field `i` from the record's start: the bytes of the fields before it plus one
/// delimiter each.
fn field_offset(record: &csv::ByteRecord, i: usize) -> u64 {
    record.range(i).map_or(0, |r| (r.start + i) as u64)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn csv_error(path: &Path, e: csv::Error) -> CatalogError {
    let line = e.position().map(csv::Position::line);
    match e.into_kind() {
        csv::ErrorKind::Io(source) => CatalogError::Io { path: path.to_owned(), source },
        other => CatalogError::Unusable {
            path: path.to_owned(),
            message: match line {
                Some(l) => format!("line {l}: {other:?}"),
                None => format!("{other:?}"),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> (Result<Vec<String>, String>, Vec<RawRow>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.csv");
        std::fs::write(&path, bytes).unwrap();
        let mut src = CsvSource::open(&path).unwrap();
        let mut rows = Vec::new();
        while let Some(r) = src.next_row().unwrap() {
            rows.push(r);
        }
        (src.columns().clone(), rows)
    }

    #[test]
    fn bom_crlf_and_quoted_newlines() {
        let (cols, rows) = read_all(
            b"\xEF\xBB\xBFsku,name\r\nA-1,\"two\r\nlines\"\r\nA-2,plain\r\n\r\nA-3,\"x, \"\"q\"\"\"\r\n",
        );
        assert_eq!(cols.unwrap(), ["sku", "name"]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].values.as_ref().unwrap(), &["A-1", "two \nlines"]);
        assert_eq!(rows[0].location, Location::Line(2));
        assert_eq!(rows[1].location, Location::Line(4), "line numbers count the quoted newline");
        assert_eq!(rows[2].values.as_ref().unwrap(), &["A-3", "x, \"q\""]);
    }

    #[test]
    fn invalid_utf8_names_the_byte() {
        // Header is 9 bytes ("sku,name\n"); row 2 starts at byte 9; "A-1," is 4; the bad byte
        // follows "ok" at offset 9 + 4 + 2 = 15.
        let (_, rows) = read_all(b"sku,name\nA-1,ok\xFFno\n");
        assert_eq!(rows[0].values, Err("invalid UTF-8 at byte 15".to_owned()));
        let (_, rows) = read_all(b"\xEF\xBB\xBFsku,name\nA-1,ok\xFFno\n");
        assert_eq!(rows[0].values, Err("invalid UTF-8 at byte 18".to_owned()), "BOM counted");
    }

    #[test]
    fn crlf_split_across_reads_is_handled() {
        let text = b"a\r\nb\rc\r\n\r";
        for chunk in 1..text.len() {
            let mut r = CrLf::new(std::io::Cursor::new(text.to_vec()));
            let mut out = Vec::new();
            let mut buf = vec![0u8; chunk];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            assert_eq!(out, b"a \nb\rc \n\r", "chunk {chunk}");
        }
    }

    #[test]
    fn ragged_rows_come_through_for_validation() {
        let (_, rows) = read_all(b"sku,name\nA-1\nA-2,b,c\n");
        assert_eq!(rows[0].values.as_ref().unwrap().len(), 1);
        assert_eq!(rows[1].values.as_ref().unwrap().len(), 3);
    }

    #[test]
    fn empty_file_is_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.csv");
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(CsvSource::open(&path), Err(CatalogError::Unusable { .. })));
    }
}
