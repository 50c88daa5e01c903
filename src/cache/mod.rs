//! The content-addressed cache: a cacache store on disk plus the downloads in flight.

pub mod digest;
pub mod evict;
pub mod flight;
pub mod herd;
pub mod keys;
pub mod layout;
pub mod ops;
pub mod store;
pub mod verified;

use std::path::Path;
use std::sync::Arc;

pub use digest::Digest;
pub use flight::{Flight, Flights, Head, Join, State};
pub use store::{accept_class, Entry, ObjectMeta, Origin, Store, StoreError, TagName, TagRecord};

use crate::metrics::Metrics;

/// Manifests above this size are not accepted or parsed (the OCI spec lets registries refuse
/// them too).
pub const MAX_MANIFEST: u64 = 4 << 20;

/// The store and its in-flight downloads, shared by every connection.
#[derive(Clone)]
pub struct Cache {
    /// Verified objects and tag records on disk.
    pub store: Store,
    /// Downloads in progress, one per digest.
    pub flights: Arc<Flights>,
    /// Tag requests to the upstream in progress, one per tag and Accept list.
    pub tags: Arc<herd::Herd>,
}

impl Cache {
    /// Opens the cache in `dir`.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Cache, StoreError> {
        Ok(Cache {
            store: Store::open(dir, metrics)?,
            flights: Arc::new(Flights::default()),
            tags: Arc::default(),
        })
    }

    /// A cached object as a complete flight, ready to be read, if it is on disk.
    pub async fn hit(&self, digest: &Digest) -> Option<(Arc<Flight>, Entry)> {
        let (file, entry) = match self.store.object(digest).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                tracing::debug!(digest = %digest, "cache lookup: not cached");
                return None;
            }
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "cache lookup failed; treating as a miss");
                return None;
            }
        };
        tracing::debug!(digest = %digest, size = entry.meta.size, "cache lookup: cached");
        let pin = self.store.pin(&entry.path);
        let head = Head {
            content_type: entry.meta.content_type.clone(),
            length: Some(entry.meta.size),
        };
        Some((Flight::complete(file, head, entry.meta.size, pin), entry))
    }
}
