//! Reading request traces, streamed so multi-million request traces need no
//! memory. Four formats, told apart by the file name (see [`TraceFormat`]),
//! each plain or compressed (`.gz`, `.xz`): our CSV `timestamp,key,size`,
//! and the three formats the traces in `traces/` were published in, read as
//! published so the repository carries the upstream files.

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

/// How a trace file encodes its requests. Traces without a clock number
/// their requests from 0; traces without sizes give every object size 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceFormat {
    /// Text: the header line `timestamp,key,size`, then one request per
    /// line. Any name not matched below.
    Csv,
    /// libCacheSim's `oracleGeneral` (`*.oracleGeneral*`): 24-byte
    /// little-endian records `u32 timestamp, u64 id, u32 size, i64 next
    /// access`, no header. The next-access field is not read.
    OracleGeneral,
    /// Caffeine's simulator's binary traces (`*.trace` whose first bytes are
    /// not text): big-endian `u32` keys, one per request.
    BigEndianKeys,
    /// The LIRS traces (`*.trace` whose first bytes are text): one decimal
    /// key per line; a line `*` is a checkpoint marker of the LIRS tool and
    /// is skipped.
    LirsText,
}

impl TraceFormat {
    /// The format `path` names, once its compression suffix is dropped;
    /// `*.trace` needs its first bytes ([`Self::sniff_trace`]), so it says
    /// [`Self::BigEndianKeys`] here.
    fn from_name(path: &Path) -> Self {
        let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
        let name = name.strip_suffix(".gz").or_else(|| name.strip_suffix(".xz")).unwrap_or(&name);
        if name.contains(".oracleGeneral") {
            Self::OracleGeneral
        } else if name.ends_with(".trace") {
            Self::BigEndianKeys
        } else {
            Self::Csv
        }
    }

    /// Both of Caffeine's `.trace` formats share the suffix: text (digits,
    /// `*` and line ends only) is LIRS, anything else is binary keys.
    fn sniff_trace(first: &[u8]) -> Self {
        let text = !first.is_empty() && first.iter().all(|b| b.is_ascii_digit() || b" *\r\n".contains(b));
        if text { Self::LirsText } else { Self::BigEndianKeys }
    }
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
    /// A binary trace ends inside a record: cut short or not that format.
    #[error(
        "{path}: ends {bytes} bytes into request {index}, whose record is {record} bytes; truncated, or not a {format:?} trace"
    )]
    Truncated {
        /// The trace file.
        path: PathBuf,
        /// The format it was read as.
        format: TraceFormat,
        /// 0-based index of the partial record.
        index: u64,
        /// Bytes of it present.
        bytes: usize,
        /// Bytes a record takes.
        record: usize,
    },
}

/// Streams the requests of a trace file.
pub struct TraceReader {
    path: PathBuf,
    format: TraceFormat,
    reader: Box<dyn BufRead>,
    /// Lines read, for text formats' error messages.
    line: u64,
    /// Requests returned: the timestamp of traces without a clock.
    index: u64,
    buf: String,
}

