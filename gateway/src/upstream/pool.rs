//! Backend pools, with API Management's semantics: members have a priority and a weight; traffic
//! goes to the lowest priority group that has an available member (circuit breaker not open),
//! spread within the group by smooth weighted round-robin. A request that fails on one member is
//! retried on the next available one (see `Pipeline::forward`), never twice on the same member.
//!
//! An API's `backend` and `set-backend-service`'s `backend-id` name a [`Target`]: a backend or a
//! pool (the ids share one namespace).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::config::{ConfigError, PoolConfig};
use crate::upstream::backend::Backend;
use crate::upstream::circuit::{Health, Permit};

/// Where a request is sent: one backend, or a pool of them.
#[derive(Clone)]
pub enum Target {
    Backend(Arc<Backend>),
    Pool(Arc<Pool>),
}

impl Target {
    pub fn id(&self) -> &str {
        match self {
            Self::Backend(backend) => &backend.id,
            Self::Pool(pool) => &pool.id,
        }
    }

    /// Backends one request may try.
    pub fn max_attempts(&self) -> usize {
        match self {
            Self::Backend(_) => 1,
            Self::Pool(pool) => pool.max_attempts,
        }
    }

    fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        let (single, members) = match self {
            Self::Backend(backend) => (Some(backend), None),
            Self::Pool(pool) => (None, Some(pool.members.iter().map(|m| &m.backend))),
        };
        single.into_iter().chain(members.into_iter().flatten())
    }

    /// The backend for the next attempt, with its circuit breaker's leave to send; `None` when
    /// every backend not yet `tried` by this request is unavailable. Adds the pick to `tried`.
    pub fn next<'a>(&'a self, tried: &mut Vec<usize>) -> Option<(&'a Arc<Backend>, Permit<'a>)> {
        loop {
            let (index, backend) = match self {
                Self::Backend(backend) => Some((0, backend)),
                Self::Pool(pool) => pool.pick(tried).map(|i| (i, &pool.members[i].backend)),
            }
            .filter(|(index, _)| !tried.contains(index))?;
            tried.push(index);
            // Available a moment ago, but another request may have taken the half-open probe.
            if let Some(permit) = backend.circuit.try_acquire() {
                return Some((backend, permit));
            }
        }
    }

    /// Whether some backend can take a request now (or is half-open, about to be probed).
    pub fn available(&self) -> bool {
        self.backends().any(|b| b.health().available())
    }

    /// Seconds until the soonest backend may be tried again, for `Retry-After` (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        // A half-open backend already being probed may be back as soon as the probe answers.
        let soonest_ms = self.backends().map(|b| b.health().retry_in_ms.unwrap_or(1_000)).min().unwrap_or(1_000);
        soonest_ms.div_ceil(1_000).max(1)
    }
}

pub struct Pool {
    pub id: String,
    members: Vec<Member>,
    max_attempts: usize,
    rotation: Mutex<Rotation>,
}

struct Member {
    backend: Arc<Backend>,
    priority: u32,
}

impl Pool {
    /// Builds a pool from validated config (every member names a backend).
    pub fn from_config(
        id: &str,
        config: &PoolConfig,
        backends: &BTreeMap<String, Arc<Backend>>,
    ) -> Result<Self, ConfigError> {
        let mut members = Vec::with_capacity(config.members.len());
        for (i, member) in config.members.iter().enumerate() {
            let backend = backends.get(&member.backend).ok_or_else(|| {
                ConfigError::at(
                    format!("pools.{id}.members[{i}].backend"),
                    format!("unknown backend {:?}", member.backend),
                )
            })?;
            members.push(Member { backend: backend.clone(), priority: member.priority });
        }
        let weights = config.members.iter().map(|m| i64::from(m.weight)).collect();
        Ok(Self {
            id: id.to_owned(),
            members,
            max_attempts: config.attempts(),
            rotation: Mutex::new(Rotation::new(weights)),
        })
    }

