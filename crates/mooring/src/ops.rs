//! Operating an installed server: `backup` / `restore` of a data dir, the server's log filter,
//! and the shell completions and man pages generated from the clap definitions (packaging).
//!
//! Why the backup reads the data dir and not the API: the CA key, the server key and the admin
//! token are part of what a restore needs, and an API endpoint would send them over a plain-HTTP
//! listener by default. Reading the files needs what the server's user has (root or `mooring`)
//! on the same machine, works with the server running or stopped, and SQLite's online backup API
//! gives a consistent snapshot of the database while the server writes (WAL).

use crate::client::UsageError;
use anyhow::{bail, Context};
use clap::{Args, CommandFactory};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// SQLite's companions of the database file: never copied (the snapshot replaces them).
const DB_COMPANIONS: [&str; 3] = ["-wal", "-shm", "-journal"];
/// Most entries a backup archive may hold (a data dir has about six); more is not a backup.
const ARCHIVE_ENTRIES_MAX: usize = 1000;

#[derive(Args)]
pub struct BackupArgs {
    /// Data directory of the server to back up; the server may be running.
    #[arg(
        long,
        env = "MOORING_DATA_DIR",
        default_value = "./mooring-data",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
    /// Backup file to write (a tar archive, 0600); must not exist.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Backup file written by `mooring backup`.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// Data directory to restore into; must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
}

