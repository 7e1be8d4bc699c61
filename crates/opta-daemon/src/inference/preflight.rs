//! The daemon-wide cache of the loaded-model list used by the pre-turn check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::{InferenceError, LmxClient, ModelList};

struct Cached {
    fetched: Instant,
    generation: u64,
    list: Arc<ModelList>,
}

/// Caches the model list for a TTL. Concurrent callers on a cold cache share one request (the
/// first fetches while the others wait on the lock, then read its result); `invalidate` is
/// lock-free so a failing turn never waits on a slow fetch to drop the cache.
pub struct PreflightCache {
    ttl: Duration,
    generation: AtomicU64,
    slot: Mutex<Option<Cached>>,
}

impl std::fmt::Debug for PreflightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreflightCache")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl PreflightCache {
    /// A cache keeping lists for `ttl` (zero disables caching).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            generation: AtomicU64::new(0),
            slot: Mutex::new(None),
        }
    }

    /// The loaded models, from the cache when fresh.
    pub async fn models(&self, lmx: &LmxClient) -> Result<Arc<ModelList>, InferenceError> {
        let mut slot = self.slot.lock().await;
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(cached) = slot.as_ref()
            && cached.generation == generation
            && cached.fetched.elapsed() < self.ttl
        {
            return Ok(cached.list.clone());
        }
        let list = Arc::new(lmx.list_models().await?);
        *slot = Some(Cached {
            fetched: Instant::now(),
            generation,
            list: list.clone(),
        });
        Ok(list)
    }

    /// Drops the cached list; the next call asks the server again.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}
