//! Keeping the cache within bounds: least recently used objects go first once the cache is over
//! its size or the disk under its free-space floor, down to a low watermark so that eviction
//! does not run on every commit. Objects being served are left alone; objects being filled are
//! not in the store yet.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::store::{OnDisk, Store, StoreError};

/// How often the bounds are checked even when nothing was committed (the disk fills by others).
const CHECK_EVERY: Duration = Duration::from_secs(30);
/// How often the index is compacted.
const COMPACT_EVERY: Duration = Duration::from_secs(300);

/// The limits the cache is kept within.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounds {
    /// Most bytes of objects; eviction then goes down to 90 % of it.
    pub max_size: Option<u64>,
    /// Least free bytes on the cache's file system; eviction then frees 10 % more.
    pub min_free: Option<u64>,
}

/// What one eviction pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Objects removed.
    pub removed: u64,
    /// Bytes freed.
    pub freed: u64,
}

impl Bounds {
    /// Whether any bound is set.
    pub fn any(&self) -> bool {
        self.max_size.is_some() || self.min_free.is_some()
    }

    /// Bytes to free given the cache's size and the disk's free space.
    fn need(&self, total: u64, free: Option<u64>) -> u64 {
        let over = self
            .max_size
            .filter(|max| total > *max)
            .map_or(0, |max| total - max / 10 * 9);
        let short = match (self.min_free, free) {
            (Some(min), Some(free)) if free < min => min - free + min / 10,
            _ => 0,
        };
        over.max(short)
    }
}

/// Free bytes for unprivileged users on the file system holding `path`.
pub fn free_space(path: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// One pass (blocking I/O): evicts least recently used objects until within `bounds`, then
/// compacts the index.
pub fn evict(store: &Store, bounds: &Bounds) -> Result<Report, StoreError> {
    let objects = store.objects_on_disk();
    let total: u64 = objects.iter().map(|o| o.size).sum();
    let need = bounds.need(total, free_space(store.dir()));
    let report = match need {
        0 => Report::default(),
        _ => remove_lru(store, objects, |r| r.freed >= need),
    };
    store.compact_index()?;
    Ok(report)
}

/// Removes least recently used objects (never those being served) until the cache's file system
/// has `want` bytes free (blocking I/O); nothing, if even all of them would not free enough. A
/// full disk then costs cached objects, not pulls, and an object that can never fit costs none.
pub fn make_room(store: &Store, want: u64) -> Report {
    let Some(free) = free_space(store.dir()).filter(|free| *free < want) else {
        return Report::default();
    };
    let objects: Vec<_> = store
        .objects_on_disk()
        .into_iter()
        .filter(|o| !store.is_pinned(&o.path))
        .collect();
    if free + objects.iter().map(|o| o.size).sum::<u64>() < want {
        return Report::default();
    }
    remove_lru(store, objects, |_| {
        free_space(store.dir()).map_or(true, |free| free >= want)
    })
}

/// Removes the least recently used of `objects` that are not being served, until `enough`;
/// counts them in the metrics. A file that cannot be removed is passed over.
fn remove_lru(store: &Store, mut objects: Vec<OnDisk>, enough: impl Fn(&Report) -> bool) -> Report {
    objects.sort_by_key(|o| o.accessed);
    let mut report = Report::default();
    for object in objects {
        if enough(&report) {
            break;
        }
        if store.is_pinned(&object.path) {
            continue;
        }
        if let Err(e) = store.remove_object(&object) {
            tracing::warn!(digest = %object.digest, error = %e, "cannot evict");
            continue;
        }
        tracing::info!(digest = %object.digest, bytes = object.size, "evicted");
        report.removed += 1;
        report.freed += object.size;
    }
    store
        .metrics()
        .evictions
        .fetch_add(report.removed, Ordering::Relaxed);
    report
}

/// Runs eviction whenever a commit may have crossed a bound and every [`CHECK_EVERY`], and
/// compacts the index every [`COMPACT_EVERY`] even without bounds (revalidated tags append).
pub async fn keep_within(
    store: Store,
    bounds: Bounds,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let hint = store.commit_hint();
    let mut last_compaction = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hint.notified() => {}
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let bytes = store.metrics().cache_bytes.load(Ordering::Relaxed);
        let over = bounds.any() && bounds.need(bytes, free_space(store.dir())) > 0;
        let compact_due = last_compaction.elapsed() >= COMPACT_EVERY;
        if !over && !compact_due {
            continue;
        }
        last_compaction = tokio::time::Instant::now();
        let (s, b) = (store.clone(), bounds);
        let pass = move || {
            s.recount();
            if over {
                evict(&s, &b)
            } else {
                s.compact_index().map(|()| Report::default())
            }
        };
        match tokio::task::spawn_blocking(pass).await {
            Ok(Ok(r)) if r.removed > 0 => {
                tracing::info!(removed = r.removed, freed = r.freed, "cache trimmed")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cache maintenance failed"),
            Err(e) => tracing::warn!(error = %e, "cache maintenance task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Digest, ObjectMeta};
    use std::time::{Duration as D, SystemTime};

    /// Oldest first, but an object being served survives even when it is the oldest.
    #[tokio::test]
    async fn evicts_lru_first_and_spares_pinned_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let mut digests = Vec::new();
        for (i, age) in [(0u8, 300u64), (1, 200), (2, 100)] {
            let data = vec![i; 1000];
            let d = Digest::sha256_of(&data);
            let meta = ObjectMeta {
                content_type: None,
                size: 1000,
            };
            store.put(&d, &data, &meta).await.unwrap();
            let f = std::fs::File::options()
                .write(true)
                .open(store.content_path(&d))
                .unwrap();
            f.set_modified(SystemTime::now() - D::from_secs(age))
                .unwrap();
            digests.push(d);
        }
        let oldest = store.content_path(&digests[0]);
        let _pin = store.pin(&oldest);
        let bounds = Bounds {
            max_size: Some(2500),
            min_free: None,
        };
        let report = evict(&store, &bounds).unwrap();
        assert_eq!(report.removed, 1);
        assert!(oldest.exists(), "the pinned oldest object was evicted");
        assert!(
            !store.content_path(&digests[1]).exists(),
            "the oldest unpinned goes"
        );
        assert!(store.content_path(&digests[2]).exists());
    }

    #[test]
    fn need_has_watermarks() {
        let b = Bounds {
            max_size: Some(1000),
            min_free: None,
        };
        assert_eq!(b.need(900, None), 0);
        assert_eq!(b.need(1000, None), 0);
        assert_eq!(b.need(1001, None), 101);
        let f = Bounds {
            max_size: None,
            min_free: Some(1000),
        };
        assert_eq!(f.need(5, Some(2000)), 0);
        assert_eq!(f.need(5, Some(500)), 600);
    }
}
