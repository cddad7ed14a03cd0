//! Response caching: the cache phase of the request path and the stores.
//!
//! - [`Caches::lookup`] keys the client's request as it came (before the
//!   pipeline rewrites it for the upstream), answers a fresh entry (`X-Cache: HIT`), or makes the
//!   request the one upstream call for its key (coalescing) and remembers a
//!   stale entry for stale-if-error.
//! - [`CacheState::finish`] stores the upstream's answer when it may be
//!   (`MISS`), and [`CacheState::stale_response`] serves the remembered stale
//!   entry when the upstream failed or the circuit is open (`STALE`).
//! - A write (an unsafe method the route does not cache) is not looked up;
//!   once the backend accepts it, [`CacheState::finish`] removes the entries
//!   a GET or HEAD of its URI would be served, before it is answered, and
//!   keeps the misses of those keys then in flight from storing (or
//!   sharing) what they fetched before it. A write whose outcome is not
//!   known (its client went away while it was upstream, the backend
//!   failed) removes them too. [`Caches::written`] does the same for a
//!   captured write replayed later.
//!
//! State that must outlive a config reload (stores, flights, the Redis
//! connection) lives in [`Caches`], held by `Proxy` and keyed by route name.
//! This module never decides whether an upstream answer is a failure: it
//! asks `classify`.

pub mod cache_key;
pub mod conditional;
pub mod entry;
pub mod flight;
pub mod memory;
pub mod policy;
pub mod redis_store;
pub mod vary;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AGE, HOST, SET_COOKIE};
use http::{HeaderMap, HeaderName, Method, Request, Response};
use http_body_util::{BodyExt, Either, Full};

use crate::body::{ClientBody, ResponseBody, UpstreamBody};
use crate::classify::Failure;
use crate::config::{CacheConfig, CacheStore, Config, RedisConfig, RouteConfig};
use crate::error::{ErrorCode, ProxyError};
use crate::routing::Route;
use crate::stats::metrics::Metrics;

use cache_key::{CacheKey, KeyHead, KeyInput};
use entry::Entry;
use flight::{Flights, Joined, Leader, Shared};
use memory::MemoryStore;
use policy::RequestPlan;
use redis_store::RedisStore;
use vary::Varied;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The cache's verdict on one request: the `X-Cache` header and the
/// `result` label of `backstop_cache_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Hit,
    Miss,
    Bypass,
    Stale,
}

impl Verdict {
    /// The metric label and `RequestContext::cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Hit => "hit",
            Verdict::Miss => "miss",
            Verdict::Bypass => "bypass",
            Verdict::Stale => "stale",
        }
    }

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Verdict::Hit => "HIT",
            Verdict::Miss => "MISS",
            Verdict::Bypass => "BYPASS",
            Verdict::Stale => "STALE",
        })
    }
}

/// What names a request's entries, as its client sent it (before the
/// pipeline rewrites it for the upstream), but for the method and body.
pub struct Target<'a> {
    /// `http` or `https`: how the client reached Backstop.
    pub scheme: &'a str,
    /// The host the backend is told about (`X-Forwarded-Host`): the
    /// target's authority, else the `Host` header.
    pub host: Option<&'a [u8]>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl<'a> Target<'a> {
    /// `scheme` is the listener's.
    fn of(req: &'a Request<ClientBody>, scheme: &'a str) -> Target<'a> {
        let host = match req.uri().authority() {
            Some(authority) => Some(authority.as_str().as_bytes()),
            None => req.headers().get(HOST).map(HeaderValue::as_bytes),
        };
        Target {
            scheme,
            host,
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        }
    }
}

/// The key of `method` on `target` with `body` (a write names the keys of
/// the reads of its URI).
fn key_of(route: &Route, target: &Target, method: &Method, body: &[u8]) -> CacheKey {
    let cache = &route.config.cache;
    KeyHead::new(&KeyInput {
        route: route.name(),
        scheme: target.scheme,
        host: target.host,
        method,
        path: target.path,
        query: target.query,
        headers: target.headers,
        strategy: cache.header_strategy,
        listed: &cache.headers,
    })
    .finish(target.headers, body)
}

/// What the lookup came to.
pub enum Lookup {
    /// Answer the client with this; nothing goes upstream.
    Answer(Response<ResponseBody>, Verdict),
    /// Go upstream; hand the answer to [`CacheState::finish`].
    Forward(CacheState),
}

