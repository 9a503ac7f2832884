use serde_json::json;
use snapreg_client::{criu, host};

use super::Output;
use crate::global::Global;

pub fn run(g: &Global) -> Output {
    let facts = host::facts();
    let (criu_json, criu_line) = match criu::locate(g.criu.as_deref()) {
        Ok(c) => (
            json!({ "path": c.path, "version": c.version }),
            format!("criu {} at {}", c.version, c.path.display()),
        ),
        Err(e) => (json!({ "error": e.to_string() }), format!("criu: {e}")),
    };
    Output {
        human: format!(
            "arch {} kernel {}\ncpu features: {}\n{criu_line}",
            facts.arch,
            facts.kernel,
            facts.cpu_features.join(" ")
        ),
        json: json!({ "compat": facts, "criu": criu_json }),
    }
}
