//! Podman checkpoint archives: import (`podman container checkpoint --export FILE`)
//! as a snapshot, and export a snapshot back into a byte-identical tar.
//!
//! ```text
//! FILE (.tar | gzip | zstd, by magic bytes)
//!   ─▶ tar scanner (1 blocking thread; 512-byte headers kept raw)
//!        ─▶ member data in 1 MiB blocks (bounded channel) ─▶ Uploader::chunk_stream
//!   layers: process  "checkpoint"      CRIU images under checkpoint/, paths relative to it
//!           rootfs   (no name)         rootfs-diff.tar
//!           extra    (no name)         every other regular member (config.dump, spec.dump, ...)
//!           extra    "podman-archive"  archive-index.json: the archive's skeleton
//! ```
//!
//! A `snapctl pull` of such a snapshot into DIR lays the files out as Podman extracts
//! the archive (DIR/checkpoint/inventory.img, DIR/config.dump, ...), plus
//! DIR/podman-archive/archive-index.json.
//!
//! The skeleton keeps, per member in archive order, the raw header blocks (PAX `x`/`g`
//! and GNU `L`/`K` extension members with their data included), which pulled file holds
//! its data, and the padding after it when that was not zeros; plus the bytes after the
//! end-of-archive marker (tar writers pad to a 10240-byte record). [`pull_archive`]
//! writes headers + data + padding + trailer back: the uncompressed original, byte for
//! byte. Directories, symlinks, hard links, devices and FIFOs are headers only.
//!
//! Memory stays bounded whatever the archive size: member data flows through a few
//! 1 MiB blocks; only headers (and extension members up to 1 MiB each) are held.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use snapreg_proto::manifest::{check_relative_path, Extent, File, Layer, LayerKind};
use snapreg_proto::reference::{Reference, Target};

use crate::chunker::ChunkerConfig;
use crate::error::{shown, ClientError, Result};
use crate::progress::Progress;
use crate::pull::{self, PullReport};
use crate::push::{self, PushReport, Uploader};
use crate::remote::Remote;

/// Name of the process layer, and the archive directory holding the CRIU images.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Name of the extra layer that holds the archive's skeleton.
pub const INDEX_LAYER: &str = "podman-archive";
/// The skeleton's file in [`INDEX_LAYER`].
pub const INDEX_FILE: &str = "archive-index.json";
/// `format` of [`ArchiveIndex`].
pub const INDEX_FORMAT: &str = "snapreg-podman-archive";
pub const INDEX_VERSION: u32 = 1;
/// Manifest annotation naming the skeleton (`layer/file`).
pub const ANNOTATION: &str = "org.snapreg.podman-archive";

const BLOCK: usize = 512;
/// Member data moves in blocks of this size, at most `DATA_BLOCKS_AHEAD` queued.
const DATA_BLOCK: usize = 1 << 20;
const DATA_BLOCKS_AHEAD: usize = 4;
/// Extension members (PAX, GNU long names) are held in memory: bound them.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Bytes after the end-of-archive marker that are not zeros are kept inline: bound them.
const MAX_TRAILER_BYTES: u64 = 1 << 20;
/// The skeleton is read back into memory on export.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// The skeleton of an archive: everything but the member data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchiveIndex {
    pub format: String,
    pub version: u32,
    /// Compression of the imported file (`none`, `gzip`, `zstd`); exports are plain tar.
    pub compression: String,
    pub members: Vec<Member>,
    /// Bytes from the first all-zero header block to the end of the tar stream.
    pub trailer_len: u64,
    /// Those bytes, hex, only when they are not all zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trailer_hex: Option<String>,
}

/// One archive member, with the extension members that precede it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The member's name as readers see it (PAX or GNU long name applied), for messages.
    pub name: String,
    /// `file`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`, or `extension`
    /// (extension headers at the end of the archive that no member follows).
    pub kind: String,
    /// Raw header blocks, hex: extension members (header + data + padding), then the
    /// member's own 512-byte header.
    pub header_hex: String,
    /// For `file`: where a pull of the snapshot puts its data (relative to the pull
    /// directory; see [`crate::pull::file_dest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default)]
    pub size: u64,
    /// The padding after the data, hex, only when it is not all zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padding_hex: Option<String>,
}

