//! The credential files `mooring device create` writes: created empty and exclusively before the
//! device exists (never truncating or following a link), the key 0600, removed again if the API
//! call fails.

use crate::client::UsageError;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// The credential files `device create` writes, with their modes; the private key first.
const CREDENTIAL_FILES: [(&str, u32); 3] = [
    ("device.key", 0o600),
    ("device.crt", 0o644),
    ("ca.crt", 0o644),
];

/// The credential files of `device create`, created empty (never truncating or following
/// anything) before the device exists, so a refused write leaves no orphan device behind.
pub struct CredentialFiles {
    dir: PathBuf,
    created_dir: bool,
    files: Vec<(PathBuf, std::fs::File)>,
}

impl CredentialFiles {
    /// Checks `dir` (not a symbolic link; a directory if it exists) and creates every file
    /// with `O_CREAT | O_EXCL | O_NOFOLLOW` and its final mode (the key 0600). A file that
    /// exists, or is a symbolic link even to nowhere, is refused, naming it: exit code 2.
    /// `with_key: false` (a CSR: the key stays on the device) leaves out `device.key`.
    pub fn create(dir: &Path, with_key: bool) -> anyhow::Result<Self> {
        // Without a trailing slash, so a symbolic link is seen as one, not followed.
        let dir: PathBuf = dir.components().collect();
        let created_dir = match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UsageError(format!(
                    "--out {} is a symbolic link; refusing to write credentials through it",
                    dir.display()
                ))
                .into())
            }
            Ok(m) if !m.is_dir() => {
                return Err(UsageError(format!(
                    "--out {} exists and is not a directory",
                    dir.display()
                ))
                .into())
            }
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                true
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("checking {}", dir.display())))
            }
        };
        let mut out = CredentialFiles {
            dir,
            created_dir,
            files: Vec::new(),
        };
        for (name, mode) in CREDENTIAL_FILES
            .into_iter()
            .filter(|(name, _)| with_key || *name != "device.key")
        {
            let path = out.dir.join(name);
            let file = create_new_file(&path, mode)?;
            out.files.push((path, file));
        }
        Ok(out)
    }

    /// Writes each file's contents (in [`CREDENTIAL_FILES`] order, of the files created) and
    /// syncs it.
    pub fn write(mut self, contents: &[&str]) -> anyhow::Result<()> {
        anyhow::ensure!(
            contents.len() == self.files.len(),
            "{} credential files, {} contents",
            self.files.len(),
            contents.len()
        );
        use std::io::Write;
        for ((path, file), text) in self.files.iter_mut().zip(contents) {
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        self.files.clear();
        self.created_dir = false;
        Ok(())
    }
}

impl Drop for CredentialFiles {
    /// Not written (the API call failed): remove the empty files and the directory we made.
    fn drop(&mut self) {
        for (path, _) in self.files.drain(..) {
            let _ = std::fs::remove_file(path);
        }
        if self.created_dir {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Creates `path` with `mode`; refuses (exit code 2) if it exists or is a symbolic link.
fn create_new_file(path: &Path, mode: u32) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        // create_new (O_EXCL) already refuses a symbolic link as the last component; O_NOFOLLOW
        // keeps that true should the flags ever change.
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path);
    match opened {
        Ok(f) => Ok(f),
        Err(e)
            if e.kind() == std::io::ErrorKind::AlreadyExists
                || e.raw_os_error() == Some(libc::ELOOP) =>
        {
            Err(UsageError(format!(
                "{} already exists (or is a symbolic link); refusing to overwrite or follow it (choose another --out)",
                path.display()
            ))
            .into())
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating {}", path.display()))),
    }
}
