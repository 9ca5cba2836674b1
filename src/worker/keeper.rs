//! Which models stay loaded: a model unused for the keep-alive (`worker.keepAliveMs`) is
//! unloaded, and a load that would take the loaded models' weights past the memory budget
//! (`worker.modelMemoryBytes`, by default the memory the hardware plan makes available) first
//! unloads idle models, least recently used first, or is refused with
//! `RESOURCE_LIMIT_EXCEEDED`, naming the figures. A model is *in use* while a request holds it
//! ([`InUse`]); preloaded models stay loaded. Every unload is logged with its reason and
//! counted (`mlx_worker_model_unloads_total{model,reason}`).
//!
//! Sizes are the models' bytes on disk, which is what their weights take once loaded; the
//! engine's own health says which models are loaded (a runtime restart unloads them all).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::engine::{Catalog, Engine, EngineError, EngineHealth};
use crate::metrics::telemetry::Telemetry;

/// Why a model was unloaded, as the metric's `reason` label says.
pub(crate) const IDLE: &str = "idle";
/// See [`IDLE`].
pub(crate) const EVICTED: &str = "evicted";
/// See [`IDLE`]: an operator asked, on the control subject.
pub(crate) const REQUESTED: &str = "requested";

/// How a model has been used.
#[derive(Clone, Copy, Debug)]
struct Use {
    /// Requests holding it now.
    holders: usize,
    /// When the last holder let go (or took it).
    last: Instant,
}

/// The keeper's settings and what it knows of each model's use.
pub(crate) struct Keeper {
    uses: Mutex<HashMap<String, Use>>,
    /// Models that never go idle: the preloaded ones.
    kept: BTreeSet<String>,
    /// Models pinned on the control subject: kept too.
    pinned: Mutex<BTreeSet<String>>,
    keep_alive: Option<Duration>,
    budget: u64,
    catalogs: watch::Receiver<Catalog>,
    telemetry: Arc<Telemetry>,
    /// One load's room-making at a time, so two loads cannot both count on the same room.
    making_room: tokio::sync::Mutex<()>,
}

impl Keeper {
    /// A keeper: `kept` models stay loaded, others go after `keep_alive` unused (never when
    /// `None`); the loaded models' bytes stay within `budget`.
    pub(crate) fn new(
        kept: impl IntoIterator<Item = String>,
        keep_alive: Option<Duration>,
        budget: u64,
        catalogs: watch::Receiver<Catalog>,
        telemetry: Arc<Telemetry>,
    ) -> Keeper {
        Keeper {
            uses: Mutex::new(HashMap::new()),
            kept: kept.into_iter().collect(),
            pinned: Mutex::default(),
            keep_alive,
            budget,
            catalogs,
            telemetry,
            making_room: tokio::sync::Mutex::new(()),
        }
    }

