//! `snapreg-bench checkpoint [--gib G] [--reps R]`: how long a checkpoint keeps the
//! process frozen (CRIU's own `frozen_time`, from `stats-dump`) and how long until the
//! snapshot is committed, by route, interleaved, a fresh process each time:
//!
//! 0. `criu dump` into a directory on local disk (the baseline: no registry);
//! 1. `snapctl checkpoint --spool off`: streamed, frozen until the registry has it all;
//! 2. `snapctl checkpoint --spool auto`: dumped into /dev/shm, pushed after release;
//! 3. `snapctl checkpoint --spool DIR` with DIR on local disk;
//! 4. `snapctl checkpoint --spool auto --spool-huge-pages`: into the tmpfs of huge
//!    pages snapctl mounts at /dev/shm/snapctl-spool-huge.
//!
//! Every snapshot of the first rep is restored (`pull-restore`) and the process checks
//! its whole memory, so a route that commits a broken snapshot fails the bench.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{
    counter, criu_path, drop_caches, hold_process, median, save_run, scratch, snapctl,
    verify_restored, wait_gone, Registry, Shape,
};

const ROUTES: [&str; 5] = [
    "criu dump to local disk (no registry)",
    "snapctl checkpoint, streamed (--spool off)",
    "snapctl checkpoint --spool auto (into /dev/shm, pushed after release)",
    "snapctl checkpoint --spool DIR on local disk",
    "snapctl checkpoint --spool auto --spool-huge-pages (a tmpfs of huge pages)",
];

pub fn run(gib: f64, reps: usize) -> Result<()> {
    let work = scratch("snapreg-bench-ck-")?;
    let w = work.path();
    let reg = Registry::start(&w.join("registry"))?;
    // Per route: frozen ms, seconds to the end (committed, for snapctl).
    let mut frozen: Vec<Vec<f64>> = vec![Vec::new(); ROUTES.len()];
    let mut total: Vec<Vec<f64>> = vec![Vec::new(); ROUTES.len()];
    for rep in 0..reps {
        for (i, route) in ROUTES.iter().enumerate() {
            let (child, state) = hold_process(w, &format!("ck{i}"), Shape::of(gib))?;
            let mut child = KillOnDrop(child);
            let pid = child.0.id();
            drop_caches();
            let tag = format!("bench/ck:r{rep}-{i}");
            let images = w.join(format!("images-{rep}-{i}"));
            let spool = w.join("spool");
            let t = Instant::now();
            let ms = match i {
                0 => {
                    std::fs::create_dir_all(&images)?;
                    let st = Command::new(criu_path())
                        .args(["dump", "-t", &pid.to_string(), "-D"])
                        .arg(&images)
                        .args(["-o", "dump.log"])
                        .status()?;
                    if !st.success() {
                        bail!("criu dump failed; see {}/dump.log", images.display());
                    }
                    let ms = snapreg_client::criu::read_freeze_ms(&images.join("stats-dump"));
                    ms.context("no stats-dump")?
                }
                _ => {
                    let how = match i {
                        1 => "off".to_string(),
                        2 | 4 => "auto".to_string(),
                        _ => spool.display().to_string(),
                    };
                    let pid_s = pid.to_string();
                    let args = ["checkpoint", "--pid", &pid_s, "--spool", &how, &tag];
                    let huge: &[&str] = if i == 4 { &["--spool-huge-pages"] } else { &[] };
                    let j =
                        snapctl(&reg.url, &[&args[..], huge].concat()).with_context(|| *route)?;
                    let spooled = j["route"]["spooled_to"].is_string();
                    if spooled != (i != 1) {
                        bail!("{route}: took the route {}", j["route"]);
                    }
                    j["freeze_ms"].as_f64().context("no freeze_ms")?
                }
            };
            total[i].push(t.elapsed().as_secs_f64());
            frozen[i].push(ms);
            child.0.wait()?;
            wait_gone(pid);
            if rep == 0 && i != 0 {
                restore_and_verify(&reg.url, &tag, &state, pid, gib).with_context(|| *route)?;
            }
            let _ = std::fs::remove_dir_all(&images);
        }
    }
    let mut report = format!(
        "### Checkpoint of a {gib} GiB process (1/3 random, 1/3 pattern, 1/3 zeros; {reps} reps interleaved; the first rep's snapshots restored and verified)\n\n\
         | route | frozen, median ms | min–max ms | ratio to `criu dump` to disk | until committed, median s |\n|---|---|---|---|---|\n"
    );
    let base = median(&mut frozen[0].clone());
    for (i, route) in ROUTES.iter().enumerate() {
        let mut f = frozen[i].clone();
        let m = median(&mut f);
        report += &format!(
            "| {route} | {m:.0} | {:.0}–{:.0} | {:.2} | {:.2} |\n",
            f[0],
            f[f.len() - 1],
            m / base,
            median(&mut total[i].clone()),
        );
    }
    println!("{report}");
    save_run(
        "checkpoint",
        &serde_json::json!({ "gib": gib, "reps": reps, "routes": ROUTES, "frozen_ms": frozen, "seconds": total }),
    )
}

/// The held process, killed if the bench fails before its checkpoint does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Restores `tag` and has the process check its memory; then kills it again.
fn restore_and_verify(
    url: &str,
    tag: &str,
    state: &std::path::Path,
    pid: u32,
    gib: f64,
) -> Result<()> {
    let before = counter(state).context("no counter")?;
    snapctl(url, &["pull-restore", "--detach", tag])?;
    for _ in 0..1000 {
        if counter(state).is_some_and(|c| c > before) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let verified = verify_restored(state, pid, 30 + 15 * gib.ceil() as u64);
    wait_gone(pid);
    verified
}
