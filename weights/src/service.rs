//! `snapctl weights serve`: owns the buffers, hands out descriptors, keeps the leases.
//!
//! A thread per connection (each connection is one short exchange; an attach may wait
//! for a buffer being filled). State is one mutex: a handful of buffers and leases.
//! Leases are keyed by the peer's PID from SO_PEERCRED, never by what a client claims;
//! a lease whose process is gone is dropped the next time anyone looks.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};

use crate::backend::{Allocation, BackendKind};
use crate::protocol::{recv_line, send_line, BufferInfo, Quiesced, Reply, Request};
use crate::{check_name, Error, Result};

#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub socket: PathBuf,
    pub backend: BackendKind,
    /// CUDA device ordinal the buffers live on.
    pub device: i32,
}

struct Buffer {
    alloc: Allocation,
    size: u64,
    sealed: bool,
    leases: BTreeSet<u32>,
    content: Option<serde_json::Value>,
}

#[derive(Default)]
struct State {
    buffers: BTreeMap<String, Buffer>,
    quiesced: BTreeMap<u32, Quiesced>,
}

pub struct Service {
    cfg: ServiceConfig,
    state: Mutex<State>,
    sealed: Condvar,
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Service {
    /// Checks the backend can allocate here (a CUDA service on a host without a
    /// driver fails now, not at the first request).
    pub fn new(cfg: ServiceConfig) -> Result<Arc<Self>> {
        if cfg.backend == BackendKind::Cuda {
            Allocation::new(cfg.backend, cfg.device, "probe", 1)?;
        }
        Ok(Arc::new(Service {
            cfg,
            state: Mutex::default(),
            sealed: Condvar::new(),
        }))
    }

    /// Binds the socket, replacing a stale one (a socket file nobody answers on).
    pub fn bind(&self) -> Result<UnixListener> {
        let path = &self.cfg.socket;
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Invalid(format!(
                    "a weights service already answers on {}",
                    path.display()
                )));
            }
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        UnixListener::bind(path).map_err(|e| Error::io(format!("binding {}", path.display()), e))
    }

    /// Serves until the listener fails.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) -> Result<()> {
        loop {
            let (stream, _) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("accepting a weights client", e)),
            };
            let me = self.clone();
            std::thread::spawn(move || me.handle(stream));
        }
    }

    fn handle(&self, mut stream: UnixStream) {
        let pid = match getsockopt(&stream, sockopt::PeerCredentials) {
            Ok(c) => c.pid() as u32,
            Err(e) => {
                tracing::warn!("no peer credentials on a weights connection: {e}");
                return;
            }
        };
        let reply = match recv_line(&mut stream) {
            Ok((line, _)) => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => self.answer(pid, req),
                Err(e) => Err(Error::Protocol(format!("bad request: {e}"))),
            },
            Err(e) => Err(Error::io("reading a request", e)),
        };
        let sent = match reply {
            Ok((reply, fd)) => send_line(&mut stream, &reply, fd.as_ref().map(|f| f.as_raw_fd())),
            Err(e) => send_line(&mut stream, &Reply::error(e.to_string()), None),
        };
        if let Err(e) = sent {
            tracing::debug!(pid, "weights client went away: {e}");
        }
    }

    fn info(name: &str, b: &Buffer) -> BufferInfo {
        BufferInfo {
            name: name.to_string(),
            size: b.size,
            alloc_size: b.alloc.alloc_size(),
            sealed: b.sealed,
            leases: b.leases.iter().copied().collect(),
            content: b.content.clone(),
        }
    }

    fn reply(&self, buffer: Option<BufferInfo>) -> Reply {
        Reply {
            ok: true,
            backend: Some(self.cfg.backend),
            device: (self.cfg.backend == BackendKind::Cuda).then_some(self.cfg.device),
            buffer,
            ..Reply::default()
        }
    }

    fn answer(&self, pid: u32, req: Request) -> Result<(Reply, Option<std::os::fd::OwnedFd>)> {
        let mut st = self.state.lock().unwrap();
        for b in st.buffers.values_mut() {
            b.leases.retain(|p| alive(*p));
        }
        match req {
            Request::Create {
                name,
                size,
                replace,
                lease,
            } => {
                check_name(&name)?;
                if size == 0 {
                    return Err(Error::Invalid(format!("buffer {name}: size 0")));
                }
                if let Some(old) = st.buffers.get(&name) {
                    if !replace {
                        return Err(Error::Invalid(format!(
                            "buffer {name} exists: attach it, or create with replace"
                        )));
                    }
                    if !old.leases.is_empty() {
                        return Err(Error::Invalid(format!(
                            "buffer {name} is mapped by PID(s) {:?}: they must release it first",
                            old.leases
                        )));
                    }
                    st.buffers.remove(&name);
                }
                let alloc = Allocation::new(self.cfg.backend, self.cfg.device, &name, size)?;
                let fd = alloc.export(true)?;
                let mut b = Buffer {
                    alloc,
                    size,
                    sealed: false,
                    leases: BTreeSet::new(),
                    content: None,
                };
                if lease {
                    b.leases.insert(pid);
                }
                let info = Self::info(&name, &b);
                st.buffers.insert(name.clone(), b);
                tracing::info!(name, size, pid, "buffer created");
                Ok((self.reply(Some(info)), Some(fd)))
            }
            Request::Attach {
                name,
                lease,
                writable,
                wait_ms,
            } => {
                let deadline = Instant::now() + Duration::from_millis(wait_ms);
                loop {
                    if let Some(b) = st.buffers.get(&name) {
                        if b.sealed {
                            break;
                        }
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Invalid(match st.buffers.get(&name) {
                            Some(_) => format!("buffer {name} is still being filled"),
                            None => format!("no buffer named {name}"),
                        }));
                    }
                    st = self.sealed.wait_timeout(st, left).unwrap().0;
                }
                let b = st.buffers.get_mut(&name).expect("checked above");
                let fd = b.alloc.export(writable)?;
                if lease {
                    b.leases.insert(pid);
                }
                let info = Self::info(&name, b);
                if lease {
                    st.quiesced.remove(&pid);
                }
                Ok((self.reply(Some(info)), Some(fd)))
            }
            Request::Seal { name, content } => {
                let b = st
                    .buffers
                    .get_mut(&name)
                    .ok_or_else(|| Error::Invalid(format!("no buffer named {name}")))?;
                b.sealed = true;
                b.content = content;
                let info = Self::info(&name, b);
                self.sealed.notify_all();
                Ok((self.reply(Some(info)), None))
            }
            Request::Release {
                names,
                resume_signal,
            } => {
                let mut released = Vec::new();
                for (name, b) in st.buffers.iter_mut() {
                    if (names.is_empty() || names.contains(name)) && b.leases.remove(&pid) {
                        released.push(name.clone());
                    }
                }
                if let Some(signal) = resume_signal {
                    let entry = st.quiesced.entry(pid).or_insert(Quiesced {
                        pid,
                        signal,
                        names: Vec::new(),
                    });
                    entry.signal = signal;
                    entry.names.extend(released);
                    entry.names.sort();
                    entry.names.dedup();
                }
                Ok((self.reply(None), None))
            }
            Request::List => {
                let mut r = self.reply(None);
                r.buffers = st.buffers.iter().map(|(n, b)| Self::info(n, b)).collect();
                r.quiesced = st.quiesced.values().cloned().collect();
                Ok((r, None))
            }
            Request::Drop { name } => {
                match st.buffers.get(&name) {
                    None => return Err(Error::Invalid(format!("no buffer named {name}"))),
                    Some(b) if !b.leases.is_empty() => {
                        return Err(Error::Invalid(format!(
                            "buffer {name} is mapped by PID(s) {:?}",
                            b.leases
                        )))
                    }
                    Some(_) => {}
                }
                st.buffers.remove(&name);
                Ok((self.reply(None), None))
            }
        }
    }
}
