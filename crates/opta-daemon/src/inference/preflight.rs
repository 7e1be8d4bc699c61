//! The daemon-wide cache of the loaded-model list used by the pre-turn check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::{InferenceError, LmxClient, ModelList};

type Fetch = Shared<BoxFuture<'static, Result<Arc<ModelList>, InferenceError>>>;

struct Cached {
    fetched: Instant,
    generation: u64,
    list: Arc<ModelList>,
}

#[derive(Default)]
struct Slot {
    cached: Option<Cached>,
    /// The request every caller on a cold cache shares, with the generation it serves.
    in_flight: Option<(u64, Fetch)>,
}

/// Caches the model list for a TTL. Callers on a cold cache share one in-flight request and
/// its outcome, failure included (so N waiters on a server that does not answer all fail after
/// one timeout, not one after another); a failure is never cached beyond that request.
/// `invalidate` is lock-free, so a failing turn never waits on a slow fetch to drop the cache.
pub struct PreflightCache {
    ttl: Duration,
    generation: AtomicU64,
    slot: Mutex<Slot>,
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
            slot: Mutex::new(Slot::default()),
        }
    }

    /// The loaded models, from the cache when fresh, else from the shared request.
    pub async fn models(&self, lmx: &LmxClient) -> Result<Arc<ModelList>, InferenceError> {
        let (generation, fetch) = {
            // Held only for these few lines, never across an await.
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            let generation = self.generation.load(Ordering::Acquire);
            if let Some(cached) = &slot.cached
                && cached.generation == generation
                && cached.fetched.elapsed() < self.ttl
            {
                return Ok(cached.list.clone());
            }
            let fetch = match &slot.in_flight {
                Some((g, fetch)) if *g == generation => fetch.clone(),
                _ => {
                    let lmx = lmx.clone();
                    let fetch = async move { lmx.list_models().await.map(Arc::new) }
                        .boxed()
                        .shared();
                    slot.in_flight = Some((generation, fetch.clone()));
                    fetch
                }
            };
            (generation, fetch)
        };
        let result = fetch.clone().await;
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot
            .in_flight
            .as_ref()
            .is_some_and(|(_, current)| current.ptr_eq(&fetch))
        {
            slot.in_flight = None;
            if let Ok(list) = &result {
                slot.cached = Some(Cached {
                    fetched: Instant::now(),
                    generation,
                    list: list.clone(),
                });
            }
        }
        result
    }

    /// Drops the cached list; the next call asks the server again.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}
