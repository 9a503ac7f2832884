//! What the `tar` crate does not do for an import that must export byte for byte.
//!
//! The crate reads headers (checksums, sizes, GNU long names, PAX sizes, sparse
//! maps), positions the stream and hands out member data; but it drops every byte
//! that is not member data (extension members once applied, padding, everything after
//! the end-of-archive block), and its errors carry no offset. So:
//!
//! - [`Tap`] sits under `tar::Archive` and keeps the bytes read while
//!   [`TapState::recording`] is set (everything but regular members' data), counts the
//!   offset, and remembers whether the stream ended or failed, for messages.
//! - [`pax_records`] parses PAX records by their length prefix: the crate's
//!   `PaxExtensions` splits on newlines, so a value holding one (legal in PAX) would
//!   read as malformed, and a `size` record after it would be missed.
//! - [`extensions`] walks the kept extension members (all already validated by the
//!   crate) to find the name and size the member they precede really has.

use std::cell::RefCell;
use std::io::{self, Read};
use std::rc::Rc;

pub const BLOCK: usize = 512;
/// Extension members (PAX, GNU long names) before one member are held in memory:
/// bound them.
pub const MAX_EXTENSION_BYTES: usize = 1 << 20;

/// What the scanner and the [`Tap`] inside `tar::Archive` share.
#[derive(Debug, Default)]
pub struct TapState {
    /// Bytes read from the tar stream so far.
    pub offset: u64,
    /// Keep what is read (headers, padding), or let it through (member data).
    pub recording: bool,
    /// Bytes kept since the scanner last took them.
    pub recorded: Vec<u8>,
    /// A read found the end of the stream.
    pub eof: bool,
    /// The decompressor or the file failed, at this offset.
    pub failed: Option<(u64, io::Error)>,
    /// More than [`MAX_EXTENSION_BYTES`] of headers came between two members.
    pub overflow: bool,
}

/// The tar stream under `tar::Archive`.
pub struct Tap {
    inner: Box<dyn Read + Send>,
    state: Rc<RefCell<TapState>>,
}

impl Tap {
    pub fn new(inner: Box<dyn Read + Send>, state: Rc<RefCell<TapState>>) -> Self {
        Tap { inner, state }
    }
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let got = loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        let mut st = self.state.borrow_mut();
        match got {
            Ok(0) => {
                st.eof = true;
                Ok(0)
            }
            Ok(n) => {
                if st.recording {
                    // Padding (< 512) plus the member's own header fit beside the limit.
                    if st.recorded.len() + n > MAX_EXTENSION_BYTES + 2 * BLOCK {
                        st.overflow = true;
                        return Err(io::Error::other("extension headers over the limit"));
                    }
                    st.recorded.extend_from_slice(&buf[..n]);
                }
                st.offset += n as u64;
                Ok(n)
            }
            Err(e) => {
                // The crate gets a copy; the original (with its source) makes the message.
                let copy = io::Error::new(e.kind(), e.to_string());
                st.failed = Some((st.offset, e));
                Err(copy)
            }
        }
    }
}

pub fn padding_of(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// The POSIX checksum, unsigned or (as some old tars wrote it) signed.
pub fn checksum_ok(block: &[u8]) -> bool {
    if block.len() != BLOCK {
        return false;
    }
    let Ok(stored) = tar::Header::from_byte_slice(block).cksum() else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u32, 0i32);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u32::from(b);
        signed += i32::from(b as i8);
    }
    stored == unsigned || stored as i32 == signed
}

/// Parses PAX records (`LEN key=value\n`), honouring LEN (values may hold newlines).
pub fn pax_records(data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or("a record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("a record with a bad length")?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("a record whose length does not match".into());
        }
        let kv = &rest[sp + 1..len - 1];
        let eq = kv
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a record without '='")?;
        let key = String::from_utf8_lossy(&kv[..eq]).into_owned();
        out.push((key, kv[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

/// One extension member among the kept header bytes: its type flag and its data.
pub struct Extension<'a> {
    pub typeflag: u8,
    pub body: &'a [u8],
}

/// The extension members in `headers` (extension members, each header + data +
/// padding, then one member's own 512-byte header), and that header. `None` when
/// the bytes do not have that shape (the crate read them, so they should).
pub fn extensions(headers: &[u8]) -> Option<(Vec<Extension<'_>>, &[u8])> {
    let own = headers.len().checked_sub(BLOCK)?;
    let mut out = Vec::new();
    let mut at = 0;
    while at < own {
        let block = headers.get(at..at + BLOCK)?;
        let size = usize::try_from(tar::Header::from_byte_slice(block).entry_size().ok()?).ok()?;
        let body = headers.get(at + BLOCK..at + BLOCK + size)?;
        out.push(Extension {
            typeflag: block[156],
            body,
        });
        at += BLOCK + size + padding_of(size as u64);
    }
    (at == own).then(|| (out, &headers[own..]))
}

pub fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}