/// Imports a Podman checkpoint archive (plain, gzip or zstd tar) as one snapshot:
/// a `process` layer from `checkpoint/`, `rootfs` and `extra` layers for the other
/// members, and the archive's skeleton for a byte-identical [`pull_archive`].
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

    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel::<FileStart>(1);
    let archive_shown = shown(archive);
    let scanner = tokio::task::spawn_blocking(move || {
        scan(input, &archive_shown, compression, &mut |f| {
            ev_tx.blocking_send(f).is_ok()
        })
    });

    let mut layers = Layers::default();
    let imported: Result<()> = async {
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
        Ok(())
    }
    .await;
    // Whatever happened, the scanner ends once nobody takes its events.
    drop(ev_rx);
    let scanned = scanner
        .await
        .map_err(|e| ClientError::io("archive reader thread", io::Error::other(e)));

    let index = match (imported, scanned) {
        (Ok(()), Ok(Ok(index))) => index,
        (imported, scanned) => {
            let upload_err = uploader.abort().await;
            return Err(match scanned {
                Err(e) | Ok(Err(ScanError::Failed(e))) => e,
                Ok(Err(ScanError::Cancelled)) | Ok(Ok(_)) => match (imported, upload_err) {
                    (_, Some(e)) => e,
                    (Err(e), None) => e,
                    (Ok(()), None) => {
                        ClientError::Registry("the archive reader stopped early; push again".into())
                    }
                },
            });
        }
    };

    let index_bytes = serde_json::to_vec_pretty(&index).expect("index serializes");
    let len = index_bytes.len() as u64;
    progress.add_total(len);
    let extents = match uploader
        .chunk_stream(io::Cursor::new(index_bytes), false)
        .await
    {
        Ok(x) => x,
        Err(e) => return Err(uploader.abort().await.unwrap_or(e)),
    };
    layers.index = Some(File {
        path: INDEX_FILE.into(),
        size: len,
        mode: 0o644,
        extents,
    });

    let files = layers.count();
    let logical = layers.bytes();
    let mut manifest = uploader.new_manifest(layers.into_layers(), true);
    manifest
        .annotations
        .insert(ANNOTATION.into(), format!("{INDEX_LAYER}/{INDEX_FILE}"));
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

/// Writes the snapshot `reference` (pushed by [`push_archive`]) to `out` as an
/// uncompressed tar, byte-identical to the imported archive once decompressed.
///
/// The files are pulled (verified) into a temporary directory next to `out`, then
/// assembled into `.NAME.snapreg-partial`, which is renamed to `out` when whole: the
/// export needs about twice the archive's size free there while it runs.
pub async fn pull_archive(
    remote: &Remote,
    reference: &Reference,
    out: &Path,
    progress: Progress,
) -> Result<PullReport> {
    let started = Instant::now();
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ClientError::Usage(format!("{} is not a file name", shown(out))))?;
    for ext in [".gz", ".tgz", ".zst", ".tzst", ".xz", ".bz2"] {
        if name.ends_with(ext) {
            return Err(ClientError::Usage(format!(
                "{} would hold an uncompressed tar: name it NAME.tar (Podman's restore --import \
                 reads plain tar; compress it afterwards if you need to)",
                shown(out)
            )));
        }
    }
    if out.is_dir() {
        return Err(ClientError::Usage(format!(
            "{} is a directory: give the archive's file name, e.g. {}",
            shown(out),
            shown(&out.join("checkpoint.tar"))
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };

    let (digest, manifest) = pull::fetch_manifest(remote, reference).await?;
    let index_layer = manifest
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Extra && l.name.as_deref() == Some(INDEX_LAYER));
    if !index_layer.is_some_and(|l| l.files.iter().any(|f| f.path == INDEX_FILE)) {
        return Err(ClientError::Usage(format!(
            "{reference} was not pushed from a Podman checkpoint archive (it has no \
             {INDEX_LAYER:?} layer): pull it as a directory with `snapctl pull {reference} DIR`"
        )));
    }
    // Every file a pull writes, relative to the pull directory.
    let pulled: HashSet<String> = manifest
        .layers
        .iter()
        .flat_map(|l| {
            l.files.iter().map(move |f| match &l.name {
                Some(n) => format!("{n}/{}", f.path),
                None => f.path.clone(),
            })
        })
        .collect();

    // Pin the digest: the tag may move while we pull.
    let pinned = Reference {
        repository: reference.repository.clone(),
        target: Target::Digest(digest),
    };
    let tmp =
        RemoveOnDrop::dir(parent.join(format!(".{name}.snapreg-export-{}", std::process::id())));
    if tmp.path.exists() {
        std::fs::remove_dir_all(&tmp.path)
            .map_err(|e| ClientError::io(format!("removing stale {}", shown(&tmp.path)), e))?;
    }
    let report = pull::pull_dir(remote, &pinned, &tmp.path, progress.clone()).await?;

    let index_path = tmp.path.join(INDEX_LAYER).join(INDEX_FILE);
    let index = read_index(&index_path)?;
    let partial = RemoveOnDrop::file(parent.join(format!(".{name}.snapreg-partial")));
    let (tmp_dir, partial_path) = (tmp.path.clone(), partial.path.clone());
    let members = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::create(&partial_path)
            .map_err(|e| ClientError::io(format!("creating {}", shown(&partial_path)), e))?;
        assemble(&index, &tmp_dir, &pulled, &mut f, &partial_path)?;
        f.sync_all()
            .map_err(|e| ClientError::io(format!("syncing {}", shown(&partial_path)), e))?;
        Ok::<_, ClientError>(index.members.len())
    })
    .await
    .map_err(|e| ClientError::io("archive writer thread", io::Error::other(e)))??;
    std::fs::rename(&partial.path, out)
        .map_err(|e| ClientError::io(format!("renaming into {}", shown(out)), e))?;
    partial.disarm();
    drop(tmp);
    Ok(PullReport {
        reference: reference.to_string(),
        digest: report.digest,
        files: members,
        counters: progress.counters.snapshot(),
        chunks_direct: report.chunks_direct,
        seconds: started.elapsed().as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------
// Import: opening, scanning.

/// Opens `path` and picks the decompressor from its first bytes.
fn open_archive(path: &Path) -> Result<(Box<dyn Read + Send>, &'static str)> {
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
enum Place {
    Process,
    Rootfs,
    Extra,
}

/// A regular member whose data follows through `data`.
struct FileStart {
    member: String,
    place: Place,
    /// Path in its layer.
    path: String,
    mode: u32,
    size: u64,
    data: BlockReader,
}

#[derive(Debug)]
enum ScanError {
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
struct BlockReader {
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

/// The tar stream, with its offset for messages.
struct TarStream<'a> {
    r: Box<dyn Read + Send>,
    offset: u64,
    shown: &'a str,
    compression: &'static str,
}

impl TarStream<'_> {
    /// Fills `buf` unless the stream ends first; returns how much it filled.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(ClientError::io(
                        format!(
                            "reading archive {} ({} compression) at tar offset {}; the file \
                             is damaged or truncated: export the checkpoint again",
                            self.shown,
                            self.compression,
                            self.offset + n as u64
                        ),
                        e,
                    ))
                }
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    fn truncated(&self, what: &str) -> ClientError {
        ClientError::io(
            format!(
                "archive {} is truncated: it ends inside {what}, {} bytes into the tar; \
                 export the checkpoint again with `podman container checkpoint --export`",
                self.shown, self.offset
            ),
            io::Error::from(io::ErrorKind::UnexpectedEof),
        )
    }

    fn invalid(&self, what: String) -> ClientError {
        ClientError::Usage(format!(
            "archive {}: {what}; is it the output of `podman container checkpoint --export`?",
            self.shown
        ))
    }

    /// Reads exactly `buf.len()` bytes or fails naming `what`.
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        if self.fill(buf)? < buf.len() {
            return Err(self.truncated(what));
        }
        Ok(())
    }
}

