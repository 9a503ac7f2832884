//! The client side: what a worker links to use weights from the service, and what
//! snapctl uses to read and fill buffers around a checkpoint.
//!
//! A worker's life with the service:
//!
//! ```text
//! let w = WeightsClient::new(socket);
//! let mut buf = w.attach("llama/layers", wait)?;     // or create + fill + seal
//! ... compute on buf.host_slice() / buf.addr() ...
//! w.quiesce(&mut [&mut buf], libc::SIGUSR2)?;        // before snapctl checkpoint
//! wait_for_signal(libc::SIGUSR2);                    // sent by pull-restore
//! w.resume(&mut [&mut buf], wait)?;                  // same address as before
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::{open_mapping, BackendKind, Mapping};
use crate::protocol::{call, BufferInfo, Reply, Request};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct WeightsClient {
    socket: PathBuf,
}

/// A buffer mapped into this process.
pub struct Attached {
    pub info: BufferInfo,
    pub backend: BackendKind,
    mapping: Mapping,
}

impl Attached {
    /// First byte: a host pointer (memfd) or a device pointer (CUDA). Stable across
    /// quiesce and resume.
    pub fn addr(&self) -> u64 {
        self.mapping.addr()
    }

    /// The buffer's size as created (the mapping may be larger, by the backend's
    /// allocation granularity).
    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The bytes, for memfd buffers (`None` on CUDA, or while quiesced).
    pub fn host_slice(&self) -> Option<&[u8]> {
        self.mapping
            .host_slice()
            .map(|s| &s[..self.info.size as usize])
    }
}

impl WeightsClient {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        WeightsClient {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn list(&self) -> Result<Reply> {
        Ok(call(&self.socket, &Request::List)?.0)
    }

    fn mapped(&self, req: &Request, writable: bool) -> Result<(BufferInfo, BackendKind, Mapping)> {
        let (reply, fd) = call(&self.socket, req)?;
        let info = reply
            .buffer
            .ok_or_else(|| Error::Protocol("reply without a buffer".into()))?;
        let backend = reply
            .backend
            .ok_or_else(|| Error::Protocol("reply without a backend".into()))?;
        let fd = fd.ok_or_else(|| Error::Protocol("reply without a descriptor".into()))?;
        let mapping = open_mapping(
            backend,
            reply.device.unwrap_or(0),
            fd,
            info.alloc_size,
            writable,
        )?;
        Ok((info, backend, mapping))
    }

    /// A new buffer, mapped writable and leased to this process; seal it once filled.
    pub fn create(&self, name: &str, size: u64) -> Result<Attached> {
        crate::check_name(name)?;
        let (info, backend, mapping) = self.mapped(
            &Request::Create {
                name: name.into(),
                size,
                replace: false,
                lease: true,
            },
            true,
        )?;
        Ok(Attached {
            info,
            backend,
            mapping,
        })
    }

    /// An existing buffer, mapped read-only and leased to this process; waits up to
    /// `wait` for it to be sealed.
    pub fn attach(&self, name: &str, wait: Duration) -> Result<Attached> {
        let (info, backend, mapping) = self.mapped(
            &Request::Attach {
                name: name.into(),
                lease: true,
                writable: false,
                wait_ms: wait.as_millis() as u64,
            },
            false,
        )?;
        Ok(Attached {
            info,
            backend,
            mapping,
        })
    }

    pub fn seal(&self, name: &str, content: Option<serde_json::Value>) -> Result<BufferInfo> {
        call(
            &self.socket,
            &Request::Seal {
                name: name.into(),
                content,
            },
        )?
        .0
        .buffer
        .ok_or_else(|| Error::Protocol("reply without a buffer".into()))
    }

    /// Before a checkpoint: unmaps each buffer (keeping its address range) and
    /// releases this process's leases. `resume_signal` is what a restore sends once
    /// the weights are back.
    pub fn quiesce(&self, buffers: &mut [&mut Attached], resume_signal: i32) -> Result<()> {
        for b in buffers.iter_mut() {
            b.mapping.unmap()?;
        }
        call(
            &self.socket,
            &Request::Release {
                names: buffers.iter().map(|b| b.info.name.clone()).collect(),
                resume_signal: Some(resume_signal),
            },
        )?;
        Ok(())
    }

    /// After a restore: maps each buffer again at the address it had (waiting up to
    /// `wait` for the restore to finish filling it).
    pub fn resume(&self, buffers: &mut [&mut Attached], wait: Duration) -> Result<()> {
        for b in buffers.iter_mut() {
            let (reply, fd) = call(
                &self.socket,
                &Request::Attach {
                    name: b.info.name.clone(),
                    lease: true,
                    writable: b.mapping.is_writable(),
                    wait_ms: wait.as_millis() as u64,
                },
            )?;
            let info = reply
                .buffer
                .ok_or_else(|| Error::Protocol("reply without a buffer".into()))?;
            if info.alloc_size != b.mapping.len() {
                return Err(Error::Invalid(format!(
                    "buffer {} came back with {} bytes, not the {} this process reserved",
                    info.name,
                    info.alloc_size,
                    b.mapping.len()
                )));
            }
            let fd = fd.ok_or_else(|| Error::Protocol("reply without a descriptor".into()))?;
            b.mapping.map(fd)?;
            b.info = info;
        }
        Ok(())
    }

    /// For snapctl: a buffer mapped read-only without a lease (the reader is not the
    /// process being checkpointed).
    pub fn read_buffer(&self, name: &str) -> Result<(BufferInfo, Mapping)> {
        let (info, _, m) = self.mapped(
            &Request::Attach {
                name: name.into(),
                lease: false,
                writable: false,
                wait_ms: 0,
            },
            false,
        )?;
        Ok((info, m))
    }

    /// For snapctl: a fresh buffer (replacing an unused one of that name) mapped
    /// writable without a lease, to fill from the registry.
    pub fn fill_buffer(&self, name: &str, size: u64) -> Result<(BufferInfo, BackendKind, Mapping)> {
        self.mapped(
            &Request::Create {
                name: name.into(),
                size,
                replace: true,
                lease: false,
            },
            true,
        )
    }
}

/// Blocks `signal` in the calling thread (call it before starting other threads, so
/// they inherit the mask) so that [`wait_for_signal`] receives it.
pub fn block_signal(signal: i32) {
    // SAFETY: plain signal-mask manipulation.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits until `signal` (blocked with [`block_signal`]) arrives.
pub fn wait_for_signal(signal: i32) {
    // SAFETY: as above; sigtimedwait with a timeout so a CRIU freeze in between only
    // restarts the wait.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        while libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) != signal {}
    }
}
