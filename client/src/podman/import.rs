//! Import: the archive is decompressed and read once, in order, by `tar::Archive`
//! on one blocking thread ([`scan`]); each regular member's data goes through a
//! bounded channel to the uploader, everything else (headers, extension members,
//! padding, the trailer) is kept, through [`super::tar::Tap`], in the skeleton.
//!
//! Every refusal names the archive and the member or the tar offset: a truncated
//! stream says where it ends, a damaged header says at which offset.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use snapreg_proto::manifest::{annotations, check_relative_path, Extent, File, Layer, LayerKind};
use snapreg_proto::reference::Reference;

use super::tar::{
    checksum_ok, extensions, padding_of, pax_records, trim_nul, Tap, TapState, BLOCK,
    MAX_EXTENSION_BYTES,
};
use super::{
    ArchiveIndex, Member, CHECKPOINT_DIR, INDEX_FILE, INDEX_FORMAT, INDEX_LAYER, INDEX_VERSION,
};
use crate::chunker::ChunkerConfig;
use crate::error::{shown, ClientError, Result};
use crate::progress::Progress;
use crate::push::{self, PushReport, Uploader};
use crate::remote::Remote;

/// Member data moves in blocks of this size, at most `DATA_BLOCKS_AHEAD` queued.
const DATA_BLOCK: usize = 1 << 20;
const DATA_BLOCKS_AHEAD: usize = 4;
/// Bytes after the end-of-archive marker that are not zeros are kept inline: bound them.
const MAX_TRAILER_BYTES: u64 = 1 << 20;

