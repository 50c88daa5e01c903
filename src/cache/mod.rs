//! The content-addressed cache: a cacache store on disk plus the downloads in flight.

pub mod digest;
pub mod flight;
pub mod store;

use std::path::Path;
use std::sync::Arc;

pub use digest::Digest;
pub use flight::{Flight, Flights, Head, Join, State};
pub use store::{Entry, ObjectMeta, Store, StoreError, TagName, TagRecord};

/// The store and its in-flight downloads, shared by every connection.
#[derive(Clone)]
pub struct Cache {
    /// Verified objects and tag records on disk.
    pub store: Store,
    /// Downloads in progress, one per digest.
    pub flights: Arc<Flights>,
}

impl Cache {
    /// Opens the cache in `dir`.
    pub fn open(dir: &Path) -> Result<Cache, StoreError> {
        Ok(Cache {
            store: Store::open(dir)?,
            flights: Arc::new(Flights::default()),
        })
    }

    /// A cached object as a complete flight, ready to be read, if it is on disk.
    pub async fn hit(&self, digest: &Digest) -> Option<(Arc<Flight>, Entry)> {
        let entry = match self.store.object(digest).await {
            Ok(e) => e?,
            Err(e) => {
                tracing::warn!(digest = %digest, error = %e, "cache lookup failed; treating as a miss");
                return None;
            }
        };
        let file = tokio::fs::File::open(&entry.path)
            .await
            .ok()?
            .into_std()
            .await;
        let head = Head {
            content_type: entry.meta.content_type.clone(),
            length: Some(entry.meta.size),
        };
        Some((Flight::complete(file, head, entry.meta.size), entry))
    }
}
