//! Computed views (pipeline boards, timeline pages) shared between requests:
//! one computation per state of the read models they are read from, and,
//! while those read models move, the newest view computed for the same
//! parameters answering (within [`ViewSettings::max_staleness`]) while a
//! fresher one is computed in the background.

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crm_service_kit::problem::Problem;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;

use crate::state::JsonBody;

/// Where one read model stood when a view was read from it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ReadAt {
    pub generation: i64,
    pub checkpoint: i64,
}

/// How stale a view may be when it answers a request without waiting.
#[derive(Clone, Copy, Debug)]
pub struct ViewSettings {
    /// Oldest view (counted from the start of its computation) that may answer
    /// a request which found the read models further on. A request whose
    /// `min_position` the view does not reach always waits for a fresh one.
    pub max_staleness: Duration,
    /// A view younger than this answers without starting a fresher
    /// computation: while a read model folds, each fold would otherwise start
    /// one per view.
    pub refresh_after: Duration,
    /// Background computations in flight at once in one cache. A request
    /// that finds them all busy is answered by its stand-in and starts none:
    /// while a read model folds, 85 timeline pages refreshing on their own
    /// took the CPUs and read connections from the folds and the requests.
    pub max_refreshes: usize,
}

/// A view may be 1 s old. A client that must see its own write passes the
/// position it was given (`min_position`), which no stale view stands in for.
pub const VIEW_MAX_STALENESS: Duration = Duration::from_secs(1);

/// At most about two computations of one view per second while its read
/// model moves: half the staleness allowed, so a stand-in is renewed before it
/// ages out as long as a computation takes under 500 ms.
pub const VIEW_REFRESH_AFTER: Duration = Duration::from_millis(500);

/// Background computations per cache at once (one per CPU of the machines
/// this runs on; a request never waits for them).
pub const VIEW_MAX_REFRESHES: usize = 2;

impl Default for ViewSettings {
    fn default() -> Self {
        Self {
            max_staleness: VIEW_MAX_STALENESS,
            refresh_after: VIEW_REFRESH_AFTER,
            max_refreshes: VIEW_MAX_REFRESHES,
        }
    }
}

impl ViewSettings {
    /// Every request answered by a view of the read models as it found them.
    pub fn always_fresh() -> Self {
        Self {
            max_staleness: Duration::ZERO,
            refresh_after: Duration::ZERO,
            max_refreshes: VIEW_MAX_REFRESHES,
        }
    }
}

/// The newest view computed for one set of parameters.
#[derive(Debug)]
struct Newest<const N: usize> {
    at: [ReadAt; N],
    started: Instant,
    body: JsonBody,
}

/// Views with parameters `P`, each read from `N` read models.
#[derive(Clone, Debug)]
pub struct ViewCache<P, const N: usize>
where
    P: Clone + Hash + Eq + Send + Sync + 'static,
{
    /// By the read models' exact state: concurrent misses share the one
    /// computation in flight.
    exact: moka::future::Cache<(P, [ReadAt; N]), JsonBody>,
    newest: moka::future::Cache<P, Arc<Newest<N>>>,
    /// Parameters whose background refresh is in flight (one at a time each,
    /// at most `settings.max_refreshes` in all).
    refreshing: Arc<Mutex<HashSet<P>>>,
    settings: ViewSettings,
}

fn by_bytes<K, V>(max_bytes: u64, bytes: fn(&V) -> usize) -> moka::future::Cache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::future::Cache::builder()
        .weigher(move |_key, value: &V| u32::try_from(bytes(value)).unwrap_or(u32::MAX))
        .max_capacity(max_bytes)
        // Least recently used goes first. The default (TinyLFU) admits a new
        // entry into a full cache only if it was asked for more often than
        // the one it would evict: once a moving read model has filled the
        // cache with views of past checkpoints, the views of the current one
        // were refused and every request computed its own.
        .eviction_policy(EvictionPolicy::lru())
        .time_to_live(Duration::from_secs(60))
        .build()
}