/// Imports a Podman checkpoint archive (plain, gzip or zstd tar) as one snapshot:
/// a `process` layer from `checkpoint/`, `rootfs` and `extra` layers for the other
/// members, and the archive's skeleton for a byte-identical [`super::pull_archive`].
pub async fn push_archive(
    remote: &Remote,
    archive: &Path,
    reference: &Reference,
    progress: Progress,
) -> Result<PushReport> {
    let started = Instant::now();
    let tag = push::required_tag(reference, "push")?;
    let (input, compression) = open_archive(archive)?;

    let uploader = Uploader::begin(
        remote,
        &reference.repository,
        ChunkerConfig::default(),
        progress.clone(),
    )
    .await?;

    let (ev_tx, ev_rx) = tokio::sync::mpsc::channel::<FileStart>(1);
    let archive_shown = shown(archive);
    let scanner = tokio::task::spawn_blocking(move || {
        scan(input, &archive_shown, compression, &mut |f| {
            ev_tx.blocking_send(f).is_ok()
        })
    });
    let mut layers = Layers::default();
    let imported = upload_members(&uploader, &progress, ev_rx, archive, &mut layers).await;
    let scanned = scanner
        .await
        .map_err(|e| ClientError::io("archive reader thread", io::Error::other(e)));
    let index = match (imported, scanned) {
        (Ok(()), Ok(Ok(index))) => index,
        (imported, scanned) => {
            let upload_err = uploader.abort().await;
            return Err(first_cause(imported, scanned, upload_err));
        }
    };
    layers.index = Some(upload_index(&uploader, &progress, &index).await?);
    let files = layers.count();
    let logical = layers.bytes();
    let mut manifest = uploader.new_manifest(layers.into_layers(), true);
    manifest.annotations.insert(
        annotations::PODMAN_ARCHIVE.into(),
        format!("{INDEX_LAYER}/{INDEX_FILE}"),
    );
    let digest = uploader
        .commit(&reference.repository, &manifest, vec![tag])
        .await?;
    progress.finish();
    progress.counters.bytes_total.store(logical, Relaxed);
    Ok(PushReport {
        reference: reference.to_string(),
        digest: digest.to_string(),
        files,
        counters: progress.counters.snapshot(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Chunks and uploads each regular member the scanner announces, into `layers`.
async fn upload_members(
    uploader: &Uploader,
    progress: &Progress,
    mut ev_rx: tokio::sync::mpsc::Receiver<FileStart>,
    archive: &Path,
    layers: &mut Layers,
) -> Result<()> {
    while let Some(f) = ev_rx.recv().await {
        progress.message(f.member.clone());
        progress.add_total(f.size);
        let aligned = uploader.config().is_page_aligned(&f.path);
        let extents = uploader.chunk_stream(f.data, aligned).await?;
        let size: u64 = extents.iter().map(Extent::len).sum();
        if size != f.size {
            return Err(ClientError::io(
                format!(
                    "reading member {:?} of {}: got {size} of {} bytes",
                    f.member,
                    shown(archive),
                    f.size
                ),
                io::Error::from(io::ErrorKind::UnexpectedEof),
            ));
        }
        layers.add(f.place, f.path, f.mode, size, extents);
    }
    // Returning drops the receiver: the scanner ends once nobody takes its events.
    Ok(())
}

/// The error to report when the upload or the scan failed: the scanner's own, else
/// the upload's.
fn first_cause(
    imported: Result<()>,
    scanned: Result<std::result::Result<ArchiveIndex, ScanError>>,
    upload_err: Option<ClientError>,
) -> ClientError {
    match scanned {
        Err(e) | Ok(Err(ScanError::Failed(e))) => e,
        Ok(Err(ScanError::Cancelled)) | Ok(Ok(_)) => match (imported, upload_err) {
            (_, Some(e)) => e,
            (Err(e), None) => e,
            (Ok(()), None) => {
                ClientError::Registry("the archive reader stopped early; push again".into())
            }
        },
    }
}

/// Uploads the skeleton as [`INDEX_FILE`].
async fn upload_index(
    uploader: &Uploader,
    progress: &Progress,
    index: &ArchiveIndex,
) -> Result<File> {
    let index_bytes = serde_json::to_vec_pretty(index).expect("index serializes");
    let len = index_bytes.len() as u64;
    progress.add_total(len);
    let extents = match uploader
        .chunk_stream(io::Cursor::new(index_bytes), false)
        .await
    {
        Ok(x) => x,
        Err(e) => return Err(uploader.abort().await.unwrap_or(e)),
    };
    Ok(File {
        path: INDEX_FILE.into(),
        size: len,
        mode: 0o644,
        extents,
    })
}

/// Opens `path` and picks the decompressor from its first bytes.
pub(super) fn open_archive(path: &Path) -> Result<(Box<dyn Read + Send>, &'static str)> {
    let file = std::fs::File::open(path)
        .map_err(|e| ClientError::io(format!("opening archive {}", shown(path)), e))?;
    decompress(BufReader::with_capacity(1 << 20, file), &shown(path))
}

/// Scans an archive (plain, gzip or zstd tar, by magic bytes) as [`push_archive`]
/// does, with every check an import makes (names stay inside the archive, a
/// `checkpoint/inventory.img`, sizes, checksums), reading and dropping member data:
/// its skeleton, nothing uploaded. For callers that only look, such as the fuzz
/// targets under fuzz/.
pub fn read_archive(input: impl Read + Send + 'static, name: &str) -> Result<ArchiveIndex> {
    let (input, compression) = decompress(BufReader::new(input), name)?;
    // Member data arrives through bounded channels: drain it beside the scan.
    let (tx, rx) = sync_channel::<BlockReader>(1);
    let drain = std::thread::spawn(move || {
        for mut data in rx {
            let _ = io::copy(&mut data, &mut io::sink());
        }
    });
    let scanned = scan(input, name, compression, &mut |f| tx.send(f.data).is_ok());
    drop(tx);
    let _ = drain.join();
    match scanned {
        Ok(index) => Ok(index),
        Err(ScanError::Failed(e)) => Err(e),
        Err(ScanError::Cancelled) => Err(ClientError::io(
            format!("reading archive {name}"),
            io::Error::other("the member reader stopped"),
        )),
    }
}

/// Picks the decompressor from the first bytes of `buf`.
fn decompress<R: BufRead + Send + 'static>(
    mut buf: R,
    shown: &str,
) -> Result<(Box<dyn Read + Send>, &'static str)> {
    let head: Vec<u8> = buf
        .fill_buf()
        .map_err(|e| ClientError::io(format!("reading archive {shown}"), e))?
        .iter()
        .take(8)
        .copied()
        .collect();
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(&[0x1f, 0x8b]) {
        Ok((Box::new(flate2::read::MultiGzDecoder::new(buf)), "gzip"))
    } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = zstd::stream::read::Decoder::with_buffer(buf)
            .map_err(|e| ClientError::io(format!("reading archive {shown}"), e))?;
        Ok((Box::new(d), "zstd"))
    } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0]) || starts(b"BZh") {
        Err(ClientError::Usage(format!(
            "{shown} is xz- or bzip2-compressed: snapreg reads plain, gzip or zstd tar; \
             decompress it first (xz -d / bunzip2) or export with podman's default (zstd)"
        )))
    } else {
        Ok((Box::new(buf), "none"))
    }
}

