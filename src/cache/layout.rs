//! Everything that knows cacache's on-disk layout beyond its API, in one place.
//!
//! regproxy uses cacache's index through its API, but two things cacache does not offer:
//! - **Content written while it streams.** A blob is written once, to a temporary file, hashed
//!   as it arrives and served to clients from that file; only when it verified is it renamed to
//!   its content path. cacache's writer would need the bytes a second time. So regproxy names
//!   the content file itself ([`content_path`]), and lists them ([`content_files`]).
//! - **Index compaction.** cacache's index only ever appends (every revalidated tag adds a
//!   line); [`compact_index`] rewrites each bucket to its latest live entry per key.
//!
//! The store's tests pin both against cacache's own reader and writer, so that an upgrade that
//! moves them fails a test instead of turning every hit into a miss.

use std::fs::Metadata;
use std::io;
use std::path::{Path, PathBuf};

use super::digest::Digest;

/// The content file of `digest` under `dir`: `content-v2/<alg>/<xx>/<yy>/<rest of hex>`.
pub fn content_path(dir: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    dir.join("content-v2")
        .join(digest.alg().name())
        .join(&hex[0..2])
        .join(&hex[2..4])
        .join(&hex[4..])
}

/// Every content file under `dir`, with its digest (from its path) and metadata (blocking).
pub fn content_files(dir: &Path) -> Vec<(Digest, PathBuf, Metadata)> {
    let root = dir.join("content-v2");
    let mut out = Vec::new();
    for alg in ["sha256", "sha512"] {
        let base = root.join(alg);
        for entry in walkdir::WalkDir::new(&base).min_depth(3).max_depth(3) {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            let rel = entry.path().strip_prefix(&base).unwrap_or(entry.path());
            let hex: String = rel.iter().map(|c| c.to_string_lossy()).collect();
            if let Ok(digest) = Digest::parse(&format!("{alg}:{hex}")) {
                out.push((digest, entry.path().to_owned(), meta));
            }
        }
    }
    out
}

/// What failed, where, and why, for the caller's error type.
pub type LayoutError = (&'static str, PathBuf, io::Error);

/// Rewrites every index bucket under `dir` to its latest entry per key, keeping only keys that
/// are not removals and that `live` accepts (blocking).
///
/// An entry appended by another process between the read and the rename of a bucket is lost;
/// for an object that means a re-download, never a wrong answer.
pub fn compact_index(dir: &Path, live: impl Fn(&str) -> bool) -> Result<(), LayoutError> {
    let root = dir.join("index-v5");
    for bucket in walkdir::WalkDir::new(&root).min_depth(3).max_depth(3) {
        let Ok(bucket) = bucket else { continue };
        if bucket.file_type().is_file() {
            compact_bucket(bucket.path(), &live)?;
        }
    }
    Ok(())
}

fn compact_bucket(path: &Path, live: &impl Fn(&str) -> bool) -> Result<(), LayoutError> {
    let err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |e: io::Error| (what, path, e)
    };
    let text = std::fs::read_to_string(path).map_err(err("read", path))?;
    let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
    let mut latest: Vec<(String, &str, bool)> = Vec::new();
    for line in &lines {
        let Some((key, present)) = index_line(line) else {
            continue;
        };
        let keep = present && live(&key);
        latest.retain(|(k, _, _)| *k != key);
        latest.push((key, line, keep));
    }
    let keep: Vec<&str> = latest.iter().filter(|e| e.2).map(|e| e.1).collect();
    if keep.len() == lines.len() {
        return Ok(());
    }
    if keep.is_empty() {
        return std::fs::remove_file(path).map_err(err("compact", path));
    }
    let tmp = path.with_extension("compact");
    let body: String = keep.iter().map(|l| format!("\n{l}")).collect();
    std::fs::write(&tmp, body).map_err(err("compact", &tmp))?;
    std::fs::rename(&tmp, path).map_err(err("compact", path))
}

/// An index line's key, and whether it is present (not a removal); `None` for a torn or foreign
/// line. A line is `<sha256 of the JSON>\t<JSON>`.
fn index_line(line: &str) -> Option<(String, bool)> {
    use sha2::Digest as _;
    let (hash, json) = line.split_once('\t')?;
    if hex::encode(sha2::Sha256::digest(json.as_bytes())) != hash {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let key = v.get("key")?.as_str()?.to_owned();
    let present = !v.get("integrity").map_or(true, |i| i.is_null());
    Some((key, present))
}
