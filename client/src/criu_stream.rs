//! CRIU's image-streamer protocol, spoken by snapctl itself.
//!
//! `criu dump --stream` / `criu restore --stream` connect once to a UNIX socket in the
//! images dir — `streamer-capture.sock` (dump) or `streamer-serve.sock` (restore) —
//! which must be listening before CRIU starts. On that one connection:
//!
//! ```text
//! CRIU -> streamer   u32 LE length + img_streamer_request_entry { required string filename = 1 }
//! streamer -> CRIU   (restore only) u32 LE length + img_streamer_reply_entry { required bool exists = 1 }
//!                    "exists = false" must be encoded explicitly: 02 00 00 00 08 00
//! pipe fd            (dump: after every request; restore: after a "true" reply)
//!                    a separate sendmsg of 1 data byte + SCM_RIGHTS with one fd;
//!                    dump: the read end (CRIU writes the file), restore: the write end
//! ```
//!
//! One pipe per file; EOF on the pipe ends that file; EOF on the socket ends the run
//! (and also arrives when CRIU fails: success is CRIU's exit code). CRIU keeps several
//! files open at once and does not drain one before asking for the next (pagemap is
//! read in two goes around its pages file), so every pipe is served by its own task
//! while requests keep being answered. Reads on the socket are exact-length: a
//! buffered read would swallow the fd's data byte and the kernel drops the fd; the
//! fd's byte is read by one `recvmsg` with room for one descriptor ([`recv_fd`]).
//! The messages are CRIU's images/img-streamer.proto, vendored in client/proto/criu
//! and built with prost ([`crate::criu_image`]).
//! Pipes are grown to 1 MiB (the host's pipe-max-size): a 1 GiB restore went from
//! 1.28 s to 0.79 s (shared/CRIU-STREAM.md §10).

use std::collections::HashSet;
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use prost::Message;
use tokio::sync::mpsc::UnboundedSender;

use crate::criu_image::{ImgStreamerReplyEntry, ImgStreamerRequestEntry};

pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
pub const SERVE_SOCKET: &str = "streamer-serve.sock";
/// `sun_path` is 108 bytes and CRIU does not check: keep images dirs short.
pub const MAX_SOCKET_PATH: usize = 100;
const PIPE_SIZE: i32 = 1 << 20;
/// No image file name is anywhere near this; bounds what a bad peer makes us read.
const MAX_REQUEST: usize = 4096;

/// Binds the streamer socket in `dir`, removing a stale one.
pub fn bind(dir: &Path, name: &str) -> io::Result<UnixListener> {
    let path = dir.join(name);
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long for a UNIX socket; use a shorter images directory",
                path.display()
            ),
        ));
    }
    let _ = std::fs::remove_file(&path);
    UnixListener::bind(&path)
}

/// Reads the next file request; `None` when CRIU closed the socket between messages.
pub fn read_request(sock: &mut UnixStream) -> io::Result<Option<String>> {
    let mut len = [0u8; 4];
    if !read_exact_or_eof(sock, &mut len)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("streamer request of {len} bytes"),
        ));
    }
    let mut msg = vec![0u8; len];
    sock.read_exact(&mut msg)?;
    parse_filename(&msg).map(Some)
}

/// `true` if `buf` was filled, `false` on EOF before the first byte.
fn read_exact_or_eof(sock: &mut UnixStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Decodes `img_streamer_request_entry` and checks the name is a plain file name, so
/// a served file can never be looked up outside the snapshot.
pub fn parse_filename(msg: &[u8]) -> io::Result<String> {
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("streamer request: {what}"),
        )
    };
    let name = ImgStreamerRequestEntry::decode(msg)
        .map_err(|e| bad(e.to_string()))?
        .filename;
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(bad(format!("{name:?} is not a plain file name")));
    }
    Ok(name)
}

/// Answers a restore request: the u32 LE length, then `img_streamer_reply_entry`.
/// `exists` is proto2 `required`, so prost encodes it even when false (`08 00`).
pub fn send_reply(sock: &mut UnixStream, exists: bool) -> io::Result<()> {
    let reply = ImgStreamerReplyEntry { exists };
    let mut frame = (reply.encoded_len() as u32).to_le_bytes().to_vec();
    reply.encode(&mut frame).map_err(io::Error::other)?;
    sock.write_all(&frame)
}

/// Receives the pipe end CRIU sends after a request (or a "true" reply), grown.
pub fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let fd = recv_criu_fd(sock.as_raw_fd())?;
    grow_pipe(&fd);
    Ok(fd)
}