/// Where a regular member's data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Place {
    Process,
    Rootfs,
    Extra,
}

/// A regular member whose data follows through `data`.
pub(super) struct FileStart {
    pub(super) member: String,
    pub(super) place: Place,
    /// Path in its layer.
    pub(super) path: String,
    pub(super) mode: u32,
    pub(super) size: u64,
    pub(super) data: BlockReader,
}

#[derive(Debug)]
pub(super) enum ScanError {
    /// The consumer went away; its own error explains why.
    Cancelled,
    Failed(ClientError),
}

impl From<ClientError> for ScanError {
    fn from(e: ClientError) -> Self {
        ScanError::Failed(e)
    }
}

/// The data of one member, as the scanner thread hands it over.
pub(super) struct BlockReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for BlockReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(block)) => {
                    self.cur = block;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A member name as a relative path: leading `./` and trailing `/` dropped.
pub(super) fn normalize(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest.trim_start_matches('/');
    }
    if n == "." {
        n = "";
    }
    n.trim_end_matches('/')
}

/// Reads the whole archive, calling `on_file` for each regular member (whose data it
/// then streams through the member's [`BlockReader`]); returns the skeleton.
/// `on_file` returns false when the consumer has gone away.
pub(super) fn scan(
    input: Box<dyn Read + Send>,
    archive: &str,
    compression: &'static str,
    on_file: &mut dyn FnMut(FileStart) -> bool,
) -> std::result::Result<ArchiveIndex, ScanError> {
    let state = Rc::new(RefCell::new(TapState {
        recording: true,
        ..TapState::default()
    }));
    let mut tar = ::tar::Archive::new(Tap::new(input, state.clone()));
    let mut sc = Scanner {
        archive,
        compression,
        state,
        members: Vec::new(),
        seen: HashSet::new(),
        pending: Vec::new(),
        owed_padding: 0,
        last_file: None,
    };
    // `entries` fails only on an archive already read from; ours is fresh.
    let entries = tar.entries().map_err(|e| sc.header_error(e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| sc.header_error(e))?;
        sc.settle_padding();
        if let Some(file) = sc.member(&entry)? {
            sc.stream_file(file, &mut entry, on_file)?;
        }
    }
    sc.settle_padding();
    sc.finish(tar.into_inner())
}

/// What a scan has seen so far.
struct Scanner<'a> {
    archive: &'a str,
    compression: &'static str,
    state: Rc<RefCell<TapState>>,
    members: Vec<Member>,
    /// Regular members' normalized names.
    seen: HashSet<String>,
    /// Header bytes kept for the next member (extension members before it).
    pending: Vec<u8>,
    /// Padding after the last regular member, still at the front of the Tap's bytes.
    owed_padding: usize,
    /// Index in `members` of the last regular member.
    last_file: Option<usize>,
}

/// A regular member about to be streamed.
struct NewFile {
    name: String,
    rel: String,
    size: u64,
    mode: u32,
}

