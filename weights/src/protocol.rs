//! Messages between the weights service and its clients.
//!
//! One connection per exchange: the client writes one JSON [`Request`] line; the
//! service answers one JSON [`Reply`] line, with at most one file descriptor attached
//! to the reply's first bytes (SCM_RIGHTS). The Python client (`python/snapreg_weights.py`)
//! speaks the same lines, so field names are part of the contract.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::{Error, Result};

/// Longest request or reply line: a listing of a few thousand buffers.
pub const MAX_LINE: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A new buffer (zero-filled on memfd; unspecified on CUDA until filled), state
    /// `filling` until sealed. `replace` swaps out an existing buffer of that name
    /// that nobody holds.
    Create {
        name: String,
        size: u64,
        #[serde(default)]
        replace: bool,
        #[serde(default = "yes")]
        lease: bool,
    },
    /// A descriptor for an existing buffer; waits up to `wait_ms` for it to be sealed.
    Attach {
        name: String,
        #[serde(default = "yes")]
        lease: bool,
        #[serde(default)]
        writable: bool,
        #[serde(default)]
        wait_ms: u64,
    },
    /// The buffer's bytes are complete: attach may hand it out. `content` is what
    /// snapctl knows about those bytes (the weights-layer file entry), kept so a later
    /// checkpoint needs not read them again.
    Seal {
        name: String,
        #[serde(default)]
        content: Option<serde_json::Value>,
    },
    /// The caller unmapped these buffers (all of its own when empty). With
    /// `resume_signal`, the caller is recorded as quiesced: a restore of its snapshot
    /// sends it that signal once the weights are back.
    Release {
        #[serde(default)]
        names: Vec<String>,
        #[serde(default)]
        resume_signal: Option<i32>,
    },
    List,
    /// Frees a buffer nobody holds.
    Drop {
        name: String,
    },
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
    /// CUDA device ordinal of the buffers (CUDA backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buffers: Vec<BufferInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quiesced: Vec<Quiesced>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferInfo {
    pub name: String,
    /// Bytes the creator asked for: the weights-layer file size.
    pub size: u64,
    /// Bytes allocated (the backend's granularity): what a mapping must cover.
    pub alloc_size: u64,
    pub sealed: bool,
    /// PIDs that hold the buffer mapped.
    pub leases: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<serde_json::Value>,
}

/// A process that released its buffers before a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quiesced {
    pub pid: u32,
    pub signal: i32,
    pub names: Vec<String>,
}

impl Reply {
    pub fn error(message: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(message.into()),
            ..Reply::default()
        }
    }
}

/// Writes one line; with `fd`, the descriptor rides on the line's first bytes.
pub fn send_line<T: Serialize>(
    stream: &mut UnixStream,
    msg: &T,
    fd: Option<RawFd>,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let Some(fd) = fd else {
        return stream.write_all(&line);
    };
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    stream.write_all(&line[sent..])
}

/// Reads one line and the descriptor that came with it, if any.
pub fn recv_line(stream: &mut UnixStream) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fd = None;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for (i, raw) in fds.into_iter().enumerate() {
                    // SAFETY: the kernel just installed this descriptor for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if i == 0 && fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (msg.bytes, fd)
    };
    buf.truncate(n);
    while !buf.ends_with(b"\n") {
        if buf.len() > MAX_LINE {
            return Err(std::io::Error::other("message longer than 4 MiB"));
        }
        let mut more = [0u8; 64 << 10];
        let m = stream.read(&mut more)?;
        if m == 0 {
            if buf.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            break;
        }
        buf.extend_from_slice(&more[..m]);
    }
    Ok((buf, fd))
}

/// One exchange with the service at `socket`.
pub fn call(socket: &std::path::Path, req: &Request) -> Result<(Reply, Option<OwnedFd>)> {
    let where_ = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|e| Error::Service {
        socket: where_.clone(),
        message: format!(
            "cannot connect ({e}): is `snapctl weights serve --socket {where_}` running?"
        ),
    })?;
    send_line(&mut stream, req, None).map_err(|e| Error::io(format!("writing to {where_}"), e))?;
    let (line, fd) =
        recv_line(&mut stream).map_err(|e| Error::io(format!("reading from {where_}"), e))?;
    let reply: Reply = serde_json::from_slice(&line).map_err(|e| Error::Protocol(e.to_string()))?;
    if !reply.ok {
        return Err(Error::Service {
            socket: where_,
            message: reply.error.unwrap_or_else(|| "request refused".into()),
        });
    }
    Ok((reply, fd))
}