/// A request's cache state between lookup and answer.
pub struct CacheState {
    verdict: Option<Verdict>,
    /// Where the answer is stored (absent when it must not be).
    slot: Option<Slot>,
    /// An entry past its ttl but within `stale_if_error`.
    stale: Option<Arc<Entry>>,
    /// Set when this request is the one upstream call for its key.
    leader: Option<Leader>,
    /// A write's: the entries its success makes stale. Boxed: this state
    /// lives in every request's future, and writes are the rare case.
    invalidate: Option<Box<Invalidation>>,
}

/// The entries a write makes stale (RFC 9111 §4.4): those a GET or HEAD of
/// its URI, with its headers, would be served. Keyed on the write's own
/// headers, it misses variants keyed on other values (`header_strategy`).
///
/// Dropped unrun once its write was [sent](CacheState::sending) (the
/// client went away while the write was upstream, or the backend failed),
/// it runs anyway, on a task of its own: the write may have been applied,
/// and a removal too many costs one miss.
struct Invalidation {
    /// Emptied once run, or once the backend refused the write.
    keys: Vec<CacheKey>,
    route: Arc<RouteCache>,
    store: StoreRef,
    /// The route's name (its Redis keys).
    name: String,
    /// The write went upstream: from now on, its outcome may be a change.
    sent: bool,
    /// An attempt before the one answering failed: sent (and timed out, or
    /// reset), the backend may have applied the write whatever the last
    /// attempt's status says (a DELETE retried after a lost answer gets 404).
    retried: bool,
}

impl Invalidation {
    /// The write was accepted (or may have been). First the keys' write
    /// stripes, so that a miss of theirs in flight (fetched, maybe, before
    /// the write) stores and shares nothing; then the keys' flights, so
    /// that later reads fetch anew rather than wait for such an answer;
    /// then, on a task of its own that a client going away cannot cancel,
    /// the stored entries, and the stripes once more (a stale entry read
    /// while it was being removed is not served: see [`Caches::lookup`]).
    fn start(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let keys = std::mem::take(&mut self.keys);
        if keys.is_empty() {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        self.route.writes.wrote(&keys);
        self.route.flights.forget(&keys);
        let (route, store, name) = (self.route.clone(), self.store.clone(), self.name.clone());
        Some(runtime.spawn(async move {
            store.remove(&name, &keys).await;
            route.writes.wrote(&keys);
        }))
    }

    /// [`Invalidation::start`], awaited: the write is answered after it.
    async fn run(mut self) {
        if let Some(task) = self.start() {
            // An error only if it panicked: the entries then live out their TTL.
            let _ = task.await;
        }
    }
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        if self.sent {
            // Not awaited: no one waits for this answer any more.
            let _ = self.start();
        }
    }
}

struct Slot {
    key: CacheKey,
    store: StoreRef,
    unkeyed_auth: bool,
    /// The request revalidates its client's copy (`conditional`).
    revalidates: bool,
    /// The client's request headers as they came, for the values of what
    /// the answer's `Vary` names (known only once it is here).
    request: HeaderMap,
    route: Arc<RouteCache>,
    /// The key's write stripe when this miss went upstream.
    writes: u64,
}

impl Slot {
    /// Whether a write of this key was accepted since this miss went
    /// upstream: its answer may predate the write. The count is shared by
    /// the keys of one stripe: a false alarm (two keys in one of
    /// [`WRITE_STRIPES`]) only skips one store.
    fn overtaken(&self) -> bool {
        self.route.writes.of(&self.key) != self.writes
    }
}

/// An overtaken leader's waiters join the key's flight again, for one new
/// fetch between them (see [`Shared::Retry`]).
fn rejoin(leader: &mut Option<Leader>) {
    if let Some(leader) = leader.take() {
        leader.finish(Shared::Retry);
    }
}

impl CacheState {
    /// The state of a request on a route that does not cache.
    pub fn off() -> CacheState {
        CacheState::passthrough(None)
    }

    fn passthrough(verdict: Option<Verdict>) -> CacheState {
        CacheState {
            verdict,
            slot: None,
            stale: None,
            leader: None,
            invalidate: None,
        }
    }

    /// `hit`, `miss`, `bypass`, `stale`; `None` when the route does not cache.
    pub fn verdict(&self) -> Option<Verdict> {
        self.verdict
    }

