//! The daemon's side of CRIU's lazy-pages socket (the diagram in [`super`]):
//! `<work dir>/lazy-pages.socket`, one connection from `criu restore --lazy-pages`,
//! each task's pid and userfaultfd, then "restore finished". Blocking, with deadlines.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::criu_stream::recv_criu_fd;

/// The socket's name in CRIU's work dir (criu/uffd.c, LAZY_PAGES_SOCK_NAME).
pub const NAME: &str = "lazy-pages.socket";
/// CRIU's last word on the socket (LAZY_PAGES_RESTORE_FINISHED).
pub const RESTORE_FINISHED: u32 = 0x5253_5446;

/// A task's userfaultfd as CRIU sent it.
#[derive(Debug)]
pub struct TaskUffd {
    /// The task's pid in the image.
    pub pid: u64,
    pub uffd: OwnedFd,
}

/// Binds `<dir>/lazy-pages.socket`; call before starting `criu restore`, which
/// connects once and does not retry.
pub fn bind(dir: &Path) -> std::io::Result<UnixListener> {
    let l = UnixListener::bind(dir.join(NAME))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Waits (until `deadline`, or while `go_on` says so) for CRIU's connection.
pub fn accept(
    listener: &UnixListener,
    deadline: Instant,
    go_on: impl Fn() -> bool,
) -> std::io::Result<UnixStream> {
    while Instant::now() < deadline && go_on() {
        match listener.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false)?;
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "criu restore never connected to the lazy-pages socket",
    ))
}

/// Reads the `tasks` pids of the pstree and the userfaultfds of the live ones
/// (zombies send a negative pid and no descriptor), for as long as `go_on` says so:
/// CRIU sends them only after it has restored the eager memory, which may take long.
pub fn take_uffds(
    conn: &mut UnixStream,
    tasks: usize,
    go_on: impl Fn() -> bool,
) -> std::io::Result<Vec<TaskUffd>> {
    conn.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut out = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let pid = i32::from_ne_bytes(read_word(conn, &go_on)?);
        if pid <= 0 {
            continue;
        }
        let uffd = retry(&go_on, || recv_criu_fd(conn.as_raw_fd()))?;
        out.push(TaskUffd {
            pid: pid as u64,
            uffd,
        });
    }
    Ok(out)
}

/// Reads CRIU's next word once the socket is readable: `Ok(())` for "restore
/// finished"; an error if it said anything else or hung up (its restore failed).
pub fn restore_finished(conn: &mut UnixStream, go_on: impl Fn() -> bool) -> std::io::Result<()> {
    let word = u32::from_ne_bytes(read_word(conn, &go_on)?);
    if word == RESTORE_FINISHED {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("criu sent {word:#x} where \"restore finished\" belongs"),
    ))
}

/// Four bytes, read across timeouts while `go_on` says so.
fn read_word(conn: &mut UnixStream, go_on: &impl Fn() -> bool) -> std::io::Result<[u8; 4]> {
    let mut word = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match retry(go_on, || conn.read(&mut word[got..]))? {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "criu restore closed the lazy-pages socket",
                ))
            }
            n => got += n,
        }
    }
    Ok(word)
}

/// `op` again while it times out and `go_on` says so.
fn retry<T>(
    go_on: &impl Fn() -> bool,
    mut op: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    loop {
        match op() {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) && go_on() => {}
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pids_and_descriptors_arrive_in_criu_order_and_zombies_send_none() {
        let dir = tempfile::tempdir().unwrap();
        let l = bind(dir.path()).unwrap();
        let mut criu = UnixStream::connect(dir.path().join(NAME)).unwrap();
        let mut conn = accept(&l, Instant::now() + Duration::from_secs(5), || true).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        // Task 10 with a descriptor, a zombie (-11), task 12 with a descriptor.
        for pid in [10i32, -11, 12] {
            criu.write_all(&pid.to_ne_bytes()).unwrap();
            if pid > 0 {
                let fds = [a.as_raw_fd()];
                let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                let iov = [std::io::IoSlice::new(&[0u8])];
                nix::sys::socket::sendmsg::<()>(
                    criu.as_raw_fd(),
                    &iov,
                    &cmsg,
                    nix::sys::socket::MsgFlags::empty(),
                    None,
                )
                .unwrap();
            }
        }
        let got = take_uffds(&mut conn, 3, || true).unwrap();
        assert_eq!(got.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![10, 12]);
        criu.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        restore_finished(&mut conn, || true).unwrap();
        criu.write_all(&7u32.to_ne_bytes()).unwrap();
        assert!(
            restore_finished(&mut conn, || true).is_err(),
            "another word"
        );
        drop(criu);
        assert!(
            restore_finished(&mut conn, || true).is_err(),
            "a hang-up is not a finished restore"
        );
        // A CRIU that says nothing: the wait ends when told to, not never.
        let (mut silent, _criu) = UnixStream::pair().unwrap();
        let t = Instant::now();
        assert!(take_uffds(&mut silent, 1, || false).is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