impl TraceReader {
    /// Opens `path`, decompressing by extension (`.gz`, `.xz`), reading the
    /// format its name (and for `*.trace`, its first bytes) gives, and, for
    /// CSV, checking the header.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let io = |source| TraceError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let raw: Box<dyn Read> = match path.extension().and_then(|e| e.to_str()) {
            Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(file)),
            Some("xz") => Box::new(xz2::read::XzDecoder::new(file)),
            _ => Box::new(file),
        };
        let mut reader = BufReader::with_capacity(1 << 16, raw);
        let format = match TraceFormat::from_name(path) {
            TraceFormat::BigEndianKeys => TraceFormat::sniff_trace(reader.fill_buf().map_err(io)?),
            format => format,
        };
        Self::from_reader(path, format, Box::new(reader))
    }

    /// Reads a trace of `format` from any buffered reader; `path` names it
    /// in errors.
    pub fn from_reader(path: &Path, format: TraceFormat, reader: Box<dyn BufRead>) -> Result<Self, TraceError> {
        let mut trace = Self { path: path.to_path_buf(), format, reader, line: 0, index: 0, buf: String::new() };
        if format != TraceFormat::Csv {
            return Ok(trace);
        }
        if trace.next_line()? && trace.buf.trim_end() == "timestamp,key,size" {
            return Ok(trace);
        }
        Err(TraceError::Header { path: trace.path, found: trace.buf })
    }

    /// The format being read.
    pub fn format(&self) -> TraceFormat {
        self.format
    }

    /// Reads the next line into `buf`, without its line end; false at the
    /// end of the file.
    fn next_line(&mut self) -> Result<bool, TraceError> {
        self.buf.clear();
        let n = self
            .reader
            .read_line(&mut self.buf)
            .map_err(|source| TraceError::Io { path: self.path.clone(), source })?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        let len = self.buf.trim_end_matches(['\n', '\r']).len();
        self.buf.truncate(len);
        Ok(true)
    }

    fn bad_line(&self, problem: &'static str) -> TraceError {
        TraceError::Line { path: self.path.clone(), line: self.line, problem, text: self.buf.clone() }
    }

    fn parse_csv(&self) -> Result<Request, TraceError> {
        let mut fields = self.buf.split(',');
        let mut field = |what| fields.next().ok_or_else(|| self.bad_line(what));
        let timestamp =
            field("missing timestamp")?.parse().map_err(|_| self.bad_line("timestamp is not an unsigned integer"))?;
        let key = field("missing key")?.parse().map_err(|_| self.bad_line("key is not an unsigned 64-bit integer"))?;
        let size = field("missing size")?.parse().map_err(|_| self.bad_line("size is not an unsigned integer"))?;
        if fields.next().is_some() {
            return Err(self.bad_line("more than three fields"));
        }
        Ok(Request { timestamp, key, size })
    }

    /// Fills `record`; false at a clean end of the file.
    fn read_record(&mut self, record: &mut [u8]) -> Result<bool, TraceError> {
        let mut filled = 0;
        while filled < record.len() {
            match self.reader.read(&mut record[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => {
                    return Err(TraceError::Truncated {
                        path: self.path.clone(),
                        format: self.format,
                        index: self.index,
                        bytes: filled,
                        record: record.len(),
                    });
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(TraceError::Io { path: self.path.clone(), source }),
            }
        }
        Ok(true)
    }

    fn next_request(&mut self) -> Result<Option<Request>, TraceError> {
        let index = self.index;
        let request = match self.format {
            TraceFormat::Csv => {
                if !self.next_line()? {
                    return Ok(None);
                }
                self.parse_csv()?
            }
            TraceFormat::LirsText => loop {
                if !self.next_line()? {
                    return Ok(None);
                }
                let text = self.buf.trim();
                if text == "*" {
                    continue;
                }
                let key = text.parse().map_err(|_| self.bad_line("key is not an unsigned 64-bit integer"))?;
                break Request { timestamp: index, key, size: 1 };
            },
            TraceFormat::BigEndianKeys => {
                let mut record = [0; 4];
                if !self.read_record(&mut record)? {
                    return Ok(None);
                }
                Request { timestamp: index, key: u32::from_be_bytes(record).into(), size: 1 }
            }
            TraceFormat::OracleGeneral => {
                let mut record = [0; 24];
                if !self.read_record(&mut record)? {
                    return Ok(None);
                }
                let le = |at: std::ops::Range<usize>| record[at].iter().rev().fold(0, |n, &b| n << 8 | u64::from(b));
                Request { timestamp: le(0..4), key: le(4..12), size: le(12..16) }
            }
        };
        self.index += 1;
        Ok(Some(request))
    }
}

impl Iterator for TraceReader {
    type Item = Result<Request, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_request().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_as(format: TraceFormat, bytes: &'static [u8]) -> Result<Vec<Request>, TraceError> {
        TraceReader::from_reader(Path::new("t"), format, Box::new(bytes))?.collect()
    }

    fn read(text: &'static str) -> Result<Vec<Request>, TraceError> {
        TraceReader::from_reader(Path::new("t.csv"), TraceFormat::Csv, Box::new(text.as_bytes()))?.collect()
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

    #[test]
    fn formats_follow_the_name_and_for_dot_trace_the_first_bytes() {
        let name = |n: &str| TraceFormat::from_name(Path::new(n));
        assert_eq!(name("traces/web12.csv.gz"), TraceFormat::Csv);
        assert_eq!(name("zipf"), TraceFormat::Csv);
        assert_eq!(name("cloudPhysicsIO.oracleGeneral.bin.xz"), TraceFormat::OracleGeneral);
        assert_eq!(name("cloudPhysicsIO.oracleGeneral.bin"), TraceFormat::OracleGeneral);
        assert_eq!(name("w106.trace.xz"), TraceFormat::BigEndianKeys);
        assert_eq!(TraceFormat::sniff_trace(b"1\n2\n*\n30\r\n"), TraceFormat::LirsText);
        assert_eq!(TraceFormat::sniff_trace(&[0, 0, 0, 7, 0x31]), TraceFormat::BigEndianKeys);
        assert_eq!(TraceFormat::sniff_trace(b""), TraceFormat::BigEndianKeys);
    }

    #[test]
    fn big_endian_keys_are_numbered_from_zero() {
        let got = read_as(TraceFormat::BigEndianKeys, &[0, 0, 0, 42, 0xff, 0xff, 0xff, 0xff]).expect("valid");
        assert_eq!(
            got,
            vec![Request { timestamp: 0, key: 42, size: 1 }, Request { timestamp: 1, key: u32::MAX.into(), size: 1 }]
        );
        let err = read_as(TraceFormat::BigEndianKeys, &[0, 0, 0, 42, 1, 2]).expect_err("partial");
        assert!(err.to_string().contains("ends 2 bytes into request 1, whose record is 4 bytes"), "{err}");
    }

    #[test]
    fn lirs_text_skips_checkpoint_markers() {
        let got = read_as(TraceFormat::LirsText, b"5\n*\n6\r\n5\n").expect("valid");
        let keys: Vec<(u64, u64)> = got.iter().map(|r| (r.timestamp, r.key)).collect();
        assert_eq!(keys, [(0, 5), (1, 6), (2, 5)]);
        let err = read_as(TraceFormat::LirsText, b"5\nx\n").expect_err("bad");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn oracle_general_records_are_little_endian() {
        let mut record = Vec::new();
        record.extend_from_slice(&7200u32.to_le_bytes());
        record.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        record.extend_from_slice(&4096u32.to_le_bytes());
        record.extend_from_slice(&(-1i64).to_le_bytes());
        let bytes: &'static [u8] = record.leak();
        let got = read_as(TraceFormat::OracleGeneral, bytes).expect("valid");
        assert_eq!(got, vec![Request { timestamp: 7200, key: 0x0102_0304_0506_0708, size: 4096 }]);
        let err = read_as(TraceFormat::OracleGeneral, &bytes[..23]).expect_err("partial");
        assert!(err.to_string().contains("ends 23 bytes into request 0"), "{err}");
    }
}