impl<P, const N: usize> ViewCache<P, N>
where
    P: Clone + Hash + Eq + Send + Sync + 'static,
{
    /// A cache holding at most `max_bytes` of JSON in each of its two maps (a
    /// body in both is one allocation, shared).
    pub fn new(max_bytes: u64, settings: ViewSettings) -> Self {
        Self {
            exact: by_bytes(max_bytes, |body: &JsonBody| body.0.len()),
            newest: by_bytes(max_bytes, |newest: &Arc<Newest<N>>| newest.body.0.len()),
            refreshing: Arc::default(),
            settings,
        }
    }

    /// The view with `params` for read models found at `at`, computed by
    /// `compute` unless one computed at `at` is cached, or a recent enough one
    /// that reaches `min_position` may stand in for it.
    pub async fn get<F>(
        &self,
        params: P,
        at: [ReadAt; N],
        min_position: i64,
        compute: F,
    ) -> Result<JsonBody, Problem>
    where
        F: Future<Output = Result<JsonBody, Problem>> + Send + 'static,
    {
        let key = (params, at);
        if let Some(body) = self.exact.get(&key).await {
            return Ok(body);
        }
        if let Some(newest) = self.newest.get(&key.0).await {
            let age = newest.started.elapsed();
            if age <= self.settings.max_staleness && stands_in(&newest.at, &at, min_position) {
                if age >= self.settings.refresh_after && is_behind(&newest.at, &at) {
                    self.refresh(key, compute);
                }
                return Ok(newest.body.clone());
            }
        }
        self.compute(key, compute).await
    }

    /// Bytes held by the exact and the newest map, after pending evictions.
    #[cfg(test)]
    async fn held_bytes(&self) -> (u64, u64) {
        self.exact.run_pending_tasks().await;
        self.newest.run_pending_tasks().await;
        (self.exact.weighted_size(), self.newest.weighted_size())
    }

    /// Forgets the views that answer for newer states (a client was just told
    /// where the read models stand and must not read older views next).
    pub fn forget_stand_ins(&self) {
        self.newest.invalidate_all();
    }

    async fn compute<F>(&self, key: (P, [ReadAt; N]), compute: F) -> Result<JsonBody, Problem>
    where
        F: Future<Output = Result<JsonBody, Problem>> + Send + 'static,
    {
        let newest = self.newest.clone();
        let (params, at) = key.clone();
        self.exact
            .try_get_with(key, async move {
                let started = Instant::now();
                let body = compute.await?;
                let computed = Arc::new(Newest {
                    at,
                    started,
                    body: body.clone(),
                });
                newest
                    .entry(params)
                    .and_compute_with(|held| {
                        // One computed at the same state replaces it: as new
                        // as the read models, and younger.
                        let keep = held.is_some_and(|held| is_ahead(&held.value().at, &at));
                        std::future::ready(if keep { Op::Nop } else { Op::Put(computed) })
                    })
                    .await;
                Ok(body)
            })
            .await
            .map_err(|problem| Problem::clone(&problem))
    }

    fn refresh<F>(&self, key: (P, [ReadAt; N]), compute: F)
    where
        F: Future<Output = Result<JsonBody, Problem>> + Send + 'static,
    {
        let mut refreshing = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        if refreshing.len() >= self.settings.max_refreshes || !refreshing.insert(key.0.clone()) {
            return;
        }
        drop(refreshing);
        let cache = self.clone();
        tokio::spawn(async move {
            let _done = Refreshed(&cache.refreshing, key.0.clone());
            if let Err(problem) = cache.compute(key, compute).await {
                tracing::debug!(?problem, "background refresh of a view failed");
            }
        });
    }
}

/// Clears a refresh's mark however the refresh ends.
struct Refreshed<'a, P: Hash + Eq>(&'a Mutex<HashSet<P>>, P);

impl<P: Hash + Eq> Drop for Refreshed<'_, P> {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// Whether a view read at `held` may answer for read models found at `found`:
/// read from the same generations, and far enough for `min_position`.
fn stands_in<const N: usize>(held: &[ReadAt; N], found: &[ReadAt; N], min_position: i64) -> bool {
    held.iter()
        .zip(found)
        .all(|(held, found)| held.generation == found.generation && held.checkpoint >= min_position)
}

/// Whether `found` is further on than `held`, of the same generations (as
/// [`stands_in`] has established).
fn is_behind<const N: usize>(held: &[ReadAt; N], found: &[ReadAt; N]) -> bool {
    held.iter()
        .zip(found)
        .any(|(held, found)| held.checkpoint < found.checkpoint)
}

/// Whether `held` is strictly further on than `computed` (a later generation,
/// or a later checkpoint of the same one), in every read model.
fn is_ahead<const N: usize>(held: &[ReadAt; N], computed: &[ReadAt; N]) -> bool {
    let key = |at: &ReadAt| (at.generation, at.checkpoint);
    held != computed && held.iter().zip(computed).all(|(h, c)| key(h) >= key(c))
}

#[cfg(test)]
mod tests {
    use super::{ReadAt, ViewCache, ViewSettings};
    use crate::state::JsonBody;
    use crm_service_kit::problem::Problem;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::Notify;

    fn at(checkpoint: i64) -> [ReadAt; 1] {
        [ReadAt {
            generation: 1,
            checkpoint,
        }]
    }