    /// The member for the next attempt: in the lowest priority group with an available member
    /// not yet tried, by smooth weighted round-robin within the group.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let eligible: Vec<bool> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| !tried.contains(&i) && m.backend.health().available())
            .collect();
        let priority = self.members.iter().zip(&eligible).filter(|(_, ok)| **ok).map(|(m, _)| m.priority).min()?;
        let mut rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        rotation.pick(|i| eligible[i] && self.members[i].priority == priority)
    }
}

/// Smooth weighted round-robin (as nginx does it): each pick adds every candidate's weight to its
/// running score, takes the highest, and subtracts the candidates' total from it. Over any run of
/// picks among the same candidates each gets its weight's share, interleaved rather than in bursts,
/// and the order is deterministic.
struct Rotation {
    weights: Vec<i64>,
    scores: Vec<i64>,
}

impl Rotation {
    fn new(weights: Vec<i64>) -> Self {
        let scores = vec![0; weights.len()];
        Self { weights, scores }
    }

    fn pick(&mut self, candidate: impl Fn(usize) -> bool) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<usize> = None;
        for i in (0..self.weights.len()).filter(|i| candidate(*i)) {
            self.scores[i] += self.weights[i];
            total += self.weights[i];
            if best.is_none_or(|b| self.scores[i] > self.scores[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.scores[best] -= total;
        Some(best)
    }
}

/// Builds every target: each backend under its own id, and each pool.
pub fn targets(
    backends: &BTreeMap<String, Arc<Backend>>,
    pools: &BTreeMap<String, PoolConfig>,
) -> Result<BTreeMap<String, Target>, ConfigError> {
    let mut targets: BTreeMap<String, Target> =
        backends.iter().map(|(id, backend)| (id.clone(), Target::Backend(backend.clone()))).collect();
    for (id, config) in pools {
        targets.insert(id.clone(), Target::Pool(Arc::new(Pool::from_config(id, config, backends)?)));
    }
    Ok(targets)
}

/// `/ready`'s view of one backend.
#[derive(Serialize)]
pub struct BackendStatus<'a> {
    id: &'a str,
    state: &'static str,
    failures: u64,
    trips: u64,
    retry_in_secs: Option<u64>,
}

impl<'a> BackendStatus<'a> {
    fn new(id: &'a str, health: Health) -> Self {
        Self {
            id,
            state: health.state.name(),
            failures: health.failures,
            trips: health.trips,
            retry_in_secs: health.retry_in_ms.map(|ms| ms.div_ceil(1_000)),
        }
    }
}

/// `/ready`'s view of one pool.
#[derive(Serialize)]
pub struct PoolStatus<'a> {
    id: &'a str,
    /// Some member can take traffic.
    available: bool,
    members: Vec<&'a str>,
}

/// The health of every backend and pool; `degraded` when some pool has no available member.
pub struct Readiness<'a> {
    pub degraded: bool,
    pub backends: Vec<BackendStatus<'a>>,
    pub pools: Vec<PoolStatus<'a>>,
}

