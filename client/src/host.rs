//! Facts about this host, in the shape of a compatibility record.

use std::collections::BTreeMap;

use snapreg_proto::compat::CompatRecord;

/// CPU flags that user code may execute (ISA extensions). Recording all of
/// /proc/cpuinfo's flags would refuse restores over flags no program uses (`vme`,
/// `hypervisor`); recording none would let an AVX-512 image land on a host without it.
const ISA_FLAG_PREFIXES: &[&str] = &[
    "sse",
    "ssse3",
    "avx",
    "fma",
    "f16c",
    "bmi",
    "adx",
    "aes",
    "sha_ni",
    "popcnt",
    "amx",
    "vaes",
    "vpclmulqdq",
    "gfni",
    "pclmulqdq",
    "movbe",
    "lzcnt",
    "abm",
    "rdrand",
    "rdseed",
    "xsave",
    "asimd",
    "sve",
    "atomics",
    "fp16",
];

pub fn facts() -> CompatRecord {
    CompatRecord {
        arch: std::env::consts::ARCH.to_string(),
        cpu_features: cpu_features(),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        criu_version: crate::criu::locate(None).ok().map(|c| c.version),
        container_image: None,
        gpu: None,
        labels: BTreeMap::new(),
    }
}

pub fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn cpu_features() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let line = info
        .lines()
        .find(|l| l.starts_with("flags") || l.starts_with("Features"))
        .unwrap_or("");
    let mut flags: Vec<String> = line
        .split_once(':')
        .map_or("", |(_, f)| f)
        .split_whitespace()
        .filter(|f| ISA_FLAG_PREFIXES.iter().any(|p| f.starts_with(p)))
        .map(str::to_string)
        .collect();
    flags.sort();
    flags.dedup();
    flags
}
