//! The content-addressed cache in tiers: a cacache store on disk, then (optionally) an object
//! store the fleet shares, plus the downloads in flight that fill them. Facts that access
//! decisions rest on (where an object came from, which repositories are public) and tag records
//! are written to both tiers, so that the rules hold and tags stay fresh across the fleet.

pub mod digest;
pub mod evict;
pub mod flight;
pub mod herd;
pub mod keys;
pub mod layout;
mod memo;
pub mod ops;
pub mod shared;
pub mod store;
pub mod verified;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use digest::Digest;
pub use flight::{Flight, Flights, Head, Join, State};
pub use shared::SharedTier;
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
    /// The object store the fleet shares, when configured.
    pub shared: Option<Arc<SharedTier>>,
}

/// Where a download's bytes come from; each is verified against the digest all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The registry itself: the fill is uploaded to the shared tier once committed.
    Upstream,
    /// The shared tier (already there).
    Shared,
    /// The fleet member that owns the digest (which uploads it itself).
    Peer,
}

impl Cache {
    /// Opens the cache in `dir`.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Cache, StoreError> {
        Ok(Cache {
            store: Store::open(dir, metrics)?,
            flights: Arc::new(Flights::default()),
            tags: Arc::default(),
            shared: None,
        })
    }

    /// Records, in every tier, that `origin` served `digest` and the bytes verified.
    pub async fn add_source(&self, digest: &Digest, origin: &Origin) {
        self.store.add_source(digest, origin).await;
        if let Some(tier) = &self.shared {
            tier.add_source(digest, origin);
        }
    }

    /// Records in every tier that anonymous clients may pull `repo` on `host`, or no longer.
    pub async fn set_public(&self, host: &str, repo: &str, public: bool) {
        match public {
            true => self.store.set_public(host, repo).await,
            false => self.store.clear_public(host, repo).await,
        }
        if let Some(tier) = &self.shared {
            tier.set_public(host, repo, public);
        }
    }

    /// Whether this node or another of the fleet found `repo` on `host` public.
    pub async fn is_public(&self, host: &str, repo: &str) -> bool {
        if self.store.is_public(host, repo).await {
            return true;
        }
        match &self.shared {
            Some(tier) => tier.is_public(host, repo).await,
            None => false,
        }
    }

    /// The freshest record of a tag in any tier, and its age; a record another node confirmed
    /// more recently than this one did is copied to disk with its own age.
    pub async fn tag(
        &self,
        name: &TagName<'_>,
        fresh_for: Duration,
    ) -> Option<(TagRecord, Duration)> {
        let local = self.store.tag(name).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "tag lookup failed; treating as a miss");
            None
        });
        if local.as_ref().is_some_and(|(_, age)| *age < fresh_for) || self.shared.is_none() {
            return local;
        }
        // Boxed: a fresh local record, the common case, should not carry the tier's future.
        Box::pin(self.tag_from_tier(name, local)).await
    }

    /// The shared tier's record of a tag when it is newer than `local`, recorded locally too.
    async fn tag_from_tier(
        &self,
        name: &TagName<'_>,
        local: Option<(TagRecord, Duration)>,
    ) -> Option<(TagRecord, Duration)> {
        let Some(tier) = &self.shared else {
            return local;
        };
        let Some((record, checked_ms)) = tier.tag(name).await else {
            return local;
        };
        let age = shared::age_of(checked_ms);
        if local.as_ref().is_some_and(|(_, mine)| *mine <= age) {
            return local;
        }
        tracing::debug!(tag = name.tag, ?age, "tag record from the shared store");
        if let Err(e) = self.store.set_tag_checked(name, &record, checked_ms).await {
            tracing::warn!(error = %e, "cannot record a tag");
        }
        Some((record, age))
    }

    /// Records in every tier where a tag points, confirmed now.
    pub async fn set_tag(&self, name: &TagName<'_>, record: &TagRecord) {
        if let Err(e) = self.store.set_tag(name, record).await {
            tracing::warn!(error = %e, "cannot record a tag");
        }
        if let Some(tier) = &self.shared {
            tier.set_tag(name, record, store::now_ms());
        }
    }

    /// Caches a small verified object (a manifest) that `origin` served, in every tier.
    pub async fn put_verified(
        &self,
        digest: &Digest,
        data: &[u8],
        meta: &ObjectMeta,
        origin: &Origin,
    ) {
        // The source first: a hit without it would be taken for another origin's bytes.
        self.add_source(digest, origin).await;
        if let Err(e) = self.store.put(digest, data, meta).await {
            tracing::warn!(error = %e, "cannot cache a manifest");
            return;
        }
        self.after_commit(digest, meta, Source::Upstream);
    }

    /// Hands a verified object committed to disk on to the tiers behind it: an upstream fill
    /// goes up to the shared tier (pinned on disk until it is there).
    pub fn after_commit(&self, digest: &Digest, meta: &ObjectMeta, source: Source) {
        if let (Some(tier), Source::Upstream) = (&self.shared, source) {
            let path = self.store.content_path(digest);
            let pin = self.store.pin(&path);
            tier.upload(digest, path, meta, pin);
        }
    }

    /// The object `digest` from the shared tier, whole, verified and committed to disk, if it
    /// is at most `max` bytes and the tier holds it for `origin` (or for a public origin): what
    /// a manifest named by a tag record needs.
    pub async fn pull_small(
        &self,
        digest: &Digest,
        origin: &Origin,
        max: u64,
    ) -> Option<Arc<Flight>> {
        let tier = self.shared.as_ref()?;
        let from = shared_origin(self, tier, digest, origin).await?;
        let (content_type, data) = tier.small_object(digest, max).await?;
        let mut hasher = digest.hasher();
        hasher.update(&data);
        if !hasher.matches(digest) {
            tier.forget(digest);
            return None;
        }
        let meta = ObjectMeta {
            content_type,
            size: data.len() as u64,
        };
        self.store.add_source(digest, &from).await;
        if let Err(e) = self.store.put(digest, &data, &meta).await {
            tracing::warn!(error = %e, "cannot cache a manifest");
        }
        self.hit(digest).await
    }

    /// A cached object as a complete flight, ready to be read, if it is on disk.
    pub async fn hit(&self, digest: &Digest) -> Option<Arc<Flight>> {
        if let Some(flight) = self.store.remembered(digest) {
            return Some(flight);
        }
        let (file, entry, small) = match self.store.object(digest).await {
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
        let head = head_of(&entry);
        if let Some(data) = small {
            // One flight in memory for every hit while the store remembers it: a hit then
            // builds nothing, and reads no file, so it pins none.
            let flight = Flight::in_memory(data, head);
            self.store.remember(digest, flight.clone());
            return Some(flight);
        }
        let pin = self.store.pin(&entry.path);
        Some(Flight::complete(file, head, entry.meta.size, pin))
    }
}

/// The head a cached object is answered with.
fn head_of(entry: &Entry) -> Head {
    Head {
        content_type: entry.meta.content_type.clone(),
        length: Some(entry.meta.size),
    }
}

/// The origin a shared-tier copy of `digest` may be taken for when `asked` wants it: `asked`
/// itself if the fleet recorded it, else a recorded origin the fleet found public; `None` when
/// the tier holds it only for private origins other than `asked` (which must serve its own).
pub async fn shared_origin(
    cache: &Cache,
    tier: &SharedTier,
    digest: &Digest,
    asked: &Origin,
) -> Option<Origin> {
    let sources = tier.sources(digest).await;
    if sources.contains(asked) {
        return Some(asked.clone());
    }
    for source in sources {
        if cache.is_public(&source.host, &source.repo).await {
            return Some(source);
        }
    }
    None
}
