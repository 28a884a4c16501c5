//! Reading request traces: CSV `timestamp,key,size` (the format of
//! `shared/traces/csv/`), plain, gzip or xz, streamed so multi-million
//! request traces need no memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// One request of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The trace's clock (or the request index when it has none).
    pub timestamp: u64,
    /// The object requested.
    pub key: u64,
    /// The object's size in bytes (1 where the trace has none).
    pub size: u64,
}

/// A trace that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file cannot be opened or read.
    #[error("cannot read trace {path}: {source}")]
    Io {
        /// The trace file.
        path: PathBuf,
        /// The OS or decompressor error.
        source: std::io::Error,
    },
    /// The first line is not the expected header.
    #[error("{path}: line 1: expected the header `timestamp,key,size`, found `{found}`")]
    Header {
        /// The trace file.
        path: PathBuf,
        /// What the line held.
        found: String,
    },
    /// A request line does not parse.
    #[error("{path}: line {line}: {problem}: `{text}`")]
    Line {
        /// The trace file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        problem: &'static str,
        /// The line as read.
        text: String,
    },
}

/// Streams the requests of a trace file.
pub struct TraceReader {
    path: PathBuf,
    reader: Box<dyn BufRead>,
    line: u64,
    buf: String,
}

impl TraceReader {
    /// Opens `path`, decompressing by extension (`.gz`, `.xz`), and checks
    /// the header.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let io = |source| TraceError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let raw: Box<dyn Read> = match path.extension().and_then(|e| e.to_str()) {
            Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(file)),
            Some("xz") => Box::new(xz2::read::XzDecoder::new(file)),
            _ => Box::new(file),
        };
        Self::from_reader(path, Box::new(BufReader::with_capacity(1 << 16, raw)))
    }

    /// Reads a trace from any buffered reader; `path` names it in errors.
    pub fn from_reader(path: &Path, reader: Box<dyn BufRead>) -> Result<Self, TraceError> {
        let mut trace = Self { path: path.to_path_buf(), reader, line: 0, buf: String::new() };
        match trace.next_line()? {
            Some(header) if header.trim_end() == "timestamp,key,size" => Ok(trace),
            other => Err(TraceError::Header { path: trace.path, found: other.unwrap_or_default() }),
        }
    }

    fn next_line(&mut self) -> Result<Option<String>, TraceError> {
        self.buf.clear();
        let n = self
            .reader
            .read_line(&mut self.buf)
            .map_err(|source| TraceError::Io { path: self.path.clone(), source })?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        Ok(Some(self.buf.trim_end_matches(['\n', '\r']).to_string()))
    }

    fn parse(&self, text: &str) -> Result<Request, TraceError> {
        let bad =
            |problem| TraceError::Line { path: self.path.clone(), line: self.line, problem, text: text.to_string() };
        let mut fields = text.split(',');
        let mut field = |what| fields.next().ok_or_else(|| bad(what));
        let timestamp = field("missing timestamp")?.parse().map_err(|_| bad("timestamp is not an unsigned integer"))?;
        let key = field("missing key")?.parse().map_err(|_| bad("key is not an unsigned 64-bit integer"))?;
        let size = field("missing size")?.parse().map_err(|_| bad("size is not an unsigned integer"))?;
        if fields.next().is_some() {
            return Err(bad("more than three fields"));
        }
        Ok(Request { timestamp, key, size })
    }
}

impl Iterator for TraceReader {
    type Item = Result<Request, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.buf.clear();
        match self.reader.read_line(&mut self.buf) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                let text = self.buf.trim_end_matches(['\n', '\r']);
                Some(self.parse(text))
            }
            Err(source) => Some(Err(TraceError::Io { path: self.path.clone(), source })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &'static str) -> Result<Vec<Request>, TraceError> {
        TraceReader::from_reader(Path::new("t.csv"), Box::new(text.as_bytes()))?.collect()
    }

    #[test]
    fn parses_requests() {
        let got = read("timestamp,key,size\n0,42,1\n1,7,4096\n").expect("valid");
        assert_eq!(got, vec![Request { timestamp: 0, key: 42, size: 1 }, Request { timestamp: 1, key: 7, size: 4096 }]);
    }

    #[test]
    fn bad_lines_name_their_number() {
        let err = read("timestamp,key,size\n0,42,1\n1,x,1\n").expect_err("bad key");
        assert_eq!(err.to_string(), "t.csv: line 3: key is not an unsigned 64-bit integer: `1,x,1`");
        let err = read("timestamp,key,size\n0,42\n").expect_err("short");
        assert!(err.to_string().contains("line 2: missing size"), "{err}");
        let err = read("ts,key\n").expect_err("header");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
