//! The process the end-to-end tests checkpoint: holds a seeded pattern of memory and
//! a counter, and reports both through files it opens and closes each time (so it
//! holds no file CRIU would have to reopen).
//!
//! `snapreg-testproc hold --out DIR --mib N --seed S [--pad-mib P] [--zero-mib Z] [--pattern-mib T] [--holes-kib K] [--huge-mib H] [--cycle-files]`
//!   DIR/state   "<counter> <pid>", rewritten every 20 ms (write + rename)
//!   DIR/verify  written on SIGUSR1: "ok <counter>" when the pattern is intact, "bad <page>"
//!   DIR/cycle/N.tmp  with --cycle-files: a new file every 20 ms, open for writing
//!               18 ms, then closed and removed (a thread of its own)
//! The pad (P MiB, pid-derived content) goes in before the pattern, so two runs hold
//! the same data at different addresses and page-file offsets. Z MiB of touched
//! zero pages stand in for a pre-allocated KV cache; H MiB of hugetlb memory is what
//! a checkpoint must refuse. With K, every other K KiB of the N MiB is zeros: the
//! zero runs cut it into pieces smaller than a chunk, as in a GPU worker's image.
//!
//! `snapreg-testproc log --out DIR --log FILE [--scratch FILE]`: a worker that logs to a
//! file it keeps open (O_APPEND), one line `tick <counter> <pid>` every 20 ms, and
//! keeps its counter in a scratch file it holds open read-write (4 KiB, counter at
//! offset 0); DIR/state as in `hold`.
//!
//! `snapreg-testproc churn --out DIR --mib N --seed S`: `hold`'s pattern (N MiB) and
//! counter, and an 8 MiB scratch region (seed S + 1) it keeps changing, as a process
//! whose memory is still coming back (a lazy restore) may: every 20 ms it drops 256 KiB
//! of the scratch (`MADV_DONTNEED`: must read zeros, then is written again), moves the
//! scratch elsewhere (`mremap`: must hold its bytes), and forks a child that checks a
//! page of every 64 of the pattern and all of the scratch. DIR/verify on SIGUSR1 as
//! `hold`'s, "bad <what>" if any round ever failed. SIGUSR2 stops the churn after the
//! round under way (DIR/quiet appears: no child is alive, so a checkpoint has one
//! task); it starts again once a tick comes 300 ms late (the process was frozen and
//! restored).
//!
//! `snapreg-testproc serve --out DIR`: a TCP server on 127.0.0.1 (port in DIR/port)
//! that answers each line with `<n> <line>`, n counting requests since it started.
//!
//! `snapreg-testproc weights --socket S --out DIR --name W --mib N --state-mib M --seed S`:
//! a worker of the weights service. Attaches W (or creates it and fills N MiB from the
//! seed), holds M MiB of its own state and a counter, and writes
//!   DIR/state   "<counter> <pid>" every 20 ms
//!   DIR/result  "<weights address> <result over weights and state> <counter>"
//! When DIR/quiesce appears it quiesces (unmaps, releases; writes DIR/quiesced), waits
//! for SIGUSR2, re-attaches at the same address and writes DIR/result again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static VERIFY: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    VERIFY.store(true, Ordering::SeqCst);
}

fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1; // distinct seeds, distinct streams
    for word in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
}

/// Zeros every other `kib` KiB of `buf` (0: none): memory that zero runs cut into
/// many small pieces, as a GPU worker's device memory is.
fn punch_holes(buf: &mut [u8], kib: usize) {
    if kib > 0 {
        buf.chunks_mut(kib << 10)
            .skip(1)
            .step_by(2)
            .for_each(|hole| hole.fill(0));
    }
}

fn first_bad_page(seed: u64, holes_kib: usize, buf: &[u8]) -> Option<usize> {
    let mut expect = vec![0u8; buf.len()];
    fill(seed, &mut expect);
    punch_holes(&mut expect, holes_kib);
    buf.chunks(4096)
        .zip(expect.chunks(4096))
        .position(|(a, b)| a != b)
}

fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn close_inherited_fds() {
    // Whatever the test harness leaked (pipes to cargo) must not end up in the image.
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: the fds were listed from /proc/self/fd and nothing here uses them after.
            unsafe { libc::close(fd) };
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn serve(out: &std::path::Path) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    write_atomic(
        &out.join("port"),
        &listener.local_addr().unwrap().port().to_string(),
    );
    let mut served: u64 = 0;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut writer = conn;
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            served += 1;
            let _ = writer.write_all(format!("{served} {line}").as_bytes());
            line.clear();
        }
    }
}

