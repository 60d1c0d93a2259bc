//! Where OTA artifacts' bytes live ([`ArtifactBlobs`]): files in a directory ([`FileBlobs`], the
//! embedded server's `<data>/artifacts/<id>`, 0600) or the store's chunk table ([`StoreBlobs`],
//! a cluster's PostgreSQL, so any node serves any artifact).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Result, StoreError};
use crate::store::{ArtifactBlobs, Store};

/// One file per artifact in a directory (created 0700 on first write; files 0600).
pub struct FileBlobs {
    dir: PathBuf,
}

impl FileBlobs {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The file of artifact `id`; only `art_<hex>` ids name a file (no path tricks).
    fn path(&self, id: &str) -> Result<PathBuf> {
        if !mooring_proto::ota::is_valid_artifact_id(id) {
            return Err(StoreError::InvalidInput(format!(
                "artifact id {id:?} is not art_<hex>"
            )));
        }
        Ok(self.dir.join(id))
    }
}

fn io_error(what: &str, e: std::io::Error) -> StoreError {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::StorageFull | K::QuotaExceeded | K::ReadOnlyFilesystem | K::PermissionDenied => {
            StoreError::Unavailable(format!("{what}: {e}"))
        }
        _ => StoreError::Backend(format!("{what}: {e}")),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Backend(format!("blob worker: {e}")))?
}

#[async_trait::async_trait]
impl ArtifactBlobs for FileBlobs {
    async fn write_blob(&self, id: &str, offset: u64, data: Vec<u8>) -> Result<()> {
        let path = self.path(id)?;
        let dir = self.dir.clone();
        blocking(move || {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io_error("creating the artifacts directory", e))?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io_error("opening the artifact file", e))?;
            let w = |e| io_error("writing the artifact file", e);
            f.set_len(offset).map_err(w)?;
            f.seek(SeekFrom::Start(offset)).map_err(w)?;
            f.write_all(&data).map_err(w)?;
            f.sync_data().map_err(w)?;
            Ok(())
        })
        .await
    }

    async fn read_blob(&self, id: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.path(id)?;
        blocking(move || {
            let r = |e| io_error("reading the artifact file", e);
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(r(e)),
            };
            f.seek(SeekFrom::Start(offset)).map_err(r)?;
            let mut buf = Vec::with_capacity(len.min(8 * 1024 * 1024));
            f.take(u64::try_from(len).unwrap_or(u64::MAX))
                .read_to_end(&mut buf)
                .map_err(r)?;
            Ok(buf)
        })
        .await
    }

    async fn delete_blob(&self, id: &str) -> Result<()> {
        let path = self.path(id)?;
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("deleting the artifact file", e)),
        })
        .await
    }
}

/// The store's own chunk table as an [`ArtifactBlobs`] (every backend has one).
pub struct StoreBlobs(pub Arc<dyn Store>);

#[async_trait::async_trait]
impl ArtifactBlobs for StoreBlobs {
    async fn write_blob(&self, id: &str, offset: u64, data: Vec<u8>) -> Result<()> {
        self.0.write_blob(id, offset, data).await
    }

    async fn read_blob(&self, id: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.0.read_blob(id, offset, len).await
    }

    async fn delete_blob(&self, id: &str) -> Result<()> {
        self.0.delete_blob(id).await
    }
}

/// Appends the part of chunk `data` (stored at `at`) inside `[start, end)` to `out`, if it
/// continues `out` without a gap (a gap ends the read: what follows is not stored contiguously).
pub(crate) fn append_range(out: &mut Vec<u8>, at: i64, data: &[u8], start: i64, end: i64) {
    let expected = start.saturating_add(i64::try_from(out.len()).unwrap_or(i64::MAX));
    let from = expected.max(at);
    if from != expected {
        return;
    }
    let skip = usize::try_from(from - at).unwrap_or(usize::MAX);
    let take = usize::try_from(end - from).unwrap_or(0);
    if let Some(part) = data.get(skip..) {
        out.extend_from_slice(&part[..part.len().min(take)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_blobs_write_replace_read_ranges_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = FileBlobs::new(dir.path().join("artifacts"));
        let id = "art_0123456789abcdef";
        blobs
            .write_blob(id, 0, b"hello ".to_vec())
            .await
            .expect("w");
        blobs.write_blob(id, 6, b"wxrld".to_vec()).await.expect("w");
        // A chunk written again at its offset replaces what was there and after it.
        blobs.write_blob(id, 6, b"world".to_vec()).await.expect("w");
        assert_eq!(
            blobs.read_blob(id, 0, 100).await.expect("r"),
            b"hello world"
        );
        assert_eq!(blobs.read_blob(id, 4, 3).await.expect("r"), b"o w");
        assert!(blobs.read_blob(id, 50, 3).await.expect("r").is_empty());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("artifacts").join(id))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(blobs.write_blob("../x", 0, vec![1]).await.is_err());
        blobs.delete_blob(id).await.expect("delete");
        blobs.delete_blob(id).await.expect("delete twice");
        assert!(blobs.read_blob(id, 0, 10).await.expect("r").is_empty());
    }
}