    /// Marks the backend's failure answer, passed on as it came (nothing
    /// stale to serve instead), with the lookup's `X-Cache`.
    pub fn mark_failure(&self, headers: &mut HeaderMap) {
        if let Some(verdict) = self.verdict {
            headers.insert(X_CACHE, verdict.header());
        }
    }

    /// The request is about to go upstream: a write's invalidation, from
    /// now on, runs even if [`CacheState::finish`] never sees its answer.
    pub fn sending(&mut self) {
        if let Some(invalidation) = &mut self.invalidate {
            invalidation.sent = true;
        }
    }

    /// The answer to come is a retry's: a write's invalidation runs
    /// whatever its status (see [`Invalidation::retried`]).
    pub fn retried(&mut self) {
        if let Some(invalidation) = &mut self.invalidate {
            invalidation.retried = true;
        }
    }

    /// Stale-if-error: the remembered stale entry as an answer, if there is
    /// one and it is still within `stale_if_error` of `cache` (the backend
    /// may have taken up to the route's deadline to fail). Called when the
    /// upstream failed, and by the circuit-breaker phase when the circuit is
    /// open. Waiting coalesced requests get it too.
    pub fn stale_response(&mut self, cache: &CacheConfig) -> Option<Response<ResponseBody>> {
        let entry = self.stale.clone()?;
        if let Freshness::Expired = freshness(&entry, cache) {
            return None;
        }
        if self.slot.as_ref().is_some_and(Slot::overtaken) {
            // A write accepted since removed it from the store: no longer
            // an answer, not even a stale one.
            rejoin(&mut self.leader);
            return None;
        }
        self.verdict = Some(Verdict::Stale);
        if let Some(leader) = self.leader.take() {
            leader.finish(Shared::Stale(entry.clone()));
        }
        Some(judged(
            self.validators(),
            entry_response(&entry, Verdict::Stale),
        ))
    }

    /// The client's validators, when its request revalidates and may fill
    /// the cache: it goes upstream without them (see [`conditional`]), and
    /// its answer is judged against them.
    pub fn validators(&self) -> Option<&HeaderMap> {
        self.slot
            .as_ref()
            .filter(|slot| slot.revalidates)
            .map(|slot| &slot.request)
    }

    /// The upstream's answer (hop-by-hop headers already removed): served
    /// stale instead if it is a failure and a stale entry exists, stored if
    /// it may be, and marked with `X-Cache`; a `304` for a client whose
    /// copy it matches (its validators did not go upstream).
    pub async fn finish(
        &mut self,
        route: &RouteConfig,
        response: Response<ResponseBody>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let answer = self.store(route, response).await?;
        Ok(judged(self.validators(), answer))
    }