    fn body(text: &str) -> JsonBody {
        JsonBody(text.to_string().into_bytes().into())
    }

    fn text(body: JsonBody) -> String {
        String::from_utf8(body.0.to_vec()).unwrap()
    }

    /// Stale views may stand in for an hour; every one older than nothing is refreshed.
    fn lenient() -> ViewSettings {
        ViewSettings {
            max_staleness: Duration::from_secs(3600),
            refresh_after: Duration::ZERO,
            max_refreshes: usize::MAX,
        }
    }

    async fn ready(text: &'static str) -> Result<JsonBody, Problem> {
        Ok(body(text))
    }

    /// A computation of `text` that ends once `release` is notified.
    fn held(
        release: &Arc<Notify>,
        text: &'static str,
    ) -> impl std::future::Future<Output = Result<JsonBody, Problem>> + Send + 'static {
        let release = release.clone();
        async move {
            release.notified().await;
            Ok(body(text))
        }
    }

    #[tokio::test]
    async fn a_recent_view_answers_while_a_fresher_one_is_computed() {
        let views = ViewCache::<&str, 1>::new(1 << 20, lenient());
        views.get("board", at(10), 0, ready("at 10")).await.unwrap();

        let release = Arc::new(Notify::new());
        let slow = held(&release, "at 20");
        let answer =
            tokio::time::timeout(Duration::from_secs(5), views.get("board", at(20), 0, slow))
                .await
                .expect("the stale view answers without waiting for the computation");
        assert_eq!(text(answer.unwrap()), "at 10");

        release.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let answer = views
                .get("board", at(20), 0, ready("recomputed"))
                .await
                .unwrap();
            if text(answer.clone()) == "at 20" {
                break;
            }
            assert_eq!(text(answer), "at 10");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the background computation never landed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_view_short_of_min_position_never_stands_in() {
        let views = ViewCache::<&str, 1>::new(1 << 20, lenient());
        views.get("board", at(10), 0, ready("at 10")).await.unwrap();
        let answer = views.get("board", at(20), 11, ready("at 20")).await;
        assert_eq!(text(answer.unwrap()), "at 20");
        // A view at min_position exactly may stand in.
        let answer = views.get("board", at(30), 20, ready("at 30")).await;
        assert_eq!(text(answer.unwrap()), "at 20");
    }

    #[tokio::test]
    async fn a_view_past_its_staleness_or_of_another_generation_is_recomputed() {
        let fresh = ViewCache::<&str, 1>::new(1 << 20, ViewSettings::always_fresh());
        fresh.get("board", at(10), 0, ready("at 10")).await.unwrap();
        let answer = fresh.get("board", at(20), 0, ready("at 20")).await;
        assert_eq!(text(answer.unwrap()), "at 20");

        let views = ViewCache::<&str, 1>::new(1 << 20, lenient());
        views.get("board", at(10), 0, ready("at 10")).await.unwrap();
        let rebuilt = [ReadAt {
            generation: 2,
            checkpoint: 10,
        }];
        let answer = views.get("board", rebuilt, 0, ready("generation 2")).await;
        assert_eq!(text(answer.unwrap()), "generation 2");
    }

    #[tokio::test]
    async fn stale_answers_start_one_refresh_at_a_time() {
        let views = ViewCache::<&str, 1>::new(1 << 20, lenient());
        views.get("board", at(10), 0, ready("at 10")).await.unwrap();
        let computed = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        for checkpoint in 11..61 {
            let computed = computed.clone();
            let release = release.clone();
            let answer = views
                .get("board", at(checkpoint), 0, async move {
                    computed.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                    Ok(body("newer"))
                })
                .await;
            assert_eq!(text(answer.unwrap()), "at 10");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(computed.load(Ordering::SeqCst), 1, "one refresh in flight");
        release.notify_one();
    }

    #[tokio::test]
    async fn each_map_holds_at_most_its_byte_budget_and_uses_it() {
        let budget = 8 * 1024 * 1024;
        let views = ViewCache::<usize, 1>::new(budget, lenient());
        let page = JsonBody(vec![b' '; 64 * 1024].into());
        // Three times the budget in 64 KiB pages.
        for account in 0..3 * budget as usize / (64 * 1024) {
            let page = page.clone();
            views
                .get(account, at(1), 0, async move { Ok(page) })
                .await
                .unwrap();
        }
        let (exact, newest) = views.held_bytes().await;
        for held in [exact, newest] {
            assert!(held <= budget, "{held} bytes held, budget {budget}");
            assert!(
                held >= budget / 2,
                "the budget is used, not a page count: {held} bytes held"
            );
        }
    }

    #[tokio::test]
    async fn views_of_the_current_state_are_kept_after_past_ones_filled_the_cache() {
        let budget = 1024 * 1024;
        let views = ViewCache::<usize, 1>::new(budget, ViewSettings::always_fresh());
        let page = JsonBody(vec![b' '; 16 * 1024].into());
        // A moving read model: each page computed at many checkpoints, asked
        // for more than once at each, until the cache is full of past views.
        for checkpoint in 0..20 {
            for account in 0..40 {
                for _ in 0..3 {
                    let page = page.clone();
                    views
                        .get(account, at(checkpoint), 0, async move { Ok(page) })
                        .await
                        .unwrap();
                }
            }
        }
        // Caught up: each page is computed once at the final checkpoint.
        let computed = Arc::new(AtomicUsize::new(0));
        for _ in 0..5 {
            for account in 0..40 {
                let (computed, page) = (computed.clone(), page.clone());
                views
                    .get(account, at(100), 0, async move {
                        computed.fetch_add(1, Ordering::SeqCst);
                        Ok(page)
                    })
                    .await
                    .unwrap();
            }
            views.held_bytes().await;
        }
        assert_eq!(
            computed.load(Ordering::SeqCst),
            40,
            "one computation per page"
        );
    }

    #[tokio::test]
    async fn a_recomputation_at_the_same_state_renews_the_stand_in() {
        let views = ViewCache::<&str, 1>::new(
            1 << 20,
            ViewSettings {
                max_staleness: Duration::from_millis(200),
                refresh_after: Duration::ZERO,
                max_refreshes: usize::MAX,
            },
        );
        views.get("board", at(10), 0, ready("at 10")).await.unwrap();
        views.exact.invalidate_all();
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Too old to stand in: computed again at the same state.
        let again = views.get("board", at(10), 0, ready("again at 10")).await;
        assert_eq!(text(again.unwrap()), "again at 10");
        // That computation is the stand-in now, young enough for state 11.
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            views.get("board", at(11), 0, std::future::pending()),
        )
        .await
        .expect("answered by the renewed stand-in, not by a computation");
        assert_eq!(text(answer.unwrap()), "again at 10");
    }

    #[tokio::test]
    async fn a_stand_in_younger_than_refresh_after_starts_no_computation() {
        let views = ViewCache::<&str, 1>::new(
            1 << 20,
            ViewSettings {
                max_staleness: Duration::from_secs(3600),
                refresh_after: Duration::from_secs(3600),
                max_refreshes: usize::MAX,
            },
        );
        views.get("board", at(10), 0, ready("at 10")).await.unwrap();
        let computed = Arc::new(AtomicUsize::new(0));
        for checkpoint in 11..21 {
            let counter = computed.clone();
            let answer = views
                .get("board", at(checkpoint), 0, async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(body("newer"))
                })
                .await;
            assert_eq!(text(answer.unwrap()), "at 10");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(computed.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn refreshes_beyond_max_refreshes_are_not_started_until_one_ends() {
        let views = ViewCache::<&str, 1>::new(
            1 << 20,
            ViewSettings {
                max_refreshes: 1,
                ..lenient()
            },
        );
        views.get("a", at(10), 0, ready("a at 10")).await.unwrap();
        views.get("b", at(10), 0, ready("b at 10")).await.unwrap();

        let release = Arc::new(Notify::new());
        let slow = held(&release, "a at 11");
        let answer = views.get("a", at(11), 0, slow).await;
        assert_eq!(text(answer.unwrap()), "a at 10");

        let computed = Arc::new(AtomicUsize::new(0));
        let counting = |computed: &Arc<AtomicUsize>| {
            let computed = computed.clone();
            async move {
                computed.fetch_add(1, Ordering::SeqCst);
                Ok(body("b newer"))
            }
        };
        let answer = views.get("b", at(11), 0, counting(&computed)).await;
        assert_eq!(text(answer.unwrap()), "b at 10", "the stand-in answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            computed.load(Ordering::SeqCst),
            0,
            "no second refresh while one is in flight"
        );

        release.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while computed.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a refresh never started once the first ended"
            );
            views
                .get("b", at(12), 0, counting(&computed))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn forgetting_stand_ins_makes_the_next_request_wait_for_its_own_view() {
        let views = ViewCache::<&str, 1>::new(1 << 20, lenient());
        views.get("board", at(10), 0, ready("at 10")).await.unwrap();
        views.forget_stand_ins();
        let answer = views.get("board", at(20), 0, ready("at 20")).await;
        assert_eq!(text(answer.unwrap()), "at 20");
    }
}
