//! The compatibility record of a snapshot and the one function that decides whether
//! it may restore on a host. `pull-restore` and the scheduler API both call
//! [`check`], so a node the scheduler picked never refuses the snapshot it was given.
//!
//! | field | rule on the restoring node |
//! |---|---|
//! | arch | equal |
//! | cpu_features | the image's are a subset of the node's |
//! | kernel | a different release warns, does not refuse |
//! | criu_version | same major.minor or newer |
//! | container_image | equal, when recorded |
//! | gpu devices (model, count, order) | equal, unless a GPU map is given |
//! | gpu driver | same major branch, equal or newer |
//! | gpu cuda_driver_api | equal or newer |
//! | gpu mig_profile | equal |
//! | labels | every label the caller asks for matches |

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What a snapshot needs from the host, or what a host offers (same shape both ways).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompatRecord {
    pub arch: String,
    #[serde(default)]
    pub cpu_features: Vec<String>,
    #[serde(default)]
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuRecord>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuRecord {
    /// In CUDA device order.
    pub devices: Vec<GpuDevice>,
    pub driver_version: String,
    /// As cuDriverGetVersion reports it, e.g. 12080 for 12.8.
    pub cuda_driver_api: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_profile: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuDevice {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Labels the caller requires the snapshot to carry.
    pub required_labels: BTreeMap<String, String>,
    /// The caller remaps GPUs (`--gpu-map`): model/count/order need not match.
    pub gpu_remapped: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mismatch {
    pub field: &'static str,
    pub snapshot: String,
    pub host: String,
    pub rule: &'static str,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: snapshot has {:?}, host has {:?} (rule: {})",
            self.field, self.snapshot, self.host, self.rule
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Verdict {
    /// Each is a reason to refuse.
    pub mismatches: Vec<Mismatch>,
    /// Worth saying, not worth refusing.
    pub warnings: Vec<Mismatch>,
}

impl Verdict {
    pub fn is_compatible(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Applies the rules of the module table: `snapshot` is the manifest's record,
/// `host` the restoring node's facts.
pub fn check(snapshot: &CompatRecord, host: &CompatRecord, opts: &CheckOptions) -> Verdict {
    let mut v = Verdict::default();
    let mut refuse = |field, snapshot: String, host: String, rule| {
        v.mismatches.push(Mismatch {
            field,
            snapshot,
            host,
            rule,
        })
    };

    if snapshot.arch != host.arch {
        refuse("arch", snapshot.arch.clone(), host.arch.clone(), "equal");
    }
    let missing: Vec<&str> = snapshot
        .cpu_features
        .iter()
        .filter(|f| !host.cpu_features.contains(f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        refuse(
            "cpu_features",
            missing.join(" "),
            "(absent)".into(),
            "the image's CPU features must be a subset of the node's",
        );
    }
    if let Some(need) = &snapshot.criu_version {
        let ok = match (
            major_minor(need),
            host.criu_version.as_deref().and_then(major_minor),
        ) {
            (Some(n), Some(h)) => h >= n,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if !ok {
            refuse(
                "criu_version",
                need.clone(),
                host.criu_version.clone().unwrap_or_else(|| "none".into()),
                "same major.minor or newer",
            );
        }
    }
    if let Some(img) = &snapshot.container_image {
        if host.container_image.as_ref() != Some(img) {
            refuse(
                "container_image",
                img.clone(),
                host.container_image.clone().unwrap_or_default(),
                "equal",
            );
        }
    }
    if let Some(sg) = &snapshot.gpu {
        match &host.gpu {
            None => refuse(
                "gpu",
                describe_gpus(sg),
                "no GPU".into(),
                "a GPU snapshot needs a GPU node",
            ),
            Some(hg) => {
                if !opts.gpu_remapped
                    && sg
                        .devices
                        .iter()
                        .map(|d| &d.model)
                        .ne(hg.devices.iter().map(|d| &d.model))
                {
                    refuse(
                        "gpu.devices",
                        describe_gpus(sg),
                        describe_gpus(hg),
                        "model, count and order equal (or --gpu-map)",
                    );
                }
                let (sd, hd) = (
                    version_parts(&sg.driver_version),
                    version_parts(&hg.driver_version),
                );
                if sd.first() != hd.first() || hd < sd {
                    refuse(
                        "gpu.driver_version",
                        sg.driver_version.clone(),
                        hg.driver_version.clone(),
                        "same major branch, equal or newer",
                    );
                }
                if hg.cuda_driver_api < sg.cuda_driver_api {
                    refuse(
                        "gpu.cuda_driver_api",
                        sg.cuda_driver_api.to_string(),
                        hg.cuda_driver_api.to_string(),
                        "equal or newer",
                    );
                }
                if sg.mig_profile != hg.mig_profile {
                    refuse(
                        "gpu.mig_profile",
                        sg.mig_profile.clone().unwrap_or_default(),
                        hg.mig_profile.clone().unwrap_or_default(),
                        "equal",
                    );
                }
            }
        }
    }
    for (k, want) in &opts.required_labels {
        let have = snapshot.labels.get(k);
        if have != Some(want) {
            refuse(
                "labels",
                format!("{k}={}", have.cloned().unwrap_or_default()),
                format!("{k}={want}"),
                "every requested label matches",
            );
        }
    }
    if snapshot.kernel != host.kernel {
        v.warnings.push(Mismatch {
            field: "kernel",
            snapshot: snapshot.kernel.clone(),
            host: host.kernel.clone(),
            rule: "recorded; a different release warns",
        });
    }
    v
}

fn describe_gpus(g: &GpuRecord) -> String {
    let models: Vec<&str> = g.devices.iter().map(|d| d.model.as_str()).collect();
    format!("{}x [{}]", models.len(), models.join(", "))
}

fn version_parts(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn major_minor(v: &str) -> Option<(u64, u64)> {
    let p = version_parts(v);
    Some((*p.first()?, p.get(1).copied().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> CompatRecord {
        CompatRecord {
            arch: "x86_64".into(),
            cpu_features: vec!["sse2".into(), "avx2".into(), "avx512f".into()],
            kernel: "6.18.0".into(),
            criu_version: Some("4.2.1".into()),
            container_image: None,
            gpu: Some(GpuRecord {
                devices: vec![GpuDevice {
                    model: "H100".into(),
                    uuid: None,
                }],
                driver_version: "580.65.06".into(),
                cuda_driver_api: 13000,
                mig_profile: None,
            }),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn identical_host_is_compatible_without_warnings() {
        let v = check(&host(), &host(), &CheckOptions::default());
        assert!(v.is_compatible() && v.warnings.is_empty(), "{v:?}");
    }

    #[test]
    fn each_rule_names_its_field() {
        type Mutation = Box<dyn Fn(&mut CompatRecord)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("arch", Box::new(|h| h.arch = "aarch64".into())),
            (
                "cpu_features",
                Box::new(|h| h.cpu_features.retain(|f| f != "avx512f")),
            ),
            (
                "criu_version",
                Box::new(|h| h.criu_version = Some("4.1.9".into())),
            ),
            (
                "gpu.devices",
                Box::new(|h| h.gpu.as_mut().unwrap().devices[0].model = "A100".into()),
            ),
            (
                "gpu.devices",
                Box::new(|h| {
                    h.gpu.as_mut().unwrap().devices.push(GpuDevice {
                        model: "H100".into(),
                        uuid: None,
                    })
                }),
            ),
            (
                "gpu.driver_version",
                Box::new(|h| h.gpu.as_mut().unwrap().driver_version = "575.1".into()),
            ),
            (
                "gpu.driver_version",
                Box::new(|h| h.gpu.as_mut().unwrap().driver_version = "580.10".into()),
            ),
            (
                "gpu.cuda_driver_api",
                Box::new(|h| h.gpu.as_mut().unwrap().cuda_driver_api = 12080),
            ),
            (
                "gpu.mig_profile",
                Box::new(|h| h.gpu.as_mut().unwrap().mig_profile = Some("1g.10gb".into())),
            ),
            ("gpu", Box::new(|h| h.gpu = None)),
        ];
        for (field, mutate) in cases {
            let mut h = host();
            mutate(&mut h);
            let v = check(&host(), &h, &CheckOptions::default());
            assert_eq!(v.mismatches.len(), 1, "{field}: {v:?}");
            assert_eq!(v.mismatches[0].field, field);
        }
    }

    #[test]
    fn newer_is_fine_and_kernel_only_warns() {
        let mut h = host();
        h.criu_version = Some("4.3".into());
        h.gpu.as_mut().unwrap().driver_version = "580.99.1".into();
        h.gpu.as_mut().unwrap().cuda_driver_api = 13010;
        h.kernel = "6.19.2".into();
        h.cpu_features.push("amx".into());
        let v = check(&host(), &h, &CheckOptions::default());
        assert!(v.is_compatible(), "{v:?}");
        assert_eq!(v.warnings[0].field, "kernel");
    }

    #[test]
    fn gpu_map_waives_device_order_and_labels_are_required() {
        let mut h = host();
        h.gpu.as_mut().unwrap().devices[0].model = "A100".into();
        let opts = CheckOptions {
            gpu_remapped: true,
            ..Default::default()
        };
        assert!(check(&host(), &h, &opts).is_compatible());

        let mut snap = host();
        snap.labels.insert("model".into(), "llama".into());
        let mut opts = CheckOptions::default();
        opts.required_labels.insert("model".into(), "llama".into());
        assert!(check(&snap, &host(), &opts).is_compatible());
        opts.required_labels.insert("model".into(), "qwen".into());
        assert_eq!(check(&snap, &host(), &opts).mismatches[0].field, "labels");
    }
}