    fn uses(&self) -> MutexGuard<'_, HashMap<String, Use>> {
        self.uses.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pins(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.pinned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `model` stays loaded whatever its use: preloaded or pinned.
    fn is_kept(&self, model: &str) -> bool {
        self.kept.contains(model) || self.pins().contains(model)
    }

    /// Whether `model` was preloaded.
    pub(crate) fn is_preloaded(&self, model: &str) -> bool {
        self.kept.contains(model)
    }

    /// Whether `model` is pinned.
    pub(crate) fn is_pinned(&self, model: &str) -> bool {
        self.pins().contains(model)
    }

    /// Pins `model` (kept loaded) or unpins it.
    pub(crate) fn pin(&self, model: &str, pinned: bool) {
        if pinned {
            self.pins().insert(model.to_owned());
        } else {
            self.pins().remove(model);
        }
    }

    /// Records that `model` loaded at `now`: its keep-alive runs from here when no request
    /// holds it (a load on the control subject, a retry).
    pub(crate) fn loaded_at(&self, model: &str, now: Instant) {
        self.uses().entry(model.to_owned()).or_insert(Use {
            holders: 0,
            last: now,
        });
    }

    /// Requests using `model` now.
    pub(crate) fn holders(&self, model: &str) -> usize {
        self.uses().get(model).map_or(0, |u| u.holders)
    }

    /// Unloads `model` because an operator asked: refused while a request uses it. The model
    /// is unpinned.
    pub(crate) async fn unload(
        &self,
        engine: &Arc<dyn Engine>,
        model: &str,
    ) -> Result<(), EngineError> {
        let _guard = self.making_room.lock().await;
        let holders = self.holders(model);
        if holders > 0 {
            return Err(EngineError::Rejected {
                reason: format!(
                    "model {model:?} serves {holders} request(s); unload it once they have ended"
                ),
            });
        }
        self.pin(model, false);
        if !loaded(engine).contains(model) {
            return Ok(());
        }
        engine.unload(model).await?;
        self.unloaded(model, REQUESTED);
        info!(%model, "model unloaded on request");
        Ok(())
    }

    /// Marks `model` in use until the returned guard is dropped.
    pub(crate) fn hold(self: &Arc<Self>, model: &str, clock: &Arc<dyn Clock>) -> InUse {
        let now = clock.now();
        let mut uses = self.uses();
        let entry = uses.entry(model.to_owned()).or_insert(Use {
            holders: 0,
            last: now,
        });
        entry.holders += 1;
        entry.last = now;
        InUse {
            keeper: self.clone(),
            model: model.to_owned(),
            clock: clock.clone(),
        }
    }

    fn size(&self, model: &str) -> u64 {
        self.catalogs
            .borrow()
            .models
            .get(model)
            .map_or(0, |m| m.size_bytes)
    }

    /// Makes room for loading `model`: unloads idle models, least recently used first, until
    /// the loaded models and it fit the budget; refuses when they cannot. A model loaded
    /// already needs no room, and does not wait for another model's load: `None` then.
    /// Otherwise hold the returned guard until the load has ended.
    pub(crate) async fn make_room(
        &self,
        engine: &Arc<dyn Engine>,
        model: &str,
    ) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, EngineError> {
        if loaded(engine).contains(model) {
            return Ok(None);
        }
        let guard = self.making_room.lock().await;
        let loaded = loaded(engine);
        if loaded.contains(model) {
            return Ok(Some(guard));
        }
        let needed = self.size(model);
        let mut held: u64 = loaded.iter().map(|m| self.size(m)).sum();
        if held.saturating_add(needed) <= self.budget {
            return Ok(Some(guard));
        }
        // Least recently used first; a model loaded but never held (its request went away
        // during the load) before any.
        let mut idle: Vec<(Option<Instant>, String)> = {
            let uses = self.uses();
            loaded
                .iter()
                .filter(|m| !self.is_kept(m))
                .filter_map(|m| match uses.get(m) {
                    Some(u) if u.holders > 0 => None,
                    Some(u) => Some((Some(u.last), m.clone())),
                    None => Some((None, m.clone())),
                })
                .collect()
        };
        idle.sort();
        for (_, victim) in idle {
            if held.saturating_add(needed) <= self.budget {
                break;
            }
            let freed = self.size(&victim);
            match engine.unload(&victim).await {
                Ok(()) => {
                    held = held.saturating_sub(freed);
                    self.unloaded(&victim, EVICTED);
                    info!(model = %victim, freed_bytes = freed, for_model = %model, "model unloaded to make room for another");
                }
                Err(err) => {
                    warn!(model = %victim, cause = %err, "cannot unload a model to make room")
                }
            }
        }
        if held.saturating_add(needed) <= self.budget {
            return Ok(Some(guard));
        }
        // What is still loaded after the unloads that went through.
        let busy: Vec<String> = self::loaded(engine).into_iter().collect();
        Err(EngineError::ResourceLimit {
            reason: format!(
                "model {model:?} needs {needed} bytes; the loaded models ({}) hold {held} of \
                 the {} bytes the worker gives models (worker.modelMemoryBytes), and none of \
                 them is idle or they are kept",
                busy.join(", "),
                self.budget
            ),
        })
    }

    /// Unloads the models unused for the keep-alive (not the kept ones, not those in use).
    pub(crate) async fn unload_idle(&self, engine: &Arc<dyn Engine>, now: Instant) {
        let Some(keep_alive) = self.keep_alive else {
            return;
        };
        let _guard = self.making_room.lock().await;
        let idle: Vec<String> = {
            let uses = self.uses();
            loaded(engine)
                .into_iter()
                .filter(|m| !self.is_kept(m))
                .filter(|m| match uses.get(m) {
                    Some(u) => {
                        u.holders == 0 && now.saturating_duration_since(u.last) >= keep_alive
                    }
                    None => false,
                })
                .collect()
        };
        for model in idle {
            match engine.unload(&model).await {
                Ok(()) => {
                    self.unloaded(&model, IDLE);
                    info!(%model, keep_alive_ms = crate::clock::millis(keep_alive), "model unloaded: unused for its keep-alive");
                }
                Err(err) => warn!(%model, cause = %err, "cannot unload an idle model"),
            }
        }
    }

    /// How often [`Keeper::unload_idle`] should look: a quarter of the keep-alive, within
    /// 100 ms and 30 s; `None` without a keep-alive.
    pub(crate) fn check_every(&self) -> Option<Duration> {
        self.keep_alive
            .map(|k| (k / 4).clamp(Duration::from_millis(100), Duration::from_secs(30)))
    }

    fn unloaded(&self, model: &str, reason: &'static str) {
        self.uses().remove(model);
        self.telemetry.unloaded(model, reason);
    }
}

/// A model held by a request: not idle, not evicted, until dropped.
pub(crate) struct InUse {
    keeper: Arc<Keeper>,
    model: String,
    clock: Arc<dyn Clock>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let now = self.clock.now();
        if let Some(u) = self.keeper.uses().get_mut(&self.model) {
            u.holders = u.holders.saturating_sub(1);
            u.last = now;
        }
    }
}

/// The models the engine has loaded now.
pub(crate) fn loaded(engine: &Arc<dyn Engine>) -> BTreeSet<String> {
    match &*engine.health().borrow() {
        EngineHealth::Up { loaded } => loaded.iter().cloned().collect(),
        _ => BTreeSet::new(),
    }
}