fn padding_of(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

fn checksum_ok(block: &[u8]) -> bool {
    let stored = tar::Header::from_byte_slice(block).cksum();
    let Ok(stored) = stored else { return false };
    let (mut unsigned, mut signed) = (0u32, 0i32);
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u32::from(b);
        signed += i32::from(b as i8);
    }
    stored == unsigned || stored as i32 == signed
}

/// Parses PAX records (`LEN key=value\n`), honouring LEN (values may hold newlines).
fn pax_records(data: &[u8]) -> std::result::Result<Vec<(String, Vec<u8>)>, String> {
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

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// A member name as a relative path: leading `./` and trailing `/` dropped.
fn normalize(name: &str) -> &str {
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
fn scan(
    input: Box<dyn Read + Send>,
    archive: &str,
    compression: &'static str,
    on_file: &mut dyn FnMut(FileStart) -> bool,
) -> std::result::Result<ArchiveIndex, ScanError> {
    let mut s = TarStream {
        r: input,
        offset: 0,
        shown: archive,
        compression,
    };
    let mut members = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    // Extension members waiting for the member they describe.
    let mut pending: Vec<u8> = Vec::new();
    let (mut pax_path, mut pax_size, mut gnu_long): (
        Option<Vec<u8>>,
        Option<u64>,
        Option<Vec<u8>>,
    ) = (None, None, None);
    let mut block = [0u8; BLOCK];
    let first_zero;
    loop {
        let n = s.fill(&mut block)?;
        if n == 0 {
            if s.offset == 0 {
                return Err(s.invalid("the file is empty".into()).into());
            }
            return Err(s
                .truncated("its member list (no end-of-archive marker)")
                .into());
        }
        if n < BLOCK {
            return Err(s.truncated("a header").into());
        }
        if block.iter().all(|&b| b == 0) {
            first_zero = block.to_vec();
            break;
        }
        if !checksum_ok(&block) {
            let what = if s.offset == BLOCK as u64 {
                "it is not a tar archive (nor gzip- or zstd-compressed tar)".to_string()
            } else {
                format!(
                    "the header at tar offset {} has a bad checksum (the file is damaged)",
                    s.offset - BLOCK as u64
                )
            };
            return Err(s.invalid(what).into());
        }
        let header = tar::Header::from_byte_slice(&block);
        let typeflag = block[156];
        let header_size = header.entry_size().map_err(|e| {
            s.invalid(format!(
                "bad size field at tar offset {}: {e}",
                s.offset - BLOCK as u64
            ))
        })?;

        if matches!(typeflag, b'x' | b'g' | b'L' | b'K') {
            if header_size > MAX_EXTENSION_BYTES {
                return Err(s
                    .invalid(format!(
                        "an extension header of {header_size} bytes (over the \
                         {MAX_EXTENSION_BYTES}-byte limit)"
                    ))
                    .into());
            }
            let mut data = vec![0u8; header_size as usize + padding_of(header_size)];
            s.exact(&mut data, "an extension header")?;
            let body = &data[..header_size as usize];
            match typeflag {
                b'x' => {
                    let records = pax_records(body)
                        .map_err(|e| s.invalid(format!("a PAX header holds {e}")))?;
                    for (k, v) in records {
                        match k.as_str() {
                            "path" => pax_path = Some(v),
                            "size" => {
                                let size = std::str::from_utf8(&v)
                                    .ok()
                                    .and_then(|t| t.parse().ok())
                                    .ok_or_else(|| {
                                        s.invalid("a PAX size that is not a number".into())
                                    })?;
                                pax_size = Some(size);
                            }
                            k if k.starts_with("GNU.sparse.") => {
                                return Err(s
                                    .invalid(
                                        "a sparse member (GNU.sparse PAX records), which snapreg \
                                         does not import; create the archive without --sparse"
                                            .into(),
                                    )
                                    .into())
                            }
                            _ => {}
                        }
                    }
                }
                b'L' => gnu_long = Some(trim_nul(body).to_vec()),
                _ => {}
            }
            pending.extend_from_slice(&block);
            pending.extend_from_slice(&data);
            continue;
        }

        let name_bytes = pax_path
            .take()
            .or_else(|| gnu_long.take())
            .unwrap_or_else(|| header.path_bytes().into_owned());
        let name = String::from_utf8_lossy(&name_bytes).into_owned();
        let size = pax_size.take().unwrap_or(header_size);
        let is_dir_name = name.ends_with('/');
        let kind = match typeflag {
            b'0' | b'7' => "file",
            0 if is_dir_name => "dir",
            0 => "file",
            b'1' => "hardlink",
            b'2' => "symlink",
            b'3' => "char",
            b'4' => "block",
            b'5' => "dir",
            b'6' => "fifo",
            b'S' => {
                return Err(s
                    .invalid(format!(
                        "member {name:?} is a GNU sparse file, which snapreg does not import; \
                         create the archive without --sparse"
                    ))
                    .into())
            }
            t => {
                return Err(s
                    .invalid(format!(
                        "member {name:?} has tar type {:?}, which snapreg does not import",
                        t as char
                    ))
                    .into())
            }
        };
        let rel = normalize(&name);
        if !(rel.is_empty() && kind == "dir") {
            if let Err(reason) = check_relative_path(rel) {
                return Err(ScanError::Failed(ClientError::Usage(format!(
                    "archive {archive}: member {name:?} would land outside the directory it is \
                     extracted into ({reason}); refusing the archive: re-export the checkpoint \
                     with `podman container checkpoint --export`"
                ))));
            }
        }
        let mut header_bytes = std::mem::take(&mut pending);
        header_bytes.extend_from_slice(&block);

        if kind != "file" {
            if size != 0 {
                return Err(s
                    .invalid(format!(
                        "member {name:?} ({kind}) has a size of {size}: a header-only member \
                         with data is ambiguous"
                    ))
                    .into());
            }
            members.push(Member {
                name,
                kind: kind.into(),
                header_hex: hex::encode(&header_bytes),
                file: None,
                size: 0,
                padding_hex: None,
            });
            continue;
        }

        if std::str::from_utf8(&name_bytes).is_err() {
            return Err(s
                .invalid(format!(
                    "member {name:?}: its name is not UTF-8, which snapreg cannot store"
                ))
                .into());
        }
        let (place, path) = match rel.strip_prefix("checkpoint/") {
            Some(p) => (Place::Process, p.to_string()),
            None if rel == "rootfs-diff.tar" => (Place::Rootfs, rel.to_string()),
            None => (Place::Extra, rel.to_string()),
        };
        if rel == INDEX_LAYER
            || rel.starts_with(&format!("{INDEX_LAYER}/"))
            || rel == CHECKPOINT_DIR
        {
            return Err(s
                .invalid(format!(
                    "member {name:?} collides with where snapreg keeps the archive's own \
                     files ({INDEX_LAYER}/, {CHECKPOINT_DIR}/)"
                ))
                .into());
        }
        if !seen.insert(rel.to_string()) {
            return Err(s
                .invalid(format!(
                    "member {name:?} appears twice; snapreg keeps one copy of each file: \
                     re-export the checkpoint"
                ))
                .into());
        }
        let mode = header.mode().map(|m| m & 0o7777).unwrap_or(0o644);
        members.push(Member {
            name: name.clone(),
            kind: kind.into(),
            header_hex: hex::encode(&header_bytes),
            file: Some(rel.to_string()),
            size,
            padding_hex: None,
        });

        let (tx, rx) = sync_channel(DATA_BLOCKS_AHEAD);
        let start = FileStart {
            member: name.clone(),
            place,
            path,
            mode,
            size,
            data: BlockReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
        };
        if !on_file(start) {
            return Err(ScanError::Cancelled);
        }
        stream_data(&mut s, &tx, size, &name)?;
        drop(tx);
        let mut pad = vec![0u8; padding_of(size)];
        s.exact(&mut pad, &format!("the padding after member {name:?}"))?;
        if pad.iter().any(|&b| b != 0) {
            members.last_mut().expect("just pushed").padding_hex = Some(hex::encode(&pad));
        }
    }

    if !pending.is_empty() {
        members.push(Member {
            name: String::new(),
            kind: "extension".into(),
            header_hex: hex::encode(&pending),
            file: None,
            size: 0,
            padding_hex: None,
        });
    }
    // The trailer: the first zero block and everything after it, kept inline only
    // when it is not all zeros.
    let mut trailer_len = first_zero.len() as u64;
    let mut kept = first_zero;
    let mut all_zero = true;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = s.fill(&mut buf)?;
        if n == 0 {
            break;
        }
        trailer_len += n as u64;
        all_zero &= buf[..n].iter().all(|&b| b == 0);
        if !all_zero && trailer_len > MAX_TRAILER_BYTES {
            return Err(s
                .invalid(format!(
                    "more than {MAX_TRAILER_BYTES} bytes of data after the end-of-archive marker"
                ))
                .into());
        }
        if trailer_len <= MAX_TRAILER_BYTES {
            kept.extend_from_slice(&buf[..n]);
        }
    }
    // A lone zero block followed by more data is not an end (Podman's reader refuses
    // it too).
    if !all_zero && (kept.len() < 2 * BLOCK || kept[BLOCK..2 * BLOCK].iter().any(|&b| b != 0)) {
        return Err(s
            .invalid("it has data after a lone zero block (concatenated archives?)".into())
            .into());
    }
    if !seen.contains("checkpoint/inventory.img") {
        return Err(s
            .invalid(format!(
                "it has no checkpoint/inventory.img ({} members read), so it holds no CRIU \
                 checkpoint",
                members.len()
            ))
            .into());
    }
    Ok(ArchiveIndex {
        format: INDEX_FORMAT.into(),
        version: INDEX_VERSION,
        compression: compression.into(),
        members,
        trailer_len,
        trailer_hex: (!all_zero).then(|| hex::encode(&kept)),
    })
}

/// Moves `size` bytes of member data from the archive into `tx`.
fn stream_data(
    s: &mut TarStream<'_>,
    tx: &SyncSender<io::Result<Vec<u8>>>,
    size: u64,
    name: &str,
) -> std::result::Result<(), ScanError> {
    let mut left = size;
    while left > 0 {
        let n = left.min(DATA_BLOCK as u64) as usize;
        let mut block = vec![0u8; n];
        let got = match s.fill(&mut block) {
            Ok(got) => got,
            Err(e) => {
                let _ = tx.send(Err(io::Error::other("the archive could not be read")));
                return Err(e.into());
            }
        };
        if got < n {
            let _ = tx.send(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive is truncated",
            )));
            return Err(s
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

// ---------------------------------------------------------------------------------
// Export.

fn read_index(path: &Path) -> Result<ArchiveIndex> {
    let bad = |why: String| {
        ClientError::Registry(format!(
            "the snapshot's archive index ({}) {why}; it cannot be exported — push the \
             archive again",
            shown(path)
        ))
    };
    let len = std::fs::metadata(path)
        .map_err(|e| ClientError::io(format!("reading {}", shown(path)), e))?
        .len();
    if len > MAX_INDEX_BYTES {
        return Err(bad(format!(
            "is {len} bytes, over the {MAX_INDEX_BYTES}-byte limit"
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| ClientError::io(format!("reading {}", shown(path)), e))?;
    let index: ArchiveIndex =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("does not parse: {e}")))?;
    if index.format != INDEX_FORMAT || index.version != INDEX_VERSION {
        return Err(ClientError::Usage(format!(
            "the snapshot's archive index is {:?} version {}; this snapctl writes {INDEX_FORMAT:?} \
             version {INDEX_VERSION} only: use a newer snapctl",
            index.format, index.version
        )));
    }
    Ok(index)
}

/// Writes the archive described by `index`, taking member data from the files under
/// `dir` (a pull of the snapshot); `pulled` lists the files the pull wrote.
fn assemble(
    index: &ArchiveIndex,
    dir: &Path,
    pulled: &HashSet<String>,
    out: &mut std::fs::File,
    out_path: &Path,
) -> Result<()> {
    let bad = |why: String| {
        ClientError::Registry(format!(
            "the snapshot's archive index is inconsistent: {why}; push the archive again"
        ))
    };
    let write_err = |e| ClientError::io(format!("writing {}", shown(out_path)), e);
    let unhex = |what: &str, h: &str| hex::decode(h).map_err(|e| bad(format!("{what}: {e}")));
    for m in &index.members {
        let header = unhex(&format!("header of {:?}", m.name), &m.header_hex)?;
        if header.is_empty() || header.len() % BLOCK != 0 {
            return Err(bad(format!(
                "header of {:?} is {} bytes",
                m.name,
                header.len()
            )));
        }
        out.write_all(&header).map_err(write_err)?;
        let Some(rel) = &m.file else { continue };
        if check_relative_path(rel).is_err() || !pulled.contains(rel) {
            return Err(bad(format!(
                "member {:?} names file {rel:?}, which the snapshot lacks",
                m.name
            )));
        }
        let path = dir.join(rel);
        // Our own copy: whatever mode the member had, we must read it.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        let mut f = std::fs::File::open(&path)
            .map_err(|e| ClientError::io(format!("opening {}", shown(&path)), e))?;
        let len = f
            .metadata()
            .map_err(|e| ClientError::io(format!("reading {}", shown(&path)), e))?
            .len();
        if len != m.size {
            return Err(bad(format!(
                "member {:?} has {} bytes, its file {len}",
                m.name, m.size
            )));
        }
        let copied = io::copy(&mut f, out).map_err(|e| {
            ClientError::io(
                format!("copying {} into {}", shown(&path), shown(out_path)),
                e,
            )
        })?;
        if copied != m.size {
            return Err(bad(format!("{} changed while it was copied", shown(&path))));
        }
        let pad = match &m.padding_hex {
            Some(h) => unhex(&format!("padding of {:?}", m.name), h)?,
            None => vec![0u8; padding_of(m.size)],
        };
        if pad.len() != padding_of(m.size) {
            return Err(bad(format!(
                "padding of {:?} is {} bytes",
                m.name,
                pad.len()
            )));
        }
        out.write_all(&pad).map_err(write_err)?;
    }
    match &index.trailer_hex {
        Some(h) => {
            let t = unhex("trailer", h)?;
            if t.len() as u64 != index.trailer_len {
                return Err(bad(format!(
                    "trailer is {} bytes, not {}",
                    t.len(),
                    index.trailer_len
                )));
            }
            out.write_all(&t).map_err(write_err)?;
        }
        None => {
            let zeros = vec![0u8; 64 << 10];
            let mut left = index.trailer_len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                out.write_all(&zeros[..n]).map_err(write_err)?;
                left -= n as u64;
            }
        }
    }
    Ok(())
}

/// A temporary file or directory, removed on drop unless disarmed.
struct RemoveOnDrop {
    path: PathBuf,
    is_dir: bool,
    armed: bool,
}

impl RemoveOnDrop {
    fn dir(path: PathBuf) -> Self {
        RemoveOnDrop {
            path,
            is_dir: true,
            armed: true,
        }
    }
    fn file(path: PathBuf) -> Self {
        RemoveOnDrop {
            path,
            is_dir: false,
            armed: true,
        }
    }
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = if self.is_dir {
                std::fs::remove_dir_all(&self.path)
            } else {
                std::fs::remove_file(&self.path)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    type Files = BTreeMap<String, (Place, String, u32, Vec<u8>)>;

    /// Scans an archive held in memory; every member's data is read by its own thread,
    /// as chunk_stream would.
    fn scan_bytes(bytes: Vec<u8>) -> std::result::Result<(ArchiveIndex, Files), ScanError> {
        scan_reader(Box::new(io::Cursor::new(bytes)), "none")
    }

    fn scan_reader(
        input: Box<dyn Read + Send>,
        compression: &'static str,
    ) -> std::result::Result<(ArchiveIndex, Files), ScanError> {
        let mut readers = Vec::new();
        let index = scan(input, "test.tar", compression, &mut |mut f: FileStart| {
            let meta = (f.member.clone(), f.place, f.path.clone(), f.mode, f.size);
            readers.push((
                meta,
                std::thread::spawn(move || {
                    let mut v = Vec::new();
                    f.data.read_to_end(&mut v).map(|_| v)
                }),
            ));
            true
        });
        let mut files = Files::new();
        for ((member, place, path, mode, size), h) in readers {
            if let Ok(data) = h.join().unwrap() {
                assert_eq!(data.len() as u64, size, "{member}");
                files.insert(normalize(&member).to_string(), (place, path, mode, data));
            }
        }
        index.map(|i| (i, files))
    }

    /// scan, then assemble from a directory laid out as a pull would: the original bytes.
    fn round_trip(bytes: &[u8]) -> (ArchiveIndex, Files) {
        let (index, files) = scan_bytes(bytes.to_vec()).unwrap_or_else(|e| panic!("{e:?}"));
        let dir = tempfile::tempdir().unwrap();
        let mut pulled = HashSet::new();
        for (rel, (place, path, _, data)) in &files {
            let on_disk = match place {
                Place::Process => format!("{CHECKPOINT_DIR}/{path}"),
                _ => path.clone(),
            };
            assert_eq!(&on_disk, rel);
            let p = dir.path().join(&on_disk);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            pulled.insert(on_disk);
        }
        let out_path = dir.path().join("out.tar");
        let mut out = std::fs::File::create(&out_path).unwrap();
        // Through JSON, as it travels.
        let index2: ArchiveIndex =
            serde_json::from_slice(&serde_json::to_vec(&index).unwrap()).unwrap();
        assemble(&index2, dir.path(), &pulled, &mut out, &out_path).unwrap();
        drop(out);
        let back = std::fs::read(&out_path).unwrap();
        assert_eq!(back.len(), bytes.len());
        assert!(back == bytes, "export differs from the original");
        (index, files)
    }

    fn data(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn gnu_header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_username("podman").unwrap();
        h
    }

    /// A GNU-format archive as Podman might write it, padded to a 10240-byte record.
    fn podman_like() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
            let mut h = gnu_header(tar::EntryType::Directory, 0, 0o755);
            b.append_data(&mut h, p, io::empty()).unwrap();
        };
        let file = |b: &mut tar::Builder<Vec<u8>>, p: &str, d: &[u8], mode: u32| {
            let mut h = gnu_header(tar::EntryType::Regular, d.len() as u64, mode);
            b.append_data(&mut h, p, d).unwrap();
        };
        dir(&mut b, "checkpoint/");
        file(&mut b, "checkpoint/inventory.img", &data(1, 44), 0o600);
        file(
            &mut b,
            "checkpoint/pages-1.img",
            &data(2, (1 << 20) + 4096 * 3 + 17),
            0o600,
        );
        file(&mut b, "checkpoint/dump.log", &data(3, 5000), 0o644);
        file(&mut b, "checkpoint/empty.img", &[], 0o600);
        file(&mut b, "config.dump", b"{\"id\":\"abc\"}", 0o600);
        file(&mut b, "spec.dump", b"{\"ociVersion\":\"1.0\"}", 0o600);
        file(&mut b, "rootfs-diff.tar", &data(4, 10240), 0o600);
        let long = format!("volumes/{}/data.bin", "x".repeat(120));
        file(&mut b, &long, &data(5, 700), 0o640);
        let mut h = gnu_header(tar::EntryType::Symlink, 0, 0o777);
        b.append_link(&mut h, "checkpoint/link", "inventory.img")
            .unwrap();
        let mut h = gnu_header(tar::EntryType::Link, 0, 0o600);
        b.append_link(&mut h, "hard.dump", "config.dump").unwrap();
        let mut out = b.into_inner().unwrap();
        out.resize(out.len().div_ceil(10240) * 10240, 0);
        out
    }

    /// One raw ustar header block with any name (even one tar::Builder refuses).
    fn raw_header(name: &[u8], kind: u8, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkflag = [kind];
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn pax(records: &[(&str, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = format!(" {k}={v}\n");
            let mut len = rest.len() + 1;
            while format!("{len}").len() + rest.len() != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len}{rest}").as_bytes());
        }
        let mut out = raw_header(b"PaxHeaders/x", b'x', body.len() as u64);
        out.extend_from_slice(&body);
        out.resize(out.len() + padding_of(body.len() as u64), 0);
        out
    }

    fn member(name: &[u8], kind: u8, d: &[u8]) -> Vec<u8> {
        let mut out = raw_header(name, kind, d.len() as u64);
        out.extend_from_slice(d);
        out.resize(out.len() + padding_of(d.len() as u64), 0);
        out
    }

    fn finish(mut v: Vec<u8>) -> Vec<u8> {
        v.extend_from_slice(&[0u8; 1024]);
        v
    }

    #[test]
    fn gnu_archive_round_trips_byte_identical() {
        let bytes = podman_like();
        let (index, files) = round_trip(&bytes);
        assert_eq!(index.trailer_len % 512, 0);
        assert!(index.trailer_len >= 1024);
        assert!(index.trailer_hex.is_none());
        let (place, path, mode, _) = &files["checkpoint/pages-1.img"];
        assert_eq!(
            (*place, path.as_str(), *mode),
            (Place::Process, "pages-1.img", 0o600)
        );
        assert_eq!(files["rootfs-diff.tar"].0, Place::Rootfs);
        assert_eq!(files["config.dump"].0, Place::Extra);
        let long = files.keys().find(|k| k.starts_with("volumes/")).unwrap();
        assert!(
            long.ends_with("/data.bin") && long.len() > 100,
            "GNU long name: {long}"
        );
        let kinds: Vec<&str> = index.members.iter().map(|m| m.kind.as_str()).collect();
        assert_eq!(kinds.iter().filter(|k| **k == "file").count(), 8);
        assert!(
            kinds.contains(&"dir") && kinds.contains(&"symlink") && kinds.contains(&"hardlink")
        );
        // The GNU long-name member travels inside the header of the member it names.
        let m = index
            .members
            .iter()
            .find(|m| m.name.starts_with("volumes/"))
            .unwrap();
        assert_eq!(hex::decode(&m.header_hex).unwrap().len(), 512 * 3);
    }

    #[test]
    fn pax_headers_name_and_size_members() {
        let long = format!("checkpoint/{}.img", "p".repeat(150));
        let d = data(9, 3000);
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        v.extend(pax(&[
            ("path", &long),
            ("mtime", "1700000000.5"),
            ("size", "3000"),
        ]));
        // The header's own size field says 0: the PAX record wins.
        let mut h = raw_header(b"checkpoint/truncated-name", b'0', 0);
        h.extend_from_slice(&d);
        h.resize(h.len() + padding_of(3000), 0);
        v.extend(h);
        // A global header, and a value holding a newline.
        v.extend(
            pax(&[("comment", "two\nlines")])
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 156 { b'g' } else { b }),
        );
        let v = finish(v);
        // The 'g' header's checksum changed with its type: recompute it.
        let mut v = v;
        let g_at = v.len() - 1024 - 1024;
        let mut hdr = tar::Header::new_old();
        hdr.as_mut_bytes().copy_from_slice(&v[g_at..g_at + 512]);
        hdr.set_cksum();
        v[g_at..g_at + 512].copy_from_slice(hdr.as_bytes());
        let (index, files) = round_trip(&v);
        assert_eq!(files[long.as_str()].3, d);
        assert_eq!(index.members.last().unwrap().kind, "extension");
    }

    #[test]
    fn compression_is_found_by_magic_bytes_not_by_name() {
        let bytes = podman_like();
        let t = tempfile::tempdir().unwrap();
        let gz = t.path().join("a.tar"); // misleading names on purpose
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&bytes).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = t.path().join("b.tar.gz");
        std::fs::write(&zst, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();
        let plain = t.path().join("c.tar.zst");
        std::fs::write(&plain, &bytes).unwrap();
        for (path, want) in [(&gz, "gzip"), (&zst, "zstd"), (&plain, "none")] {
            let (input, found) = open_archive(path).unwrap();
            assert_eq!(found, want);
            let (index, files) = scan_reader(input, found).unwrap();
            assert_eq!(index.compression, want);
            assert_eq!(files.len(), 8);
        }
        let xz = t.path().join("d.tar");
        std::fs::write(&xz, b"\xfd7zXZ\0rest").unwrap();
        match open_archive(&xz) {
            Err(e) => assert!(e.to_string().contains("xz"), "{e}"),
            Ok(_) => panic!("xz accepted"),
        }
    }

    fn scan_err(bytes: Vec<u8>) -> String {
        match scan_bytes(bytes) {
            Err(ScanError::Failed(e)) => e.to_string(),
            Err(ScanError::Cancelled) => panic!("cancelled"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn truncated_archives_are_refused_clearly() {
        let bytes = podman_like();
        // Inside pages-1.img's data, at a header boundary, inside a header, in the marker.
        let (index, _) = scan_bytes(bytes.clone()).unwrap();
        let end = bytes.len() - index.trailer_len as usize;
        for cut in [600 * 1024, end, end - 300] {
            let e = scan_err(bytes[..cut].to_vec());
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
        // Compressed: cut the gzip stream.
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        let gz = enc.finish().unwrap();
        let cut = gz[..gz.len() / 2].to_vec();
        let input = Box::new(flate2::read::MultiGzDecoder::new(io::Cursor::new(cut)));
        match scan_reader(input, "gzip") {
            Err(ScanError::Failed(e)) => {
                let e = e.to_string();
                assert!(e.contains("truncated"), "{e}");
            }
            _ => panic!("truncated gzip accepted"),
        }
    }

    #[test]
    fn escaping_names_are_refused() {
        for name in [
            &b"../evil"[..],
            b"/etc/passwd",
            b"checkpoint/../../x",
            b"./../x",
        ] {
            let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
            v.extend(member(name, b'0', b"boom"));
            let e = scan_err(finish(v));
            assert!(
                e.contains("outside"),
                "{}: {e}",
                String::from_utf8_lossy(name)
            );
        }
        // A symlink's name is checked too; its target is never followed.
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        v.extend(raw_header(b"../link", b'2', 0));
        assert!(scan_err(finish(v)).contains("outside"));
        // "./" prefixes are fine.
        let mut v = raw_header(b"./", b'5', 0);
        v.extend(member(b"./checkpoint/inventory.img", b'0', b"inv"));
        let (_, files) = round_trip(&finish(v));
        assert!(files.contains_key("checkpoint/inventory.img"));
    }

    #[test]
    fn archives_that_are_not_checkpoints_are_refused() {
        assert!(scan_err(b"hello, not a tar".repeat(100)).contains("not a tar archive"));
        assert!(scan_err(Vec::new()).contains("empty"));
        let e = scan_err(finish(member(b"config.dump", b'0', b"{}")));
        assert!(e.contains("inventory.img"), "{e}");
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        v.extend(member(b"checkpoint/inventory.img", b'0', b"inv"));
        assert!(scan_err(finish(v)).contains("twice"));
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        v.extend(member(b"podman-archive/x", b'0', b"x"));
        assert!(scan_err(finish(v)).contains("collides"));
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        v.extend(member(b"sparse", b'S', b""));
        assert!(scan_err(finish(v)).contains("sparse"));
        // A corrupt header after the first.
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        let mut bad = member(b"x", b'0', b"x");
        bad[0] ^= 1;
        v.extend(bad);
        assert!(scan_err(finish(v)).contains("checksum"));
    }

    #[test]
    fn odd_padding_and_trailers_are_kept() {
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        let n = v.len();
        v[n - 1] = 0xAA; // garbage in the padding after the data
        v.extend_from_slice(&[0u8; 1024]);
        v.extend_from_slice(b"junk after the end marker");
        let (index, _) = round_trip(&v);
        assert!(index.members[0].padding_hex.is_some());
        assert!(index.trailer_hex.is_some());
        // A lone zero block followed by another member is not an end.
        let mut v = member(b"checkpoint/inventory.img", b'0', b"inv");
        v.extend_from_slice(&[0u8; 512]);
        v.extend(member(b"more", b'0', b"x"));
        assert!(scan_err(finish(v)).contains("lone zero block"));
    }

    #[test]
    fn a_consumer_that_goes_away_stops_the_scan() {
        let r = scan(
            Box::new(io::Cursor::new(podman_like())),
            "t",
            "none",
            &mut |_| false,
        );
        assert!(matches!(r, Err(ScanError::Cancelled)));
        // The reader dropped mid-member: the scanner stops too.
        let r = scan(
            Box::new(io::Cursor::new(podman_like())),
            "t",
            "none",
            &mut |f| {
                drop(f.data);
                true
            },
        );
        assert!(matches!(r, Err(ScanError::Cancelled)));
    }

    #[test]
    fn pax_records_honour_their_lengths() {
        let recs = pax_records(b"12 path=a\nb\n12 size=300\n").unwrap();
        assert_eq!(recs[0], ("path".into(), b"a\nb".to_vec()));
        assert_eq!(recs[1], ("size".into(), b"300".to_vec()));
        assert!(pax_records(b"99 path=x\n").is_err());
        assert_eq!(normalize("./checkpoint/"), "checkpoint");
        assert_eq!(normalize("."), "");
        assert_eq!(normalize("./"), "");
    }
}