impl Scanner<'_> {
    /// Moves the Tap's bytes into `pending`, the padding owed to the last regular
    /// member first (kept in the skeleton when it is not zeros).
    fn settle_padding(&mut self) {
        let recorded = std::mem::take(&mut self.state.borrow_mut().recorded);
        let owed = self.owed_padding.min(recorded.len());
        let (pad, rest) = recorded.split_at(owed);
        if pad.iter().any(|&b| b != 0) {
            let last = self.last_file.expect("padding follows a regular member");
            self.members[last].padding_hex = Some(hex::encode(pad));
        }
        self.owed_padding = 0;
        self.pending.extend_from_slice(rest);
    }

    /// Records the member `entry` (its raw headers are the end of `pending`); for a
    /// regular member, what to stream.
    fn member(
        &mut self,
        entry: &::tar::Entry<'_, Tap>,
    ) -> std::result::Result<Option<NewFile>, ScanError> {
        let own = &self.pending[self.pending.len().saturating_sub(BLOCK)..];
        let typeflag = own.get(156).copied().unwrap_or(0);
        // A global PAX header (or an extension member the crate does not apply): kept
        // for the next member's headers; its data joins them when the crate skips it.
        if matches!(typeflag, b'x' | b'g' | b'L' | b'K') {
            return Ok(None);
        }
        let (name_bytes, size) = self.name_and_size(entry)?;
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        let kind = self.kind(typeflag, &name)?;
        let rel = normalize(&name).to_string();
        if !(rel.is_empty() && kind == "dir") {
            if let Err(reason) = check_relative_path(&rel) {
                return Err(ScanError::Failed(ClientError::Usage(format!(
                    "archive {}: member {name:?} would land outside the directory it is \
                     extracted into ({reason}); refusing the archive: re-export the checkpoint \
                     with `podman container checkpoint --export`",
                    self.archive
                ))));
            }
        }
        let header_bytes = std::mem::take(&mut self.pending);
        if kind != "file" {
            if size != 0 {
                return Err(self
                    .invalid(format!(
                        "member {name:?} ({kind}) has a size of {size}: a header-only member \
                         with data is ambiguous"
                    ))
                    .into());
            }
            self.push_member(name, kind, &header_bytes, None, 0);
            return Ok(None);
        }
        if std::str::from_utf8(&name_bytes).is_err() {
            return Err(self
                .invalid(format!(
                    "member {name:?}: its name is not UTF-8, which snapreg cannot store"
                ))
                .into());
        }
        self.check_file_name(&name, &rel)?;
        let mode = ::tar::Header::from_byte_slice(&header_bytes[header_bytes.len() - BLOCK..])
            .mode()
            .map(|m| m & 0o7777)
            .unwrap_or(0o644);
        self.push_member(name.clone(), kind, &header_bytes, Some(rel.clone()), size);
        Ok(Some(NewFile {
            name,
            rel,
            size,
            mode,
        }))
    }

    fn push_member(
        &mut self,
        name: String,
        kind: &str,
        headers: &[u8],
        file: Option<String>,
        size: u64,
    ) {
        if file.is_some() {
            self.last_file = Some(self.members.len());
        }
        self.members.push(Member {
            name,
            kind: kind.into(),
            header_hex: hex::encode(headers),
            file,
            size,
            padding_hex: None,
        });
    }

    /// The member's name and size as readers see them: a PAX `path` first, then a GNU
    /// long name, then the header's; a PAX `size`, then the header's. The crate
    /// applied the same to position the stream: a disagreement refuses the archive.
    fn name_and_size(
        &self,
        entry: &::tar::Entry<'_, Tap>,
    ) -> std::result::Result<(Vec<u8>, u64), ScanError> {
        let at = self.state.borrow().offset - BLOCK as u64;
        let (exts, own) = extensions(&self.pending).ok_or_else(|| {
            self.invalid(format!("the headers before tar offset {at} do not parse"))
        })?;
        let (mut pax_path, mut pax_size, mut gnu_long) = (None, None, None);
        for ext in exts {
            match ext.typeflag {
                b'x' => {
                    let records = pax_records(ext.body)
                        .map_err(|e| self.invalid(format!("a PAX header holds {e}")))?;
                    for (k, v) in records {
                        self.pax_record(&k, v, &mut pax_path, &mut pax_size)?;
                    }
                }
                b'L' => gnu_long = Some(trim_nul(ext.body).to_vec()),
                _ => {}
            }
        }
        let header = ::tar::Header::from_byte_slice(own);
        let size = match pax_size {
            Some(s) => s,
            None => header
                .entry_size()
                .map_err(|e| self.invalid(format!("bad size field at tar offset {at}: {e}")))?,
        };
        let name = pax_path
            .or(gnu_long)
            .unwrap_or_else(|| header.path_bytes().into_owned());
        if size != entry.size() {
            return Err(self
                .invalid(format!(
                    "member {:?}: its headers give {size} bytes, the tar reader {}",
                    String::from_utf8_lossy(&name),
                    entry.size()
                ))
                .into());
        }
        Ok((name, size))
    }

    fn pax_record(
        &self,
        key: &str,
        value: Vec<u8>,
        path: &mut Option<Vec<u8>>,
        size: &mut Option<u64>,
    ) -> Result<()> {
        match key {
            "path" => *path = Some(value),
            "size" => {
                let n = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| self.invalid("a PAX size that is not a number".into()))?;
                *size = Some(n);
            }
            k if k.starts_with("GNU.sparse.") => {
                return Err(self.invalid(
                    "a sparse member (GNU.sparse PAX records), which snapreg does not import; \
                     create the archive without --sparse"
                        .into(),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// The member kind of a tar type flag; refuses the kinds snapreg does not import.
    fn kind(&self, typeflag: u8, name: &str) -> Result<&'static str> {
        Ok(match typeflag {
            b'0' | b'7' => "file",
            0 if name.ends_with('/') => "dir",
            0 => "file",
            b'1' => "hardlink",
            b'2' => "symlink",
            b'3' => "char",
            b'4' => "block",
            b'5' => "dir",
            b'6' => "fifo",
            b'S' => {
                return Err(self.invalid(format!(
                    "member {name:?} is a GNU sparse file, which snapreg does not import; \
                     create the archive without --sparse"
                )))
            }
            t => {
                return Err(self.invalid(format!(
                    "member {name:?} has tar type {:?}, which snapreg does not import",
                    t as char
                )))
            }
        })
    }

    /// Refuses a regular member that collides with snapreg's own files or repeats.
    fn check_file_name(&mut self, name: &str, rel: &str) -> Result<()> {
        if rel == INDEX_LAYER
            || rel.starts_with(&format!("{INDEX_LAYER}/"))
            || rel == CHECKPOINT_DIR
        {
            return Err(self.invalid(format!(
                "member {name:?} collides with where snapreg keeps the archive's own \
                 files ({INDEX_LAYER}/, {CHECKPOINT_DIR}/)"
            )));
        }
        if !self.seen.insert(rel.to_string()) {
            return Err(self.invalid(format!(
                "member {name:?} appears twice; snapreg keeps one copy of each file: \
                 re-export the checkpoint"
            )));
        }
        Ok(())
    }

    /// Hands the member to `on_file` and streams its data to it (not kept).
    fn stream_file(
        &mut self,
        f: NewFile,
        entry: &mut impl Read,
        on_file: &mut dyn FnMut(FileStart) -> bool,
    ) -> std::result::Result<(), ScanError> {
        let (place, path) = match f.rel.strip_prefix("checkpoint/") {
            Some(p) => (Place::Process, p.to_string()),
            None if f.rel == "rootfs-diff.tar" => (Place::Rootfs, f.rel.clone()),
            None => (Place::Extra, f.rel.clone()),
        };
        let (tx, rx) = sync_channel(DATA_BLOCKS_AHEAD);
        let start = FileStart {
            member: f.name.clone(),
            place,
            path,
            mode: f.mode,
            size: f.size,
            data: BlockReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
        };
        if !on_file(start) {
            return Err(ScanError::Cancelled);
        }
        self.state.borrow_mut().recording = false;
        let streamed = self.stream_data(entry, &tx, f.size, &f.name);
        self.state.borrow_mut().recording = true;
        self.owed_padding = padding_of(f.size);
        streamed
    }

    /// Moves `size` bytes of member data from the archive into `tx`.
    fn stream_data(
        &self,
        entry: &mut impl Read,
        tx: &SyncSender<io::Result<Vec<u8>>>,
        size: u64,
        name: &str,
    ) -> std::result::Result<(), ScanError> {
        let mut left = size;
        while left > 0 {
            let n = left.min(DATA_BLOCK as u64) as usize;
            let mut block = vec![0u8; n];
            let got = match fill(entry, &mut block) {
                Ok(got) => got,
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other("the archive could not be read")));
                    return Err(self.header_error(e).into());
                }
            };
            if got < n {
                let _ = tx.send(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the archive is truncated",
                )));
                return Err(self
                    .truncated(&format!(
                        "member {name:?} ({} of {size} bytes)",
                        size - left + got as u64
                    ))
                    .into());
            }
            if tx.send(Ok(block)).is_err() {
                return Err(ScanError::Cancelled);
            }
            left -= n as u64;
        }
        Ok(())
    }

    /// After the end-of-archive block (already read into `pending`): the trailer,
    /// and the checks that need the whole archive.
    fn finish(mut self, mut tap: Tap) -> std::result::Result<ArchiveIndex, ScanError> {
        let ended = self.state.borrow().eof;
        if ended {
            // The stream ended where a header should start: no end-of-archive block.
            if self.state.borrow().offset == 0 {
                return Err(self.invalid("the file is empty".into()).into());
            }
            return Err(self
                .truncated("its member list (no end-of-archive marker)")
                .into());
        }
        let first_zero = self.pending.split_off(self.pending.len() - BLOCK);
        if !self.pending.is_empty() {
            let headers = std::mem::take(&mut self.pending);
            self.push_member(String::new(), "extension", &headers, None, 0);
        }
        self.state.borrow_mut().recording = false;
        let (trailer_len, trailer_hex) = self.trailer(&mut tap, first_zero)?;
        if !self.seen.contains("checkpoint/inventory.img") {
            return Err(self
                .invalid(format!(
                    "it has no checkpoint/inventory.img ({} members read), so it holds no CRIU \
                     checkpoint",
                    self.members.len()
                ))
                .into());
        }
        Ok(ArchiveIndex {
            format: INDEX_FORMAT.into(),
            version: INDEX_VERSION,
            compression: self.compression.into(),
            members: self.members,
            trailer_len,
            trailer_hex,
        })
    }

    /// The first zero block and everything after it: its length, and its bytes (hex)
    /// when they are not all zeros.
    fn trailer(&self, tap: &mut Tap, first_zero: Vec<u8>) -> Result<(u64, Option<String>)> {
        let mut trailer_len = first_zero.len() as u64;
        let mut kept = first_zero;
        let mut all_zero = true;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = fill(tap, &mut buf).map_err(|e| self.header_error(e))?;
            if n == 0 {
                break;
            }
            trailer_len += n as u64;
            all_zero &= buf[..n].iter().all(|&b| b == 0);
            if !all_zero && trailer_len > MAX_TRAILER_BYTES {
                return Err(self.invalid(format!(
                    "more than {MAX_TRAILER_BYTES} bytes of data after the end-of-archive marker"
                )));
            }
            if trailer_len <= MAX_TRAILER_BYTES {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        // A lone zero block followed by more data is not an end (Podman's reader
        // refuses it too).
        if !all_zero && (kept.len() < 2 * BLOCK || kept[BLOCK..2 * BLOCK].iter().any(|&b| b != 0)) {
            return Err(
                self.invalid("it has data after a lone zero block (concatenated archives?)".into())
            );
        }
        Ok((trailer_len, (!all_zero).then(|| hex::encode(&kept))))
    }

    /// What a failure of the tar reader means, from what the Tap saw: the file or the
    /// decompressor failed, the stream ended early, or a header is bad.
    fn header_error(&self, e: io::Error) -> ClientError {
        let mut st = self.state.borrow_mut();
        if let Some((at, source)) = st.failed.take() {
            return ClientError::io(
                format!(
                    "reading archive {} ({} compression) at tar offset {at}; the file \
                     is damaged or truncated: export the checkpoint again",
                    self.archive, self.compression
                ),
                source,
            );
        }
        if st.overflow {
            let at = st.offset;
            drop(st);
            return self.invalid(format!(
                "extension headers of over {MAX_EXTENSION_BYTES} bytes before tar offset {at}"
            ));
        }
        if st.eof {
            let in_padding = st.recorded.len() < self.owed_padding;
            drop(st);
            let what = match self.last_file {
                Some(i) if in_padding => {
                    format!("the padding after member {:?}", self.members[i].name)
                }
                _ => "a header".to_string(),
            };
            return self.truncated(&what);
        }
        let block = st.recorded[st.recorded.len().saturating_sub(BLOCK)..].to_vec();
        let at = st.offset.saturating_sub(BLOCK as u64);
        drop(st);
        self.invalid(if checksum_ok(&block) {
            format!("the header at tar offset {at} is not valid ({e})")
        } else if at == 0 {
            "it is not a tar archive (nor gzip- or zstd-compressed tar)".to_string()
        } else {
            format!("the header at tar offset {at} has a bad checksum (the file is damaged)")
        })
    }

    fn truncated(&self, what: &str) -> ClientError {
        ClientError::io(
            format!(
                "archive {} is truncated: it ends inside {what}, {} bytes into the tar; \
                 export the checkpoint again with `podman container checkpoint --export`",
                self.archive,
                self.state.borrow().offset
            ),
            io::Error::from(io::ErrorKind::UnexpectedEof),
        )
    }

    fn invalid(&self, what: String) -> ClientError {
        ClientError::Usage(format!(
            "archive {}: {what}; is it the output of `podman container checkpoint --export`?",
            self.archive
        ))
    }
}