/// Receives one descriptor as CRIU's `send_fd` sends it (also on the lazy-pages
/// socket): one data byte with one SCM_RIGHTS descriptor, read with exactly one
/// `recvmsg` so the byte and its descriptor cannot be split or merged with the next
/// message. A read timeout on `sock` comes back as WouldBlock.
pub fn recv_criu_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut data = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut data)];
    let msg = loop {
        match recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => {}
            other => break other.map_err(io::Error::from)?,
        }
    };
    if msg.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "CRIU closed the socket before sending a descriptor",
        ));
    }
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel installed these descriptors in our table during this
            // recvmsg; nothing else knows their numbers, so each gets exactly one owner.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    // More than one descriptor is not CRIU's protocol: the extra ones close on drop.
    fds.into_iter().next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "expected a descriptor (SCM_RIGHTS) from CRIU",
        )
    })
}

/// Best effort: 1 MiB, else whatever the kernel allows.
fn grow_pipe(fd: &OwnedFd) {
    for size in [PIPE_SIZE, 256 << 10] {
        if fcntl(fd, FcntlArg::F_SETPIPE_SZ(size)).is_ok() {
            return;
        }
    }
}

/// The restore side's request loop: answers each request ("exists" when the file is
/// in `names`) and hands the pipe of each existing file to `files` (write end).
/// Returns at EOF on the socket, or when the receiver is gone.
pub fn serve_requests(
    mut sock: UnixStream,
    names: HashSet<String>,
    files: UnboundedSender<(String, OwnedFd)>,
) -> io::Result<()> {
    while let Some(name) = read_request(&mut sock)? {
        let exists = names.contains(&name);
        send_reply(&mut sock, exists)?;
        if exists {
            let fd = recv_fd(&sock)?;
            if files.send((name, fd)).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The dump side's request loop: hands each file's pipe (read end) to `files`;
/// `idle` is true while it waits for the next request (every image written and
/// taken once it is, and the socket holds no unread bytes).
pub fn capture_requests(
    mut sock: UnixStream,
    files: UnboundedSender<(String, OwnedFd)>,
    idle: &AtomicBool,
) -> io::Result<()> {
    loop {
        idle.store(true, Ordering::SeqCst);
        let Some(name) = read_request(&mut sock)? else {
            return Ok(());
        };
        idle.store(false, Ordering::SeqCst);
        let fd = recv_fd(&sock)?;
        if files.send((name, fd)).is_err() {
            return Ok(());
        }
    }
}

/// Accepts CRIU's one connection, or returns `None` if CRIU exited first (its stderr
/// then says why: it connects before opening its log).
pub async fn accept_from(
    listener: &UnixListener,
    criu: &mut tokio::process::Child,
) -> io::Result<Option<UnixStream>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if criu.try_wait()?.is_some() {
                    return Ok(None);
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes observed on the wire (shared/CRIU-STREAM.md §2).
    #[test]
    fn decodes_observed_request_and_encodes_replies() {
        let wire = [
            0x0a, 0x0b, b's', b'e', b'c', b'c', b'o', b'm', b'p', b'.', b'i', b'm', b'g',
        ];
        assert_eq!(parse_filename(&wire).unwrap(), "seccomp.img");
        for bad in [
            &b""[..],
            b"\x12\x01a",
            b"\x0a\x05ab",
            b"\x0a\x02a/",
            b"\x0a\xff",
            // fuzz/stream_request crash-7b70e6c6: a length of ~2^64 overflowed.
            b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x0f\x00\x00\x90",
        ] {
            assert!(parse_filename(bad).is_err(), "{bad:?}");
        }
        let (mut a, mut b) = UnixStream::pair().unwrap();
        send_reply(&mut a, false).unwrap();
        send_reply(&mut a, true).unwrap();
        let mut got = [0u8; 12];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 8, 0, 2, 0, 0, 0, 8, 1]);
    }

    #[test]
    fn fd_passing_survives_a_request_in_the_same_buffer() {
        let (mut criu, mut streamer) = UnixStream::pair().unwrap();
        let msg = [0x0a, 0x03, b'a', b'.', b'i'];
        criu.write_all(&(msg.len() as u32).to_le_bytes()).unwrap();
        criu.write_all(&msg).unwrap();
        let (r, w) = pipe();
        send_fd(&criu, &r);
        assert_eq!(read_request(&mut streamer).unwrap().as_deref(), Some("a.i"));
        let got = recv_fd(&streamer).unwrap();
        let mut wf = std::fs::File::from(w);
        wf.write_all(b"through the pipe").unwrap();
        drop(wf);
        drop(r);
        let mut s = String::new();
        std::fs::File::from(got).read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the pipe");
        drop(criu);
        assert_eq!(read_request(&mut streamer).unwrap(), None);
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    /// What CRIU does: one data byte carrying one descriptor.
    fn send_fd(sock: &UnixStream, fd: &OwnedFd) {
        let fds = [fd.as_raw_fd()];
        let sent = nix::sys::socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(&[0])],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(sent, 1);
    }
}
