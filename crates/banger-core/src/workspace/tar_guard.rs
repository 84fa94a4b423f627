//! A reader in front of `tar::Archive` for tars from the guest: it walks the 512-byte blocks
//! of the stream itself and fails the read (so the archive fails) before the tar crate would
//! buffer an oversized extension entry. The tar crate reads GNU long names/links (`L`, `K`)
//! and PAX headers (`x`) wholly into memory, with no limit; here each of those (and PAX
//! global headers, `g`) may hold at most [`MAX_EXTENSION`] bytes. GNU sparse entries (which
//! carry extra header blocks; the extractor never writes them) and extension headers
//! without a ustar/GNU magic (which the tar crate reads as plain entries) are refused too,
//! so the guard always knows where the next header starts: it finds data lengths exactly as
//! the tar crate does, including a PAX `size=` record overriding the next header's size.

use std::io::Read;

/// Bytes an extension entry (long name, long link, PAX header) may hold.
pub const MAX_EXTENSION: u64 = 64 << 10;

const BLOCK: usize = 512;

/// Wraps a guest tar stream; see the module doc.
#[derive(Debug)]
pub struct TarGuard<R> {
    inner: R,
    /// Bytes read from `inner` and not yet handed out.
    buf: Vec<u8>,
    at: usize,
    /// Data bytes (padded to a block) of the current entry still to pass through.
    data_left: u64,
    /// The data size a PAX `size=` record set for the next entry.
    pax_size: Option<u64>,
    failed: bool,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            at: 0,
            data_left: 0,
            pax_size: None,
            failed: false,
        }
    }

    /// Reads up to `len` bytes into `buf` (fewer only at the end of the stream).
    fn fill(&mut self, len: usize) -> std::io::Result<()> {
        self.buf.clear();
        self.at = 0;
        (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut self.buf)?;
        Ok(())
    }

    /// Reads and judges the next header block (and, for a PAX header, its data).
    fn next_header(&mut self) -> std::io::Result<()> {
        self.fill(BLOCK)?;
        if self.buf.len() < BLOCK || self.buf.iter().all(|b| *b == 0) {
            // The end (or a cut tar, which the tar crate reports).
            return Ok(());
        }
        let header = &self.buf[..BLOCK];
        let kind = header[156];
        let recognized = (&header[257..263] == b"ustar\0" && &header[263..265] == b"00")
            || (&header[257..263] == b"ustar " && &header[263..265] == b" \0");
        let size = size_field(&header[124..136])?;
        match kind {
            b'L' | b'K' | b'x' | b'g' => {
                if !recognized {
                    return Err(refused("an extension header without a ustar or GNU magic"));
                }
                if size > MAX_EXTENSION {
                    return Err(refused(&format!(
                        "an extension header ({}) larger than {MAX_EXTENSION} bytes",
                        kind as char
                    )));
                }
                if kind == b'x' {
                    // Read the records now to learn the next entry's size.
                    let padded = padded(size)?;
                    let mut data = Vec::new();
                    (&mut self.inner).take(padded).read_to_end(&mut data)?;
                    self.pax_size = pax_size(&data[..data.len().min(size as usize)]);
                    self.buf.extend_from_slice(&data);
                } else {
                    if kind == b'g' {
                        // The tar crate hands a global header out as an entry, with the
                        // pending PAX records: they do not reach the next entry.
                        self.pax_size = None;
                    }
                    self.data_left = padded(size)?;
                }
            }
            b'S' => return Err(refused("a GNU sparse entry")),
            _ => {
                let size = self.pax_size.take().unwrap_or(size);
                self.data_left = padded(size)?;
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(refused("the tar was refused"));
        }
        if self.at == self.buf.len() {
            if self.data_left > 0 {
                let len = self.data_left.min(64 << 10) as usize;
                self.fill(len)?;
                self.data_left -= self.buf.len() as u64;
                if self.buf.is_empty() {
                    self.data_left = 0;
                }
            } else if let Err(e) = self.next_header() {
                self.failed = true;
                return Err(e);
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn refused(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned())
}

/// `size` rounded up to whole blocks.
fn padded(size: u64) -> std::io::Result<u64> {
    size.checked_add(BLOCK as u64 - 1)
        .map(|s| s & !(BLOCK as u64 - 1))
        .ok_or_else(|| refused("a tar size overflow"))
}

/// A numeric header field as the tar crate reads it: base-256 when the high bit is set,
/// else octal text up to the first NUL, trimmed.
fn size_field(field: &[u8]) -> std::io::Result<u64> {
    if field[0] & 0x80 != 0 {
        let skip = field.len() - 8;
        let mut n = 0u64;
        for b in &field[skip..] {
            n = (n << 8) | u64::from(*b);
        }
        return Ok(n);
    }
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end])
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 8).ok())
        .ok_or_else(|| refused("a tar header with a bad size field"))
}

/// The `size` record of PAX data, exactly as the tar crate takes it: the first `size` key;
/// none when a record before it (or its value) does not parse.
fn pax_size(data: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse::<u64>().ok();
    }
    None
}