/// `hold --cycle-files`: every 20 ms a new file `cycle/N.tmp`, held open for writing
/// 18 ms, then closed and removed. Whenever a checkpoint lists the files its tree
/// holds open, the one open then is gone by a freeze 20 ms later.
fn cycle_files(dir: &std::path::Path) {
    use std::io::Write;
    std::fs::create_dir_all(dir).expect("create the cycle directory");
    for n in 0..u64::MAX {
        let path = dir.join(format!("{n}.tmp"));
        if let Ok(mut f) = std::fs::File::create(&path) {
            let _ = writeln!(f, "{n}");
            std::thread::sleep(Duration::from_millis(18));
            drop(f);
            let _ = std::fs::remove_file(&path);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `log` mode: appends to a log it holds open, keeps a scratch file open too.
fn log_worker(args: &[String]) {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let out = std::path::PathBuf::from(arg(args, "--out").expect("--out"));
    let log_path = arg(args, "--log").expect("--log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open the log");
    let scratch = arg(args, "--scratch").map(|p| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(p)
            .expect("open the scratch file");
        f.set_len(4096).expect("size the scratch file");
        f
    });
    let mut counter: u64 = 0;
    loop {
        counter += 1;
        let pid = std::process::id();
        log.write_all(format!("tick {counter} {pid}\n").as_bytes())
            .expect("append to the log");
        if let Some(f) = &scratch {
            f.write_all_at(format!("{counter:>20}\n").as_bytes(), 0)
                .expect("write the scratch file");
        }
        write_atomic(&out.join("state"), &format!("{counter} {pid}\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str);
    if !matches!(mode, Some("hold" | "churn" | "serve" | "weights" | "log")) {
        eprintln!("usage: snapreg-testproc hold --out DIR --mib N --seed S [--pad-mib P] [--zero-mib Z] [--holes-kib K] [--huge-mib H] | churn --out DIR --mib N --seed S | serve --out DIR | weights --socket S --out DIR --name W --mib N --state-mib M --seed S | log --out DIR --log FILE [--scratch FILE]");
        std::process::exit(2);
    }
    close_inherited_fds();
    if mode == Some("churn") {
        churn::run(&args);
        return;
    }
    if mode == Some("log") {
        log_worker(&args);
        return;
    }
    if mode == Some("serve") {
        serve(std::path::Path::new(&arg(&args, "--out").expect("--out")));
        return;
    }
    if mode == Some("weights") {
        weights_worker(&args);
        return;
    }
    let out = std::path::PathBuf::from(arg(&args, "--out").expect("--out"));
    let mib: usize = arg(&args, "--mib").map_or(16, |v| v.parse().unwrap());
    let seed: u64 = arg(&args, "--seed").map_or(1, |v| v.parse().unwrap());
    let pad_mib: usize = arg(&args, "--pad-mib").map_or(0, |v| v.parse().unwrap());
    let zero_mib: usize = arg(&args, "--zero-mib").map_or(0, |v| v.parse().unwrap());
    let holes_kib: usize = arg(&args, "--holes-kib").map_or(0, |v| v.parse().unwrap());
    // Compressible, repeated text: heap metadata, strings, code.
    let pattern_mib: usize = arg(&args, "--pattern-mib").map_or(0, |v| v.parse().unwrap());
    let pattern: Vec<u8> = b"model.layers.17.mlp.down_proj.weight fp16[8192,8192] "
        .iter()
        .copied()
        .cycle()
        .take(pattern_mib << 20)
        .collect();
    let huge_mib: usize = arg(&args, "--huge-mib").map_or(0, |v| v.parse().unwrap());
    if huge_mib > 0 {
        let len = huge_mib << 20;
        // SAFETY: an anonymous mapping at an address the kernel picks touches no memory of ours.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            eprintln!("MAP_HUGETLB failed: reserve huge pages in /proc/sys/vm/nr_hugepages");
            std::process::exit(3);
        }
        // SAFETY: `p` is a fresh writable mapping of `len` bytes (checked against MAP_FAILED).
        unsafe { std::ptr::write_bytes(p as *mut u8, 7, len) };
    }

    let mut pad = vec![0u8; pad_mib << 20];
    fill(std::process::id() as u64, &mut pad);
    let mut data = vec![0u8; mib << 20];
    fill(seed, &mut data);
    punch_holes(&mut data, holes_kib);
    // Touched zero pages: resident, so CRIU dumps them as pages of zeros.
    let mut zeros = vec![1u8; zero_mib << 20];
    zeros.iter_mut().for_each(|b| *b = 0);

    if args.iter().any(|a| a == "--cycle-files") {
        let dir = out.join("cycle");
        std::thread::spawn(move || cycle_files(&dir));
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
    let mut counter: u64 = 0;
    loop {
        counter += 1;
        write_atomic(
            &out.join("state"),
            &format!("{counter} {}\n", std::process::id()),
        );
        if VERIFY.swap(false, Ordering::SeqCst) {
            let verdict = match first_bad_page(seed, holes_kib, &data) {
                None if zeros.iter().all(|&b| b == 0) && pad.len() == pad_mib << 20 => {
                    format!("ok {counter}\n")
                }
                None => "bad zeros\n".to_string(),
                Some(p) => format!("bad {p}\n"),
            };
            write_atomic(&out.join("verify"), &verdict);
        }
        std::hint::black_box(&pad);
        std::hint::black_box(&pattern);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A result that depends on every weight byte and on the worker's own state.
fn compute(weights: &[u8], state: &[u8]) -> u64 {
    let s: Vec<u64> = state
        .chunks_exact(8)
        .take(4096)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()) | 1)
        .collect();
    weights
        .chunks_exact(8)
        .enumerate()
        .fold(0u64, |acc, (i, w)| {
            acc.rotate_left(5).wrapping_add(
                u64::from_le_bytes(w.try_into().unwrap()).wrapping_mul(s[i % s.len()]),
            )
        })
}

fn weights_worker(args: &[String]) {
    use snapreg_weights::client::{block_signal, wait_for_signal};
    use snapreg_weights::WeightsClient;
    let out = std::path::PathBuf::from(arg(args, "--out").expect("--out"));
    let socket = arg(args, "--socket").expect("--socket");
    let name = arg(args, "--name").unwrap_or_else(|| "model/weights".into());
    let mib: u64 = arg(args, "--mib").map_or(64, |v| v.parse().unwrap());
    let state_mib: usize = arg(args, "--state-mib").map_or(16, |v| v.parse().unwrap());
    let seed: u64 = arg(args, "--seed").map_or(1, |v| v.parse().unwrap());
    block_signal(libc::SIGUSR2);
    let client = WeightsClient::new(&socket);
    let mut weights = match client.attach(&name, Duration::ZERO) {
        Ok(w) => w,
        Err(_) => {
            // The loader's path: create, fill from "the checkpoint file", seal.
            let w = client.create(&name, mib << 20).expect("create weights");
            let mut bytes = vec![0u8; (mib << 20) as usize];
            fill(seed, &mut bytes);
            w.mapping().write_at(0, &bytes).expect("fill weights");
            client.seal(&name, None).expect("seal weights");
            w
        }
    };
    let mut state = vec![0u8; state_mib << 20];
    fill(seed ^ 0x5eed, &mut state);
    let mut counter: u64 = 0;
    let report = |w: &snapreg_weights::Attached, state: &[u8], counter: u64| {
        let r = compute(w.host_slice().expect("memfd weights"), state);
        write_atomic(
            &out.join("result"),
            &format!("{:#x} {r:016x} {counter}\n", w.addr()),
        );
    };
    report(&weights, &state, counter);
    loop {
        counter += 1;
        write_atomic(
            &out.join("state"),
            &format!("{counter} {}\n", std::process::id()),
        );
        if std::fs::remove_file(out.join("quiesce")).is_ok() {
            client
                .quiesce(&mut [&mut weights], libc::SIGUSR2)
                .expect("quiesce");
            write_atomic(&out.join("quiesced"), &format!("{counter}\n"));
            wait_for_signal(libc::SIGUSR2);
            client
                .resume(&mut [&mut weights], Duration::from_secs(120))
                .expect("resume");
            report(&weights, &state, counter);
            write_atomic(&out.join("resumed"), &format!("{counter}\n"));
        }
        std::hint::black_box(&state);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `churn` mode: memory that forks, drops and moves while it is checked.
mod churn {
    use super::*;

    static QUIET: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_usr2(_: libc::c_int) {
        QUIET.store(true, Ordering::SeqCst);
    }

    const SCRATCH: usize = 8 << 20;
    const DROP: usize = 256 << 10;

    /// A private anonymous mapping of `len` bytes: writable, or (`prot` 0) a place
    /// held for the next move, so that no allocation lands there. At `at` if given.
    fn map(len: usize, prot: i32, at: Option<*mut u8>) -> *mut u8 {
        let fixed = at.map_or(0, |_| libc::MAP_FIXED);
        // SAFETY: anonymous memory at an address the kernel picks, or at `at`, which
        // only ever holds our own scratch place.
        let p = unsafe {
            libc::mmap(
                at.unwrap_or(std::ptr::null_mut()).cast(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        p.cast()
    }

    /// One round; `Err` names what was wrong.
    fn round(
        data: &[u8],
        samples: &[u8],
        expect: &[u8],
        scratch: &mut *mut u8,
        other: &mut *mut u8,
        n: usize,
    ) -> Result<(), String> {
        // Drop 256 KiB: zeros, then the pattern again.
        let at = (n * DROP) % SCRATCH;
        // SAFETY: [at, at + DROP) lies inside the scratch mapping.
        unsafe {
            libc::madvise(scratch.add(at).cast(), DROP, libc::MADV_DONTNEED);
            let s = std::slice::from_raw_parts_mut(*scratch, SCRATCH);
            if s[at..at + DROP].iter().any(|&b| b != 0) {
                return Err(format!("dropped bytes at {at} came back"));
            }
            s[at..at + DROP].copy_from_slice(&expect[at..at + DROP]);
        }
        // Move it onto the held place, and hold the one it leaves.
        // SAFETY: moves our own mapping onto our own held place.
        let moved = unsafe {
            libc::mremap(
                (*scratch).cast(),
                SCRATCH,
                SCRATCH,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                (*other).cast::<libc::c_void>(),
            )
        };
        assert_ne!(moved, libc::MAP_FAILED, "mremap");
        map(SCRATCH, libc::PROT_NONE, Some(*scratch));
        std::mem::swap(scratch, other);
        // SAFETY: the scratch mapping now lives at `*scratch`.
        let s = unsafe { std::slice::from_raw_parts(*scratch, SCRATCH) };
        if s != expect {
            return Err("moved bytes differ".into());
        }
        // A child checks what it inherited.
        // SAFETY: the child only reads memory and calls _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: `*scratch` maps SCRATCH bytes (this process's own mapping).
            let s = unsafe { std::slice::from_raw_parts(*scratch, SCRATCH) };
            let data_ok = (0..data.len() / 4096)
                .step_by(64)
                .zip(samples.chunks(4096))
                .all(|(i, page)| data[i * 4096..(i + 1) * 4096] == *page);
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(i32::from(!data_ok) + 2 * i32::from(s != expect)) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        unsafe { libc::waitpid(child, &mut status, 0) };
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            return Err(format!("fork (child status {status:#x})"));
        }
        Ok(())
    }

    pub fn run(args: &[String]) {
        let out = std::path::PathBuf::from(arg(args, "--out").expect("--out"));
        let mib: usize = arg(args, "--mib").map_or(16, |v| v.parse().unwrap());
        let seed: u64 = arg(args, "--seed").map_or(1, |v| v.parse().unwrap());
        // The scratch first: mappings grow down, so it lies above the pattern.
        let mut scratch = map(SCRATCH, libc::PROT_READ | libc::PROT_WRITE, None);
        let mut expect = vec![0u8; SCRATCH];
        fill(seed + 1, &mut expect);
        // SAFETY: a fresh mapping of SCRATCH bytes.
        unsafe { std::slice::from_raw_parts_mut(scratch, SCRATCH) }.copy_from_slice(&expect);
        let mut other = map(SCRATCH, libc::PROT_NONE, None);
        let mut data = vec![0u8; mib << 20];
        fill(seed, &mut data);
        // A page of every 64, kept apart: what a forked child compares against.
        let samples: Vec<u8> = data.chunks(4096).step_by(64).flatten().copied().collect();
        // SAFETY: the handlers only store to atomics, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
            libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t);
        }
        let (mut counter, mut failed) = (0u64, None::<String>);
        let mut last = std::time::Instant::now();
        loop {
            counter += 1;
            write_atomic(
                &out.join("state"),
                &format!("{counter} {}\n", std::process::id()),
            );
            let mut quiet = QUIET.load(Ordering::SeqCst);
            if quiet && last.elapsed() > Duration::from_millis(300) {
                // Restored: churn at once, while pages are still missing.
                QUIET.store(false, Ordering::SeqCst);
                quiet = false;
            } else if quiet {
                write_atomic(&out.join("quiet"), "");
            }
            last = std::time::Instant::now();
            if failed.is_none() && !quiet {
                failed = round(
                    &data,
                    &samples,
                    &expect,
                    &mut scratch,
                    &mut other,
                    counter as usize,
                )
                .err();
            }
            if VERIFY.swap(false, Ordering::SeqCst) {
                let verdict = match (&failed, first_bad_page(seed, 0, &data)) {
                    (Some(what), _) => format!("bad {what}\n"),
                    (None, Some(p)) => format!("bad {p}\n"),
                    (None, None) => format!("ok {counter}\n"),
                };
                write_atomic(&out.join("verify"), &verdict);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