    /// [`CacheState::finish`] but for the client's validators.
    async fn store(
        &mut self,
        route: &RouteConfig,
        response: Response<ResponseBody>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Some(verdict) = self.verdict else {
            return Ok(response);
        };
        let status = response.status();
        // A status that says the backend is down (502, 503, 504), whether
        // or not the route retries it; a 500 or 429 is the backend's word
        // on this request and passed on.
        if Failure::Status(status.as_u16()).is_capturable() {
            if let Some(stale) = self.stale_response(&route.cache) {
                return Ok(stale);
            }
        }
        if let Some(mut invalidation) = self.invalidate.take() {
            // Only a write the backend accepted changed anything. Done
            // before answering, so that the client's next read cannot find
            // the old entry; Redis is bounded by its timeout and its breaker.
            if status.is_success() || status.is_redirection() || invalidation.retried {
                (*invalidation).run().await;
            } else {
                invalidation.keys.clear();
            }
        }
        let cache = &route.cache;
        let overtaken = self.slot.as_ref().is_some_and(Slot::overtaken);
        if overtaken {
            rejoin(&mut self.leader);
        }
        let fetched = self.slot.as_ref().filter(|_| !overtaken);
        let storable = fetched.and_then(|slot| {
            policy::storable(
                cache,
                slot.unkeyed_auth,
                status,
                response.headers(),
                std::time::SystemTime::now(),
            )
            .filter(|_| declared_length(&response).is_none_or(|n| n <= cache.max_entry_bytes))
        });
        let (parts, body) = response.into_parts();
        let (slot, storable, upstream) = match (fetched, storable, body) {
            (Some(slot), Some(storable), Either::Left(upstream)) => (slot, storable, upstream),
            (_, _, body) => {
                // Not stored: the waiters (if any) go upstream on their own.
                self.leader = None;
                return Ok(mark(Response::from_parts(parts, body), verdict));
            }
        };
        let limit = usize::try_from(cache.max_entry_bytes).unwrap_or(usize::MAX);
        let body = match read_bounded(upstream, limit).await {
            Bounded::Whole(body) => body,
            Bounded::TooLarge(rest) => {
                self.leader = None;
                return Ok(mark(
                    Response::from_parts(parts, Either::Left(rest)),
                    verdict,
                ));
            }
            Bounded::Broken(e) => {
                tracing::debug!(route = %route.name, error = %e, "backend answer broke off");
                // Nothing of it has reached the client yet: a stale entry
                // can still stand in for it.
                if let Some(stale) = self.stale_response(&route.cache) {
                    return Ok(stale);
                }
                return Err(ProxyError::new(
                    ErrorCode::UpstreamUnreachable,
                    format!("The backend of route {} broke off its answer", route.name),
                ));
            }
        };
        if slot.overtaken() {
            // A write came while the body was read: store nothing (another
            // instance could serve the entry until the removal).
            rejoin(&mut self.leader);
            return Ok(mark(
                Response::from_parts(parts, Either::Right(Full::new(body))),
                verdict,
            ));
        }
        // Only under ignore_cache_control can a stored answer carry a cookie:
        // it is one client's, so it is served to that client only.
        let mut stored_headers = parts.headers.clone();
        stored_headers.remove(SET_COOKIE);
        let mut entry = Entry::new(parts.status, stored_headers, body.clone());
        entry.age_at_store = storable.age;
        entry.max_age = storable.max_age;
        entry.must_revalidate = storable.must_revalidate;
        entry.vary = Varied::record(&storable.vary, &slot.request);
        // Kept, from now, as long as fresh and then stale-if-error.
        let keep_for = entry.fresh_for(cache.ttl) + entry.stale_for(cache.stale_if_error);
        let entry = Arc::new(entry);
        slot.store
            .put(&route.name, slot.key, entry.clone(), keep_for)
            .await;
        if slot.overtaken() {
            // A write accepted while this was stored may have removed the
            // key before the put landed: remove it again, share nothing.
            let store = slot.store.clone();
            store.remove_detached(&route.name, vec![slot.key]).await;
            rejoin(&mut self.leader);
        } else if let Some(leader) = self.leader.take() {
            leader.finish(Shared::Fresh(entry));
        }
        Ok(mark(
            Response::from_parts(parts, Either::Right(Full::new(body))),
            verdict,
        ))
    }
}

/// The registry of caches: per route (by name) a memory store and the
/// in-flight map, and one Redis store. Survives config reloads.
pub struct Caches {
    routes: ArcSwap<HashMap<String, Arc<RouteCache>>>,
    redis: ArcSwapOption<RedisSlot>,
    /// Serializes the rare changes of the two maps above.
    changes: Mutex<()>,
    metrics: Arc<Metrics>,
}

struct RouteCache {
    memory: MemoryStore,
    flights: Flights,
    /// Writes accepted on the route here, by key (see [`Slot::overtaken`]).
    /// Kept when the memory store is rebuilt. Other instances' writes are
    /// not counted: their misses race on.
    writes: Arc<WriteStripes>,
}

/// How many write counts a route keeps: a write to one URI falsely
/// overtakes a miss of another about once in this many (8 KiB a route).
const WRITE_STRIPES: usize = 1024;

/// Writes accepted, counted per stripe of keys: a miss compares its key's
/// count when it went upstream with the count when it stores, so that only
/// a write of its own key (or of one in its stripe) makes it drop its
/// answer, not any write on the route.
struct WriteStripes([AtomicU64; WRITE_STRIPES]);

