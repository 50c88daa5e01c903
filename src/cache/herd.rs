//! Single flight for work whose result lands in the store, such as a tag's upstream request:
//! one caller per key leads, the others wait for it to finish and then look in the store again.
//! A leader that fails leaves its followers to try for themselves.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use tokio::sync::watch;

/// The keys being worked on now.
#[derive(Default)]
pub struct Herd {
    running: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// Whose turn it is for a key.
pub enum Turn {
    /// Nobody is working on it: the caller does, until the guard is dropped.
    Lead(Lead),
    /// Someone is: wait with [`Follow::finished`], then look again.
    Follow(Follow),
}

/// Held by the one caller working on a key.
pub struct Lead {
    herd: Arc<Herd>,
    key: String,
    // Dropped after the key is out of the map, which wakes the followers.
    _done: watch::Sender<()>,
}

/// A wait for another caller's work on the same key.
pub struct Follow(watch::Receiver<()>);

impl Herd {
    /// Leads the work on `key`, or follows whoever already does.
    pub fn turn(self: &Arc<Self>, key: String) -> Turn {
        let mut running = self.running.lock();
        if let Some(rx) = running.get(&key) {
            return Turn::Follow(Follow(rx.clone()));
        }
        let (tx, rx) = watch::channel(());
        running.insert(key.clone(), rx);
        Turn::Lead(Lead {
            herd: self.clone(),
            key,
            _done: tx,
        })
    }
}

impl Follow {
    /// Returns once the leader has finished, however it did.
    pub async fn finished(mut self) {
        while self.0.changed().await.is_ok() {}
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let mut running = self.herd.running.lock();
        running.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_leads_the_others_wait_for_it() {
        let herd = Arc::new(Herd::default());
        let Turn::Lead(lead) = herd.turn("k".into()) else {
            panic!("the first caller must lead");
        };
        let Turn::Follow(follow) = herd.turn("k".into()) else {
            panic!("a second caller must follow");
        };
        assert!(matches!(herd.turn("other".into()), Turn::Lead(_)));
        let waiting = tokio::spawn(follow.finished());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the follower did not wait");
        drop(lead);
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the follower was not woken")
            .unwrap();
        assert!(matches!(herd.turn("k".into()), Turn::Lead(_)));
    }
}
