//! `snapreg-bench encryption [--mib N] [--reps R]`: what encryption at rest costs.
//!
//! 1. Per core, in memory: the chunk codec (what a plaintext push runs on the chunks
//!    the registry lacks) vs encrypt_chunk (what an encrypted push runs on every
//!    chunk), and decode vs decrypt.
//! 2. Over loopback, interleaved, plaintext vs encrypted on the same memory-image-like
//!    input (bench core's): cold push, the same image pushed again, pull; each
//!    registry fresh per rep, page cache dropped before each step. Correctness: pulls
//!    byte-identical, re-pushes send nothing, and the encrypted registry's data dir
//!    holds none of the input's text pattern.

use std::path::Path;

use anyhow::Result;
use snapreg_proto::encryption::TenantKey;
use snapreg_proto::{codec, Digest};

use super::{
    dirs_equal, drop_caches, make_input, median, save_run, scratch, snapctl, time, Registry,
};

pub fn run(mib: usize, reps: usize) -> Result<()> {
    let work = scratch("snapreg-bench-enc-")?;
    let input = work.path().join("input");
    let bytes = make_input(&input, mib)?;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let mut report = String::new();

    // 1. Per core. Zeros never reach either (the chunker makes them zero extents), so
    // only the random and pattern thirds are measured.
    let data = std::fs::read(input.join("pages-1.img"))?;
    let data = &data[..2 * data.len() / 3];
    let key = TenantKey::generate("bench");
    let chunks: Vec<&[u8]> = data.chunks(512 << 10).collect();
    let t_encode = time(|| {
        for c in &chunks {
            std::hint::black_box(codec::encode(c));
        }
        Ok(())
    })?;
    let encoded: Vec<_> = chunks.iter().map(|c| codec::encode(c)).collect();
    let t_encrypt = time(|| {
        for c in &chunks {
            std::hint::black_box(key.encrypt_chunk(c));
        }
        Ok(())
    })?;
    let encrypted: Vec<_> = chunks.iter().map(|c| key.encrypt_chunk(c)).collect();
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
    let t_decode = time(|| {
        for (o, d) in encoded.iter().zip(&digests) {
            std::hint::black_box(codec::decode(d, o)?);
        }
        Ok(())
    })?;
    let enc_digests: Vec<Digest> = encrypted.iter().map(|e| Digest::of(e)).collect();
    let t_decrypt = time(|| {
        for (e, d) in encrypted.iter().zip(&enc_digests) {
            // What a reader does: the address check, then the decryption.
            let content = codec::decode(d, &codec::encode_raw(e))?;
            std::hint::black_box(key.decrypt_chunk(d, &content)?);
        }
        Ok(())
    })?;
    let stored_plain: usize = encoded.iter().map(|o| o.len()).sum();
    let stored_enc: usize = encrypted.iter().map(|o| o.len() + codec::HEADER_LEN).sum();
    let gbs = |t: f64| data.len() as f64 / t / 1e9;
    report += &format!(
        "### Per core, in memory ({:.2} GiB of non-zero chunks, 512 KiB each: half random, half text pattern)\n\n\
         | step | plaintext GB/s | encrypted GB/s | ratio (time) |\n|---|---|---|---|\n\
         | write side: codec::encode vs encrypt_chunk (compress + AES-256-GCM-SIV + nonce hash) | {:.2} | {:.2} | {:.2} |\n\
         | read side: decode (BLAKE3 check) vs decode + decrypt_chunk | {:.2} | {:.2} | {:.2} |\n\n\
         Stored bytes: plaintext {} vs encrypted {} ({:.4}×).\n\n",
        data.len() as f64 / (1u64 << 30) as f64,
        gbs(t_encode),
        gbs(t_encrypt),
        t_encrypt / t_encode,
        gbs(t_decode),
        gbs(t_decrypt),
        t_decrypt / t_decode,
        stored_plain,
        stored_enc,
        stored_enc as f64 / stored_plain as f64,
    );
    drop((encoded, encrypted));

    // 2. Over loopback.
    let key_file = work.path().join("bench.key");
    std::fs::write(&key_file, key.to_file_contents())?;
    let key_arg = key_file.to_str().unwrap().to_string();
    let names = ["cold push", "same image again", "pull"];
    let mut times = [
        [Vec::new(), Vec::new(), Vec::new()],
        [Vec::new(), Vec::new(), Vec::new()],
    ];
    let mut correct = [true, true];
    let inp = input.to_str().unwrap().to_string();
    for rep in 0..reps {
        for (mode, encrypted) in [false, true].into_iter().enumerate() {
            let run = work.path().join(format!("rep{rep}-{mode}"));
            std::fs::create_dir_all(&run)?;
            let reg = Registry::start(&run.join("registry"))?;
            let global: Vec<&str> = if encrypted {
                vec!["--key-file", &key_arg]
            } else {
                vec![]
            };
            let with = |rest: &[&str]| -> Vec<String> {
                global.iter().chain(rest).map(|s| s.to_string()).collect()
            };
            let call = |rest: &[&str]| {
                let args = with(rest);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                snapctl(&reg.url, &args)
            };
            drop_caches();
            times[mode][0].push(time(|| call(&["push", &inp, "bench/img:a"]).map(drop))?);
            drop_caches();
            let mut sent = 0;
            times[mode][1].push(time(|| {
                sent = call(&["push", &inp, "bench/img:b"])?["bytes_transferred"]
                    .as_u64()
                    .unwrap_or(u64::MAX);
                Ok(())
            })?);
            correct[mode] &= sent == 0;
            drop_caches();
            let pulled = run.join("pulled");
            times[mode][2].push(time(|| {
                call(&["pull", "bench/img:a", pulled.to_str().unwrap()]).map(drop)
            })?);
            correct[mode] &= dirs_equal(&input, &pulled);
            if encrypted {
                correct[mode] &= !contains(&run.join("registry"), b"mlp.down_proj.weight")?;
            }
            drop(reg);
            std::fs::remove_dir_all(&run)?;
        }
    }
    report += &format!(
        "### Over loopback: plaintext vs encrypted ({gib:.2} GiB: 1/3 random, 1/3 pattern, 1/3 zeros; {reps} reps, interleaved, page cache dropped before each)\n\n\
         | operation | plaintext median s | encrypted median s | ratio | correct (plain / encrypted) |\n|---|---|---|---|---|\n"
    );
    for (i, name) in names.iter().enumerate() {
        let p = median(&mut times[0][i].clone());
        let e = median(&mut times[1][i].clone());
        report += &format!(
            "| {name} | {p:.2} | {e:.2} | {:.2} | {} / {} |\n",
            e / p,
            if correct[0] { "yes" } else { "NO" },
            if correct[1] { "yes" } else { "NO" }
        );
    }
    println!("{report}");
    save_run(
        "encryption",
        &serde_json::json!({
            "bytes": bytes, "reps": reps, "names": names,
            "plaintext_seconds": times[0], "encrypted_seconds": times[1],
            "per_core_seconds": { "encode": t_encode, "encrypt": t_encrypt, "decode": t_decode, "decrypt": t_decrypt },
        }),
    )?;
    Ok(())
}

/// Whether any file under `dir` contains `needle`.
fn contains(dir: &Path, needle: &[u8]) -> Result<bool> {
    for entry in walk(dir)? {
        let data = std::fs::read(&entry)?;
        if data.windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn walk(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else if e.file_type()?.is_file() {
                out.push(e.path());
            }
        }
    }
    Ok(out)
}