impl Default for WriteStripes {
    fn default() -> WriteStripes {
        WriteStripes(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl WriteStripes {
    fn of(&self, key: &CacheKey) -> u64 {
        self.0[key.stripe(WRITE_STRIPES)].load(Ordering::SeqCst)
    }

    fn wrote_all(&self) {
        for stripe in &self.0 {
            stripe.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn wrote(&self, keys: &[CacheKey]) {
        for key in keys {
            self.0[key.stripe(WRITE_STRIPES)].fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The Redis store for one `[redis]` configuration, or the reason there is
/// none (so the reason is logged once, not on every request).
struct RedisSlot {
    config: RedisConfig,
    store: Option<Arc<RedisStore>>,
}

/// Where one route's entries live.
#[derive(Clone)]
enum StoreRef {
    Memory(Arc<RouteCache>),
    Redis(Arc<RedisStore>),
    /// `store = "redis"` but Redis cannot be used: nothing is stored.
    Unavailable,
}

impl StoreRef {
    async fn get(&self, route: &str, key: &CacheKey) -> Option<Arc<Entry>> {
        match self {
            StoreRef::Memory(rc) => rc.memory.get(key).await,
            StoreRef::Redis(redis) => redis.get(route, key).await.map(Arc::new),
            StoreRef::Unavailable => None,
        }
    }

    async fn put(&self, route: &str, key: CacheKey, entry: Arc<Entry>, keep_for: Duration) {
        match self {
            StoreRef::Memory(rc) => rc.memory.put(key, entry, keep_for).await,
            StoreRef::Redis(redis) => redis.put(route, &key, &entry, keep_for).await,
            StoreRef::Unavailable => {}
        }
    }

    async fn remove(&self, route: &str, keys: &[CacheKey]) {
        match self {
            StoreRef::Memory(rc) => rc.memory.remove(keys).await,
            StoreRef::Redis(redis) => redis.remove(route, keys).await,
            StoreRef::Unavailable => {}
        }
    }

    /// [`StoreRef::remove`] on a task of its own, awaited: the write is
    /// answered after it, but a client that goes away (its request's
    /// future dropped) cannot cancel it half-way and leave the entry.
    async fn remove_detached(self, route: &str, keys: Vec<CacheKey>) {
        if let StoreRef::Unavailable = self {
            return;
        }
        let route = route.to_owned();
        let removal = tokio::spawn(async move { self.remove(&route, &keys).await });
        // An error only if it panicked: the entries then live out their TTL.
        let _ = removal.await;
    }
}

/// How fresh an entry is for the route's current settings.
enum Freshness {
    Fresh,
    /// Usable only when the upstream fails.
    Stale,
    Expired,
}

/// The backend's own bounds (`max-age`, `must-revalidate`) hold within
/// the route's; both count the time held here (see [`Entry::fresh_for`]).
fn freshness(entry: &Entry, cache: &CacheConfig) -> Freshness {
    let held = entry.held();
    let fresh_for = entry.fresh_for(cache.ttl);
    if held < fresh_for {
        Freshness::Fresh
    } else if held < fresh_for + entry.stale_for(cache.stale_if_error) {
        Freshness::Stale
    } else {
        Freshness::Expired
    }
}

/// What a purge removed.
pub struct Purged {
    pub memory: u64,
    /// `None` without a `[redis]` section.
    pub redis: Option<Result<u64, String>>,
}

impl Caches {
    pub fn new(metrics: Arc<Metrics>) -> Caches {
        Caches {
            routes: ArcSwap::from_pointee(HashMap::new()),
            redis: ArcSwapOption::empty(),
            changes: Mutex::new(()),
            metrics,
        }
    }

    /// The cache phase: a fresh entry answers the request; otherwise the
    /// request goes upstream — alone, or as the leader its concurrent twins
    /// wait for. `scheme` is the listener's (`http`/`https`) and `body` the
    /// buffered request body (both keyed).
    pub async fn lookup(
        &self,
        config: &Config,
        route: &Route,
        request: &Request<ClientBody>,
        scheme: &str,
        body: Option<&[u8]>,
    ) -> Lookup {
        let cache = &route.config.cache;
        let plan = policy::request_plan(cache, request.method(), request.headers());
        let target = Target::of(request, scheme);
        let body = match (plan, body) {
            (RequestPlan::Off, _) => return Lookup::Forward(CacheState::passthrough(None)),
            (RequestPlan::Invalidate, _) => {
                let mut state = CacheState::passthrough(Some(Verdict::Bypass));
                state.invalidate = self.invalidation(config, route, &target).map(Box::new);
                return Lookup::Forward(state);
            }
            (RequestPlan::Lookup | RequestPlan::Refresh, Some(body)) => body,
            // Not cached, or a body that was not buffered (cannot be keyed).
            _ => return Lookup::Forward(CacheState::passthrough(Some(Verdict::Bypass))),
        };
        let key = key_of(route, &target, request.method(), body);
        let revalidates = conditional::revalidates(request.method(), request.headers());
        let validators = revalidates.then(|| request.headers());
        let (rc, store) = self.stores(config, &route.config);
        let mut verdict = Verdict::Miss;
        let mut stale = None;
        let mut leader = None;
        // An entry for other values of what it varies on is a miss, whose
        // answer replaces it.
        let fits = |entry: &Arc<Entry>| entry.vary.matches(request.headers());
        // A stale entry (only with stale_if_error) must not outlive a write
        // that removes it while this miss waits: the key's write count
        // before it is read. One atomic load; no other work on a HIT.
        let before = (!cache.stale_if_error.is_zero()).then(|| rc.writes.of(&key));
        if plan == RequestPlan::Refresh {
            verdict = Verdict::Bypass;
        } else {
            if let Some(entry) = store.get(route.name(), &key).await.filter(fits) {
                match freshness(&entry, cache) {
                    Freshness::Fresh => return hit(&entry, validators),
                    Freshness::Stale => stale = Some(entry),
                    Freshness::Expired => {}
                }
            }
            // With lock_timeout zero, coalescing is off: every miss goes
            // upstream.
            // (A lock_timeout too large for the clock: a day is as long.)
            let wait = cache.lock_timeout.min(Duration::from_secs(86_400));
            let deadline = tokio::time::Instant::now() + wait;
            while !cache.lock_timeout.is_zero() {
                match rc.flights.join(key) {
                    Joined::Leader(joined) => {
                        // A leader that finished between our lookup and our
                        // join has stored its answer: look again rather
                        // than call twice.
                        if let Some(entry) = store.get(route.name(), &key).await.filter(fits) {
                            if let Freshness::Fresh = freshness(&entry, cache) {
                                joined.finish(Shared::Fresh(entry.clone()));
                                return hit(&entry, validators);
                            }
                        }
                        leader = Some(joined);
                        break;
                    }
                    Joined::Waiter(rx) => {
                        match tokio::time::timeout_at(deadline, flight::wait(rx)).await {
                            Ok(Shared::Fresh(entry)) if fits(&entry) => {
                                return hit(&entry, validators)
                            }
                            Ok(Shared::Stale(entry)) if fits(&entry) => {
                                let answer = entry_response(&entry, Verdict::Stale);
                                let answer = judged(validators, answer);
                                return Lookup::Answer(answer, Verdict::Stale);
                            }
                            // The leader's answer may predate a write: join
                            // again (one new fetch for the twins), within
                            // the same lock_timeout.
                            Ok(Shared::Retry) => {}
                            // Nothing to share, a variant for other request
                            // headers, or a fill slower than lock_timeout (a
                            // stalled backend must not hold every twin): go
                            // upstream alone.
                            Ok(_) | Err(_) => break,
                        }
                    }
                }
            }
        }
        // Going upstream: what a write accepted from now on does to the
        // store, this miss must not undo (see `Slot::overtaken`).
        let writes = rc.writes.of(&key);
        if before.is_some_and(|before| before != writes) {
            // Removed by a write since it was read.
            stale = None;
        }
        Lookup::Forward(CacheState {
            verdict: Some(verdict),
            slot: Some(Slot {
                key,
                store,
                unkeyed_auth: policy::unkeyed_credentials(cache, request.headers()),
                revalidates,
                request: request.headers().clone(),
                route: rc,
                writes,
            }),
            stale,
            leader,
            invalidate: None,
        })
    }

    /// A captured write, replayed: once the backend has accepted it, the
    /// cached reads of its URI are removed as a live write's are (see
    /// [`CacheState::finish`]). Redis is bounded by its timeout and its
    /// breaker, so this never holds a replay up for long.
    pub async fn written(
        &self,
        config: &Config,
        route: &Route,
        method: &Method,
        target: &Target<'_>,
    ) {
        let plan = policy::request_plan(&route.config.cache, method, target.headers);
        if plan != RequestPlan::Invalidate {
            return;
        }
        if let Some(invalidation) = self.invalidation(config, route, target) {
            invalidation.run().await;
        }
    }

    /// What a write (`RequestPlan::Invalidate`) makes stale when accepted:
    /// the keys a GET or HEAD of its URI would have, if the route caches
    /// them. A read keyed on its body (a listed POST) cannot be named
    /// without that body and is left to expire.
    fn invalidation(
        &self,
        config: &Config,
        route: &Route,
        target: &Target,
    ) -> Option<Invalidation> {
        let cache = &route.config.cache;
        let reads = [Method::GET, Method::HEAD];
        let reads: Vec<&Method> = reads.iter().filter(|m| cache.methods.contains(m)).collect();
        let mut keys = Vec::new();
        for headers in cache_key::read_headers_of_write(target.headers) {
            let target = Target {
                headers: &headers,
                ..*target
            };
            for method in &reads {
                let key = key_of(route, &target, method, b"");
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
        if keys.is_empty() {
            return None;
        }
        let name = route.name().to_owned();
        let (route, store) = self.stores(config, &route.config);
        Some(Invalidation {
            keys,
            route,
            store,
            name,
            sent: false,
            retried: false,
        })
    }

    /// The route's memory cache (its in-flight map) and the store its
    /// entries live in.
    fn stores(&self, config: &Config, route: &RouteConfig) -> (Arc<RouteCache>, StoreRef) {
        let rc = self.route_cache(route);
        let store = match route.cache.store {
            CacheStore::Memory => StoreRef::Memory(rc.clone()),
            CacheStore::Redis => match self.redis(config.redis.as_ref()) {
                Some(redis) => StoreRef::Redis(redis),
                None => StoreRef::Unavailable,
            },
        };
        (rc, store)
    }

    /// Removes every entry of a route from both stores.
    pub async fn purge(&self, config: &Config, route: &str) -> Purged {
        // Misses upstream now fetched what the purge throws away: counted
        // as overtaken by a write, they store nothing and their waiters
        // fetch anew.
        let memory = self.routes.load().get(route).map_or(0, |rc| {
            rc.writes.wrote_all();
            rc.memory.purge()
        });
        let redis = match self.redis(config.redis.as_ref()) {
            Some(redis) => Some(redis.purge(route).await),
            None if config.redis.is_some() => Some(Err("redis is not usable".to_string())),
            None => None,
        };
        Purged { memory, redis }
    }

    /// Drops the stores of routes a reload removed or stopped caching:
    /// their memory (up to `max_bytes` each) is given back. Requests in
    /// flight keep what they hold.
    pub fn forget_all_but(&self, kept: &[RouteConfig]) {
        let _changing = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.routes.load_full();
        let caching = |name: &str| kept.iter().any(|r| r.name == name && r.cache.enabled);
        if map.keys().all(|name| caching(name)) {
            return;
        }
        let mut next = (*map).clone();
        next.retain(|name, _| caching(name));
        self.routes.store(Arc::new(next));
    }

    fn route_cache(&self, route: &RouteConfig) -> Arc<RouteCache> {
        let max_bytes = route.cache.max_bytes;
        let current = |map: &HashMap<String, Arc<RouteCache>>| {
            map.get(&route.name)
                .filter(|rc| rc.memory.max_bytes == max_bytes)
                .cloned()
        };
        if let Some(rc) = current(&self.routes.load()) {
            return rc;
        }
        let _changing = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.routes.load_full();
        if let Some(rc) = current(&map) {
            return rc;
        }
        // New route, or a new bound: a new (empty) store for it. The write
        // counts go on: misses in flight (to Redis) still compare them.
        let writes = map
            .get(&route.name)
            .map(|rc| rc.writes.clone())
            .unwrap_or_default();
        let rc = Arc::new(RouteCache {
            memory: MemoryStore::new(max_bytes),
            flights: Flights::default(),
            writes,
        });
        let mut next = (*map).clone();
        next.insert(route.name.clone(), rc.clone());
        self.routes.store(Arc::new(next));
        rc
    }

    fn redis(&self, config: Option<&RedisConfig>) -> Option<Arc<RedisStore>> {
        let config = config?;
        let same = |slot: &RedisSlot| {
            slot.config.url == config.url
                && slot.config.key_prefix == config.key_prefix
                && slot.config.timeout == config.timeout
        };
        if let Some(slot) = self.redis.load().as_deref().filter(|s| same(s)) {
            return slot.store.clone();
        }
        let _changing = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = self.redis.load().as_deref().filter(|s| same(s)) {
            return slot.store.clone();
        }
        let store = match RedisStore::new(config, self.metrics.redis_errors.clone()) {
            Ok(store) => Some(Arc::new(store)),
            Err(e) => {
                tracing::error!(error = %e, "redis store unusable: the cache is skipped");
                None
            }
        };
        self.redis.store(Some(Arc::new(RedisSlot {
            config: config.clone(),
            store: store.clone(),
        })));
        store
    }
}

/// A fresh entry's answer, or its `304` for a client whose copy matches.
fn hit(entry: &Entry, validators: Option<&HeaderMap>) -> Lookup {
    let answer = judged(validators, entry_response(entry, Verdict::Hit));
    Lookup::Answer(answer, Verdict::Hit)
}

/// `answer`, or its `304` for a revalidating request (its `validators`)
/// whose copy matches.
fn judged(
    validators: Option<&HeaderMap>,
    answer: Response<ResponseBody>,
) -> Response<ResponseBody> {
    match validators {
        Some(request) => conditional::answer_for(request, answer),
        None => answer,
    }
}

/// An answer from a stored entry, with `X-Cache` and `Age`.
fn entry_response(entry: &Entry, verdict: Verdict) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(entry.body.clone())));
    *response.status_mut() = entry.status;
    *response.headers_mut() = entry.headers.clone();
    // RFC 9111 §1.2.2: an age past 2^31 seconds is sent as 2^31.
    let age = entry.age().as_secs().min(MAX_AGE_SECS);
    response.headers_mut().insert(AGE, HeaderValue::from(age));
    mark(response, verdict)
}

/// The largest `Age` sent (RFC 9111 §1.2.2).
const MAX_AGE_SECS: u64 = 2_147_483_648;

fn mark(mut response: Response<ResponseBody>, verdict: Verdict) -> Response<ResponseBody> {
    response.headers_mut().insert(X_CACHE, verdict.header());
    response
}

fn declared_length(response: &Response<ResponseBody>) -> Option<u64> {
    crate::headers::content_length(response.headers())
}

enum Bounded {
    Whole(Bytes),
    /// Longer than the bound: what was read, then the rest, streamed.
    TooLarge(UpstreamBody),
    Broken(crate::body::BodyError),
}

/// Reads a body whole if it is at most `limit` bytes. Trailers are dropped
/// (a cached answer has none).
async fn read_bounded(mut body: UpstreamBody, limit: usize) -> Bounded {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Bounded::Broken(e),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len();
                chunks.push(data);
                if total > limit {
                    return Bounded::TooLarge(body.prepend(chunks));
                }
            }
        }
    }
    Bounded::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(total);
            for chunk in chunks {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn an_age_past_two_to_the_31_seconds_is_served_as_that() {
        // (the backend's Age when stored, the Age served)
        let cases = [
            (5, 5_u64),
            (2_147_483_648, 2_147_483_648),
            (u64::MAX / 2, 2_147_483_648),
        ];
        for (backend, served) in cases {
            let mut entry = Entry::new(StatusCode::OK, HeaderMap::new(), Bytes::new());
            entry.age_at_store = Duration::from_secs(backend);
            let response = entry_response(&entry, Verdict::Hit);
            assert_eq!(response.headers()[AGE], served.to_string(), "{backend}");
        }
    }

    #[test]
    fn keys_spread_over_the_write_stripes() {
        let stripes = WriteStripes::default();
        let key = |path: &str| {
            KeyHead::new(&KeyInput {
                route: "r",
                scheme: "http",
                host: Some(b"api.example"),
                method: &Method::GET,
                path,
                query: None,
                headers: &HeaderMap::new(),
                strategy: crate::config::HeaderStrategy::None,
                listed: &[],
            })
            .finish(&HeaderMap::new(), b"")
        };
        let written = key("/a");
        stripes.wrote(&[written]);
        assert_eq!(stripes.of(&written), 1);
        // Of many other keys, about one in WRITE_STRIPES shares its count.
        let shared = (0..10_000)
            .map(|i| key(&format!("/other/{i}")))
            .filter(|k| stripes.of(k) != 0)
            .count();
        assert!(shared < 40, "{shared} of 10000 keys overtaken");
    }
}