pub fn readiness(targets: &BTreeMap<String, Target>) -> Readiness<'_> {
    let mut report = Readiness { degraded: false, backends: Vec::new(), pools: Vec::new() };
    for target in targets.values() {
        match target {
            Target::Backend(backend) => report.backends.push(BackendStatus::new(&backend.id, backend.health())),
            Target::Pool(pool) => {
                let available = target.available();
                report.degraded |= !available;
                let members = pool.members.iter().map(|m| m.backend.id.as_str()).collect();
                report.pools.push(PoolStatus { id: &pool.id, available, members });
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::upstream::circuit::Attempt;

    /// A pool over east (priority 1, weight 1), west (priority 1, weight 3) and spare (priority 2),
    /// each tripping for a minute on its first failure.
    fn pool() -> (Target, BTreeMap<String, Arc<Backend>>) {
        let backend = |id: &str| {
            format!(
                "[backends.{id}]\nurl = \"http://127.0.0.1:9/v1\"\nkind = \"openai\"\n\
                 circuit-breaker = {{ failure-count = 1, trip-secs = 60 }}\n"
            )
        };
        let text = format!(
            "{}{}{}\n[pools.llm]\nmembers = [{{ backend = \"east\" }}, {{ backend = \"west\", weight = 3 }}, \
             {{ backend = \"spare\", priority = 2 }}]\n\n[apis.a]\nkind = \"openai\"\nbackend = \"llm\"\n\
             subscription-required = false\n",
            backend("east"),
            backend("west"),
            backend("spare"),
        );
        let config = Config::parse(&text, &|_| None).expect("valid config");
        let backends: BTreeMap<String, Arc<Backend>> = config
            .backends
            .iter()
            .map(|(id, c)| (id.clone(), Arc::new(Backend::from_config(id, c, &|_| None).expect("backend"))))
            .collect();
        let targets = targets(&backends, &config.pools).expect("targets");
        (targets["llm"].clone(), backends)
    }

    /// The backend the next request's first attempt goes to (reported as a success).
    fn first_pick(pool: &Target) -> String {
        let (backend, permit) = pool.next(&mut Vec::new()).expect("a backend");
        permit.record(&Attempt::Response(http::StatusCode::OK, &http::HeaderMap::new()));
        backend.id.clone()
    }

    #[test]
    fn traffic_stays_in_the_first_priority_group_by_weight_and_fails_over_when_it_is_tripped() {
        let (pool, backends) = pool();
        let picks: Vec<String> = (0..8).map(|_| first_pick(&pool)).collect();
        assert_eq!(picks.iter().filter(|id| *id == "east").count(), 2, "{picks:?}");
        assert_eq!(picks.iter().filter(|id| *id == "west").count(), 6, "{picks:?}");

        // One request: each member at most once, best group first, and then nothing.
        let mut tried = Vec::new();
        let mut order = Vec::new();
        while let Some((backend, _permit)) = pool.next(&mut tried) {
            order.push(backend.id.clone());
        }
        assert_eq!(order.len(), 3, "{order:?}");
        assert_eq!(order[2], "spare", "the lower group only after the whole first group: {order:?}");

        let trip = |id: &str| {
            backends[id].circuit.try_acquire().expect("closed").record(&Attempt::TransportError);
        };
        trip("west");
        assert!((0..5).all(|_| first_pick(&pool) == "east"));
        trip("east");
        assert!(pool.available());
        assert!((0..5).all(|_| first_pick(&pool) == "spare"), "failover to priority 2");
        trip("spare");
        assert!(!pool.available());
        assert!(pool.next(&mut Vec::new()).is_none());
        assert_eq!(pool.retry_after_secs(), 60);
        let targets = [("llm".to_owned(), pool.clone())].into_iter().collect();
        assert!(readiness(&targets).degraded);
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_by_weight() {
        let mut rotation = Rotation::new(vec![5, 1, 1]);
        let picks: Vec<usize> = (0..7).map(|_| rotation.pick(|_| true).expect("a pick")).collect();
        // nginx's documented sequence for weights 5, 1, 1: a a b a c a a.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn shares_match_the_weights_exactly_over_whole_cycles() {
        let mut rotation = Rotation::new(vec![1, 2, 3]);
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[rotation.pick(|_| true).expect("a pick")] += 1;
        }
        assert_eq!(counts, [100, 200, 300]);
    }

    #[test]
    fn only_candidates_are_picked_and_none_means_none() {
        let mut rotation = Rotation::new(vec![1, 2, 3]);
        for _ in 0..10 {
            assert_ne!(rotation.pick(|i| i != 2), Some(2));
        }
        let mut counts = [0; 3];
        for _ in 0..30 {
            counts[rotation.pick(|i| i != 2).expect("a pick")] += 1;
        }
        assert_eq!(counts, [10, 20, 0], "1:2 between the two candidates");
        assert_eq!(rotation.pick(|_| false), None);
    }
}
