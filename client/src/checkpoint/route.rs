//! Where a dump goes: streamed into the registry while the tasks are frozen, or spooled
//! to a directory first and pushed after CRIU has released them.
//!
//! | `--spool` | route |
//! |---|---|
//! | `off` (default without `--cuda`) | streamed |
//! | `DIR` | spooled to DIR |
//! | `auto` (default with `--cuda`) | spooled to the memory directory (`/dev/shm`) when the tree fits, else streamed |
//!
//! Why `auto` exists: a streamed dump keeps the tasks frozen until every chunk is
//! hashed, compressed and durable in the registry (so a failed push resumes them and
//! loses nothing); a CUDA worker's dump carries its device memory (11 GB for the
//! medium preset) and stays frozen 15 s that way, against under 6 s into memory
//! (bench/RESULTS.md). A spooled dump is pushed after CRIU killed the tasks: if that
//! push fails, the images stay in the spool directory and the error says how to push
//! them, so still nothing is lost.
//!
//! "Fits", decided after the CUDA checkpoint moved device memory into host memory: the
//! tree's resident memory (the sum of `Rss` in each task's `smaps_rollup`, an upper
//! bound of what CRIU writes) must fit the memory directory, `MemAvailable` (the tasks
//! still hold their memory while the dump is written) and the cgroup headroom, with
//! the margin [`crate::memory_dir`] adds.
//!
//! Separated mode (`--weights-service`) always streams: its weights are not in the
//! dump, which is small and fast to stream. A tree holding huge pages cannot stream;
//! `auto` then spools or refuses.

use std::path::PathBuf;
use std::str::FromStr;

use super::CheckpointOptions;
use crate::error::{ClientError, Result};
use crate::memory_dir::{self, Need};
use crate::process;

/// The `--spool` choice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Spool {
    #[default]
    Off,
    Dir(PathBuf),
    Auto,
}

impl FromStr for Spool {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "off" => Spool::Off,
            "auto" => Spool::Auto,
            dir => Spool::Dir(PathBuf::from(dir)),
        })
    }
}

/// Where `auto` spools unless told otherwise.
pub const MEMORY_DIR: &str = memory_dir::MEMORY_DIR;

/// The route a dump took, and why (in the report).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Route {
    /// The directory the images were dumped into; `None` when streamed.
    pub spooled_to: Option<PathBuf>,
    pub reason: String,
}

/// Picks the route for the tree `pids` (after any CUDA checkpoint).
pub(super) fn choose(opts: &CheckpointOptions, pids: &[u32]) -> Result<Route> {
    match &opts.spool {
        Spool::Off => Ok(Route {
            spooled_to: None,
            reason: "streamed (--spool off)".into(),
        }),
        Spool::Dir(dir) => Ok(Route {
            spooled_to: Some(dir.clone()),
            reason: format!("spooled to {} (--spool)", dir.display()),
        }),
        Spool::Auto if opts.weights_service.is_some() => Ok(Route {
            spooled_to: None,
            reason: "streamed (auto: separated mode's dump holds no weights)".into(),
        }),
        Spool::Auto => {
            let tree = resident_bytes(pids);
            let what = format!("the tree's {} resident", memory_dir::gb(tree));
            let need = Need {
                in_dir: tree,
                in_memory: tree,
            };
            let verdict = memory_dir::room(&opts.memory_spool_dir)
                .and_then(|room| memory_dir::fits(&what, need, room));
            match verdict {
                Ok(why) => Ok(Route {
                    spooled_to: Some(opts.memory_spool_dir.join("snapctl-spool")),
                    reason: format!(
                        "spooled to {} (auto: {why})",
                        opts.memory_spool_dir.display()
                    ),
                }),
                Err(why) => {
                    process::refuse_huge_pages(pids).map_err(|e| {
                        ClientError::Usage(format!("{e} (--spool auto could not: {why})"))
                    })?;
                    Ok(Route {
                        spooled_to: None,
                        reason: format!("streamed (auto: {why})"),
                    })
                }
            }
        }
    }
}

/// Sum of `Rss` over the tasks' `smaps_rollup` (shared pages count once per task:
/// an overestimate, which is the safe side).
fn resident_bytes(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|s| memory_dir::kib_field(&s, "Rss:"))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_values_parse() {
        assert_eq!("off".parse::<Spool>().unwrap(), Spool::Off);
        assert_eq!("auto".parse::<Spool>().unwrap(), Spool::Auto);
        assert_eq!(
            "/tmp/x".parse::<Spool>().unwrap(),
            Spool::Dir("/tmp/x".into())
        );
    }

    #[test]
    fn this_process_has_resident_memory() {
        assert!(resident_bytes(&[std::process::id()]) > 0);
    }
}