#[derive(Args)]
pub struct CompletionsArgs {
    /// Shell to write the completion script for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// Directory to write the man pages (section 1) into; created if missing.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// `mooring backup`: the data dir's files plus a consistent snapshot of its database, in one
/// tar archive.
pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let data_dir = &args.data_dir;
    let db = data_dir.join(mooring_store::DB_FILE_NAME);
    if !db.is_file() {
        return Err(UsageError(format!(
            "{} is not a Mooring data directory (it has no {}); pass the server's --data-dir",
            data_dir.display(),
            mooring_store::DB_FILE_NAME
        ))
        .into());
    }
    if args.out.exists() {
        return Err(UsageError(format!(
            "{} exists; choose a new --out file (a backup never overwrites one)",
            args.out.display()
        ))
        .into());
    }
    let parent = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Staging next to the output (same filesystem, so the final step is a link, and no copy of
    // the keys ever lands in a shared /tmp); a temp dir is 0700.
    let staging = tempfile::Builder::new()
        .prefix(".mooring-backup-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
    let snapshot = staging.path().join(mooring_store::DB_FILE_NAME);
    let info = mooring_store::backup_database(&db, &snapshot)
        .with_context(|| format!("copying the database {}", db.display()))?;

    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(data_dir).with_context(|| format!("reading {}", data_dir.display()))?
    {
        let entry = entry.with_context(|| format!("reading {}", data_dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str().map(str::to_owned) else {
            eprintln!("note: skipped {:?}: not a UTF-8 name", entry.path());
            continue;
        };
        if name == mooring_store::DB_FILE_NAME
            || DB_COMPANIONS
                .iter()
                .any(|s| name == format!("{}{s}", mooring_store::DB_FILE_NAME))
        {
            continue;
        }
        let meta = std::fs::symlink_metadata(entry.path())
            .with_context(|| format!("inspecting {}", entry.path().display()))?;
        if !meta.is_file() {
            eprintln!(
                "note: skipped {}: not a regular file",
                entry.path().display()
            );
            continue;
        }
        names.push(name);
    }
    names.sort();

    let archive_path = staging.path().join("backup.tar");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&archive_path)
        .with_context(|| format!("creating {}", archive_path.display()))?;
    let mut tar = tar::Builder::new(file);
    for name in &names {
        append_private(&mut tar, name, &data_dir.join(name))?;
    }
    append_private(&mut tar, mooring_store::DB_FILE_NAME, &snapshot)?;
    let file = tar.into_inner().context("writing the archive")?;
    file.sync_all().context("syncing the archive")?;
    drop(file);
    // A hard link publishes the finished archive under its name atomically and never replaces
    // a file that appeared meanwhile. A filesystem without hard links gets a rename after a
    // check (a file created between the two would be replaced).
    let exists = || {
        anyhow::Error::new(UsageError(format!(
            "{} exists; choose a new --out file (a backup never overwrites one)",
            args.out.display()
        )))
    };
    match std::fs::hard_link(&archive_path, &args.out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(exists()),
        Err(_) if args.out.exists() => return Err(exists()),
        Err(_) => std::fs::rename(&archive_path, &args.out)
            .with_context(|| format!("writing {}", args.out.display()))?,
    }
    if let Ok(dir) = std::fs::File::open(&parent) {
        let _ = dir.sync_all();
    }
    let size = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "backed up {} to {} ({} files, {size} bytes; database schema version {})",
        data_dir.display(),
        args.out.display(),
        names.len() + 1,
        info.schema_version
    );
    Ok(())
}

/// Appends the file at `path` as `name`, mode 0600, owner 0 (a restore gives it its own user).
fn append_private(
    tar: &mut tar::Builder<std::fs::File>,
    name: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(meta.len());
    header.set_mode(0o600);
    header.set_mtime(
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs()),
    );
    tar.append_data(&mut header, name, &mut file)
        .with_context(|| format!("adding {} to the archive", path.display()))?;
    Ok(())
}

/// `mooring restore`: unpacks a backup into a new data dir (0700, files 0600). Only plain file
/// names are accepted, so an archive cannot write outside the directory.
pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let target = &args.data_dir;
    if target.exists() {
        let mut entries =
            std::fs::read_dir(target).with_context(|| format!("reading {}", target.display()))?;
        if entries.next().is_some() {
            return Err(UsageError(format!(
                "{} is not empty; restore into a new (or empty) data directory",
                target.display()
            ))
            .into());
        }
    }
    let archive = std::fs::File::open(&args.from).map_err(|e| {
        UsageError(format!(
            "cannot read the backup {}: {e}",
            args.from.display()
        ))
    })?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&parent)
        .with_context(|| format!("creating {}", parent.display()))?;
    // Unpacked beside the target and renamed into place at the end: a failed restore leaves
    // no half-filled data dir that a server could start on.
    let staging = tempfile::Builder::new()
        .prefix(".mooring-restore-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
    let not_a_backup = |why: String| {
        UsageError(format!(
            "{} is not a Mooring backup: {why}",
            args.from.display()
        ))
    };
    let mut tar = tar::Archive::new(archive);
    let mut count = 0usize;
    let mut has_db = false;
    let entries = tar.entries().map_err(|e| not_a_backup(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| not_a_backup(e.to_string()))?;
        count += 1;
        if count > ARCHIVE_ENTRIES_MAX {
            return Err(not_a_backup(format!("more than {ARCHIVE_ENTRIES_MAX} entries")).into());
        }
        let path = entry.path().map_err(|e| not_a_backup(e.to_string()))?;
        let name = match (path.components().count(), path.file_name()) {
            (1, Some(n)) if path.to_str().is_some_and(|s| !s.contains('/')) => {
                n.to_string_lossy().into_owned()
            }
            _ => {
                return Err(not_a_backup(format!("unexpected entry {}", path.display())).into());
            }
        };
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(not_a_backup(format!("{name} is not a regular file")).into());
        }
        has_db |= name == mooring_store::DB_FILE_NAME;
        let dest = staging.path().join(&name);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dest)
            .map_err(|e| not_a_backup(format!("{name}: {e}")))?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("writing {}", dest.display()))?;
        out.sync_all()
            .with_context(|| format!("syncing {}", dest.display()))?;
    }
    if !has_db {
        return Err(not_a_backup(format!("it has no {}", mooring_store::DB_FILE_NAME)).into());
    }
    let staged = staging.keep();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", staged.display()))?;
    // rename(2) replaces an empty directory (e.g. one systemd created) atomically.
    if let Err(e) = std::fs::rename(&staged, target) {
        let _ = std::fs::remove_dir_all(&staged);
        bail!("moving the restored files to {}: {e}", target.display());
    }
    if let Ok(dir) = std::fs::File::open(&parent) {
        let _ = dir.sync_all();
    }
    println!(
        "restored {count} files from {} into {}",
        args.from.display(),
        target.display()
    );
    let owned_by_root = std::fs::metadata(target).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    if owned_by_root {
        println!(
            "the files belong to root; for the packaged server: chown -R mooring:mooring {}",
            target.display()
        );
    }
    Ok(())
}

/// The server's log filter: `RUST_LOG` (default `info`), with the `rustls` target lowered to
/// `error` unless `RUST_LOG` names it. rustls warns about what peers send (e.g. `Illegal SNI
/// extension: ignoring IP address presented as hostname` for every device that connects to an
/// IP address, as the README's `127.0.0.1` does); that is not a problem of the operator's.
pub fn server_log_filter() -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "info".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if spec.contains("rustls") {
        return filter;
    }
    match "rustls=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// `mooring completions <shell>`: the completion script on stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = crate::Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "mooring", &mut out);
    out.flush().context("writing the completion script")?;
    Ok(())
}

/// `mooring man --out DIR`: `mooring.1` and one page per subcommand (`mooring-device-create.1`).
pub fn man(args: ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    clap_mangen::generate_to(crate::Cli::command(), &args.out)
        .with_context(|| format!("writing man pages to {}", args.out.display()))?;
    Ok(())
}