/// Fills `buf` unless the stream ends first; returns how much it filled.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The layers of an imported archive, in the order they are filled.
#[derive(Default)]
struct Layers {
    process: Vec<File>,
    rootfs: Vec<File>,
    extra: Vec<File>,
    index: Option<File>,
}

impl Layers {
    fn add(&mut self, place: Place, path: String, mode: u32, size: u64, extents: Vec<Extent>) {
        let f = File {
            path,
            size,
            mode,
            extents,
        };
        match place {
            Place::Process => self.process.push(f),
            Place::Rootfs => self.rootfs.push(f),
            Place::Extra => self.extra.push(f),
        }
    }

    fn count(&self) -> usize {
        self.process.len()
            + self.rootfs.len()
            + self.extra.len()
            + usize::from(self.index.is_some())
    }

    fn bytes(&self) -> u64 {
        let all = [&self.process, &self.rootfs, &self.extra];
        all.into_iter()
            .flatten()
            .chain(&self.index)
            .map(|f| f.size)
            .sum()
    }

    fn into_layers(self) -> Vec<Layer> {
        let layer = |kind, name: Option<&str>, files| Layer {
            kind,
            name: name.map(str::to_string),
            rank: None,
            files,
        };
        let mut out = vec![layer(
            LayerKind::Process,
            Some(CHECKPOINT_DIR),
            self.process,
        )];
        if !self.rootfs.is_empty() {
            out.push(layer(LayerKind::Rootfs, None, self.rootfs));
        }
        if !self.extra.is_empty() {
            out.push(layer(LayerKind::Extra, None, self.extra));
        }
        if let Some(index) = self.index {
            out.push(layer(LayerKind::Extra, Some(INDEX_LAYER), vec![index]));
        }
        out
    }
}
