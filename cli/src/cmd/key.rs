use std::path::PathBuf;

use serde_json::json;
use snapreg_client::ClientError;
use snapreg_proto::encryption::TenantKey;

use super::Output;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a tenant key file (mode 0600; refuses to overwrite). Keep it like a
    /// password: whoever holds it reads every snapshot encrypted with it, and a lost
    /// key cannot be recovered.
    New {
        /// The tenant's name (recorded in the key file and in manifests).
        #[arg(long)]
        tenant: String,
        /// Where to write the key file.
        out: PathBuf,
    },
    /// Show a key file's tenant and key id (never the secret).
    Show { file: PathBuf },
}

pub fn run(command: &Command) -> anyhow::Result<Output> {
    let key = match command {
        Command::New { tenant, out } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = TenantKey::generate(tenant);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .map_err(|e| ClientError::io(format!("creating key file {}", out.display()), e))?;
            f.write_all(key.to_file_contents().as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| ClientError::io(format!("writing key file {}", out.display()), e))?;
            key
        }
        Command::Show { file } => TenantKey::load(file).map_err(ClientError::from)?,
    };
    Ok(Output {
        human: format!("tenant {} key {}", key.tenant(), key.id()),
        json: json!({ "tenant": key.tenant(), "key_id": key.id().to_string() }),
    })
}
