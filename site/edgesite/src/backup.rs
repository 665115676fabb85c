//! `edgesite backup`: a consistent copy of a SQLite site's datastore, taken while the server
//! runs (SQLite's online backup), for single-machine sites to back up without stopping.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

/// Flags of `edgesite backup`.
#[derive(Args, Clone, Debug)]
pub struct BackupArgs {
    /// The server's data dir.
    #[arg(long, short = 'd', default_value = "/var/lib/edgesite")]
    pub data_dir: PathBuf,
    /// Where to write the copy (default: <data-dir>/server/backups/state-<UTC time>.db).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

/// The datastore of a server's data dir.
fn datastore(data_dir: &Path) -> PathBuf {
    data_dir.join("server").join("state.db")
}

pub fn run(args: &BackupArgs) -> Result<()> {
    let source = datastore(&args.data_dir);
    if !source.exists() {
        anyhow::bail!(
            "no datastore at {}: is {} a server's --data-dir (an agent's holds none)?",
            source.display(),
            args.data_dir.display()
        );
    }
    let output = match &args.output {
        Some(path) => path.clone(),
        None => {
            let dir = args.data_dir.join("server").join("backups");
            crate::private_dir(&dir)?;
            let t = time::OffsetDateTime::now_utc();
            dir.join(format!(
                "state-{:04}{:02}{:02}T{:02}{:02}{:02}Z.db",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            ))
        }
    };
    let summary = apiserver_lite::storage::sqlite::backup(&source, &output)
        .with_context(|| format!("back up {}", source.display()))?;
    println!("{}", output.display());
    eprintln!(
        "backed up {} objects at revision {} ({} KB) to {}; to restore: stop the server, copy the file to {} and remove {}-wal and {}-shm beside it, then start the server",
        summary.objects,
        summary.revision,
        summary.bytes.div_ceil(1024),
        output.display(),
        source.display(),
        source.display(),
        source.display()
    );
    Ok(())
}
