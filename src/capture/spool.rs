//! The embedded spool: captured requests and dead letters in SQLite under
//! `data_dir`, written durably with group commit.
//!
//! Why SQLite: an ACID store whose file other processes may open at the same
//! time (WAL mode), so `backstop queue ...` can read and change the queue of
//! a running instance. Every write goes through one writer thread, which
//! takes all pending writes, applies them in one transaction, and answers
//! each caller only after that transaction's commit (and its fsync, with
//! `synchronous = FULL`) returned — many records per fsync.
//!
//! Only `capture/` and `replay/` (through this type) touch the spool.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, Notify};

/// How many writes one transaction takes at most.
const MAX_BATCH: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("spool directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool commit failed: {0}")]
    Commit(String),
    #[error("the spool writer has stopped")]
    Closed,
    #[error("no record {0}")]
    NotFound(String),
}

/// Where a queued record goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To the backend, by the spool's replay worker.
    Replay,
    /// To Kafka, by the forwarder (Kafka was down when it was captured).
    Kafka,
}

impl Destination {
    fn as_str(self) -> &'static str {
        match self {
            Destination::Replay => "replay",
            Destination::Kafka => "kafka",
        }
    }
}

/// A row of the queue.
#[derive(Debug, Clone)]
pub struct QueuedRecord {
    pub id: String,
    pub route: String,
    pub record: Vec<u8>,
    pub attempts: u32,
    pub next_at_ms: i64,
    pub last_error: Option<String>,
}

/// A row of the dead-letter table.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    pub route: String,
    pub record: Vec<u8>,
    pub attempts: u32,
    pub error: String,
    pub dead_at_ms: i64,
}

/// A dead letter as listed: its request line, not its record.
#[derive(Debug, Clone)]
pub struct DeadLetterSummary {
    pub id: String,
    pub route: String,
    pub attempts: u32,
    pub error: String,
    pub dead_at_ms: i64,
    /// `None` for a record that cannot be read.
    pub captured_at: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpoolStats {
    pub depth: u64,
    pub oldest_age_s: f64,
    pub dead_letters: u64,
    pub waiting_for_kafka: u64,
}

enum Write {
    Append {
        id: String,
        route: String,
        record: Vec<u8>,
        dest: Destination,
    },
    Delete {
        id: String,
    },
    RetryLater {
        id: String,
        attempts: u32,
        next_at_ms: i64,
        error: String,
    },
    DeadLetter {
        id: String,
        attempts: u32,
        error: String,
    },
    /// A record not in the queue written straight to the dead letters.
    KeepDead {
        id: String,
        route: String,
        record: Vec<u8>,
        attempts: u32,
        error: String,
    },
    /// Dead letters with ids from `first` to `last` back to the queue.
    Requeue {
        first: String,
        last: String,
    },
    /// Records waiting for Kafka handed to the spool's own replay.
    ToReplay {
        id: Option<String>,
    },
    PurgeDead,
    /// One dead letter removed (delivered by hand).
    DeleteDead {
        id: String,
    },
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<u64, SpoolError>>,
    /// A capture's place in the Kafka backlog, given up by the writer once
    /// the append is committed (or failed): not by the caller, whose wait
    /// may be cancelled (its client left) while the append is queued.
    _place: Option<BacklogPlace>,
}

pub struct Spool {
    path: PathBuf,
    writer: mpsc::Sender<Job>,
    reader: Mutex<Connection>,
    /// Woken after every commit that queued something.
    pub appended: Arc<Notify>,
    commits: Arc<std::sync::atomic::AtomicU64>,
    records_written: Arc<std::sync::atomic::AtomicU64>,
    /// Whether records wait here for Kafka, or are on their way in.
    kafka_backlog: Arc<KafkaBacklog>,
}

/// The captures waiting in the spool for Kafka, as one word: bit 0 says
/// some are committed (the writer's word, exact as of its last commit);
/// the rest counts those on their way in (their appends queued, not yet
/// committed). A new capture that finds either queues behind them, or the
/// topic would have it ahead of older captures of its route. One word, so
/// that a capture's look and its joining are one step the writer's
/// clearing cannot come between.
#[derive(Default)]
pub struct KafkaBacklog(AtomicUsize);

const COMMITTED: usize = 1;
const ARRIVING: usize = 2;

impl KafkaBacklog {
    fn committed(&self) -> bool {
        self.0.load(Ordering::Acquire) & COMMITTED != 0
    }

    fn set_committed(&self, holds: bool) {
        match holds {
            true => self.0.fetch_or(COMMITTED, Ordering::AcqRel),
            false => self.0.fetch_and(!COMMITTED, Ordering::AcqRel),
        };
    }
}

/// A capture's place in the Kafka backlog while its append is on its way
/// in: given up when dropped, after the append (whose commit marks the
/// backlog) or its failure.
pub struct BacklogPlace(Arc<KafkaBacklog>);

impl Drop for BacklogPlace {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(ARRIVING, Ordering::AcqRel);
    }
}

impl Spool {
    /// Opens (or creates) `data_dir/spool.sqlite3` and starts its writer.
    pub fn open(data_dir: &Path) -> Result<Arc<Spool>, SpoolError> {
        std::fs::create_dir_all(data_dir).map_err(|source| SpoolError::Dir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join("spool.sqlite3");
        let writer_conn = open_connection(&path)?;
        if lacks_oldest_index(&writer_conn)? {
            // A spool from before this index: building it reads every
            // queued record once, which over a large backlog takes a while.
            tracing::info!(path = %path.display(), "indexing the spool's queue by capture time (once)");
        }
        writer_conn.execute_batch(SCHEMA)?;
        let reader = open_connection(&path)?;
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let appended = Arc::new(Notify::new());
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let records_written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let notify = appended.clone();
        let (c, r) = (commits.clone(), records_written.clone());
        let kafka_backlog = Arc::new(KafkaBacklog::default());
        kafka_backlog.set_committed(holds_kafka_records(&writer_conn)?);
        let backlog = kafka_backlog.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, notify, c, r, backlog))
            .map_err(|source| SpoolError::Dir {
                path: path.clone(),
                source,
            })?;
        Ok(Arc::new(Spool {
            path,
            writer: tx,
            reader: Mutex::new(reader),
            appended,
            commits,
            records_written,
            kafka_backlog,
        }))
    }

    /// A place behind the captures waiting here for Kafka, if there are
    /// any: the capture then goes to the spool, holding the place until its
    /// append is done, rather than straight to Kafka ahead of them.
    pub fn join_kafka_backlog(&self) -> Option<BacklogPlace> {
        let backlog = &self.kafka_backlog.0;
        let joined = backlog.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            (now != 0).then_some(now + ARRIVING)
        });
        joined
            .is_ok()
            .then(|| BacklogPlace(self.kafka_backlog.clone()))
    }

    /// A place in the Kafka backlog for a capture Kafka did not take: the
    /// captures after it queue behind it from now on, not only once its
    /// append is committed.
    pub fn kafka_backlog_place(&self) -> BacklogPlace {
        self.kafka_backlog.0.fetch_add(ARRIVING, Ordering::AcqRel);
        BacklogPlace(self.kafka_backlog.clone())
    }

    /// The lock that one process at a time holds while it replays this
    /// spool: `None` while another holds it. Released when the file is
    /// closed (the process ends or the worker stops).
    pub fn try_lock_replay(&self) -> std::io::Result<Option<std::fs::File>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.with_file_name("replay.lock"))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (commits, records appended) since start: records per fsync.
    pub fn commit_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.commits.load(Relaxed),
            self.records_written.load(Relaxed),
        )
    }

    async fn write(&self, write: Write) -> Result<u64, SpoolError> {
        self.write_holding(write, None).await
    }

    async fn write_holding(
        &self,
        write: Write,
        place: Option<BacklogPlace>,
    ) -> Result<u64, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Job {
                write,
                reply,
                _place: place,
            })
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Stores a record; returns only once it is committed to disk. A
    /// capture bound for Kafka brings its `place` in the Kafka backlog,
    /// held until then.
    pub async fn append(
        &self,
        id: &str,
        route: &str,
        record: Vec<u8>,
        dest: Destination,
        place: Option<BacklogPlace>,
    ) -> Result<(), SpoolError> {
        let write = Write::Append {
            id: id.to_string(),
            route: route.to_string(),
            record,
            dest,
        };
        self.write_holding(write, place).await.map(drop)
    }

    /// Removes a delivered (or forwarded) record.
    pub async fn delete(&self, id: &str) -> Result<(), SpoolError> {
        self.write(Write::Delete { id: id.to_string() })
            .await
            .map(drop)
    }

    pub async fn retry_later(
        &self,
        id: &str,
        attempts: u32,
        next_at_ms: i64,
        error: &str,
    ) -> Result<(), SpoolError> {
        self.write(Write::RetryLater {
            id: id.to_string(),
            attempts,
            next_at_ms,
            error: error.to_string(),
        })
        .await
        .map(drop)
    }

    /// Moves a record to the dead-letter table with the reason.
    pub async fn dead_letter(
        &self,
        id: &str,
        attempts: u32,
        error: &str,
    ) -> Result<(), SpoolError> {
        self.write(Write::DeadLetter {
            id: id.to_string(),
            attempts,
            error: error.to_string(),
        })
        .await
        .map(drop)
    }

    /// Keeps a record that is not in the queue (a Kafka capture whose dead
    /// letter the dead-letter topic refuses) among the dead letters.
    pub async fn keep_dead_letter(
        &self,
        id: &str,
        route: &str,
        record: Vec<u8>,
        attempts: u32,
        error: &str,
    ) -> Result<(), SpoolError> {
        self.write(Write::KeepDead {
            id: id.to_string(),
            route: route.to_string(),
            record,
            attempts,
            error: error.to_string(),
        })
        .await
        .map(drop)
    }

    /// Moves one dead letter (or all, with `None`) back to the queue with a
    /// fresh attempt count; returns how many moved. All of them go
    /// [`CHUNK`] at a time, each its own transaction: copying gigabytes of
    /// bodies in one would hold the write lock past a live process's busy
    /// timeout (10 s), and its captures would fail meanwhile.
    pub async fn requeue(&self, id: Option<&str>) -> Result<u64, SpoolError> {
        let Some(id) = id else {
            // The dead letters of now, in ranges of ids: one a live worker
            // sends back to the dead letters meanwhile is not taken twice.
            let ids: Vec<String> = self.read(|c| {
                let mut stmt = c.prepare("SELECT id FROM dead_letters ORDER BY id")?;
                let ids = stmt.query_map([], |r| r.get(0))?;
                ids.collect()
            })?;
            let mut moved = 0;
            for chunk in ids.chunks(CHUNK as usize) {
                let (first, last) = (chunk[0].clone(), chunk[chunk.len() - 1].clone());
                moved += self.write(Write::Requeue { first, last }).await?;
            }
            return Ok(moved);
        };
        let (first, last) = (id.to_string(), id.to_string());
        let moved = self.write(Write::Requeue { first, last }).await?;
        if moved == 0 {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        Ok(moved)
    }

    /// Hands a record waiting for Kafka (or, with `None`, every one) to the
    /// spool's own replay: for a record Kafka refuses for good (too large),
    /// and at a start without `[kafka]`, where nothing would forward them.
    /// Returns how many moved.
    pub async fn replay_instead_of_kafka(&self, id: Option<&str>) -> Result<u64, SpoolError> {
        self.write(Write::ToReplay {
            id: id.map(str::to_string),
        })
        .await
    }

    /// Removes a dead letter delivered by hand, in one write: moved back to
    /// the queue and deleted from there, a worker could deliver it between.
    /// A copy of it requeued meanwhile (from the admin API) goes too.
    pub async fn delete_dead_letter(&self, id: &str) -> Result<(), SpoolError> {
        self.write(Write::DeleteDead { id: id.to_string() })
            .await
            .map(drop)
    }

    /// Deletes every dead letter, [`CHUNK`] at a time (see
    /// [`Self::requeue`]); returns how many.
    pub async fn purge_dead_letters(&self) -> Result<u64, SpoolError> {
        let mut purged = 0;
        loop {
            let deleted = self.write(Write::PurgeDead).await?;
            purged += deleted;
            if deleted < CHUNK {
                return Ok(purged);
            }
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, SpoolError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    /// Queued records bound for `dest`, oldest first: up to `limit`, as
    /// many as [`BATCH_BYTES`] of records hold (at least one).
    pub fn queued(&self, dest: Destination, limit: usize) -> Result<Vec<QueuedRecord>, SpoolError> {
        self.read(|c| batch(c, "dest = ?1", params![dest.as_str()], limit))
    }

    /// The id and route of every record queued for `dest`, oldest first,
    /// without the records (a backlog can be gigabytes of bodies).
    pub fn queued_ids(&self, dest: Destination) -> Result<Vec<(String, String)>, SpoolError> {
        self.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT id, route FROM queue WHERE dest = ?1 ORDER BY id")?;
            let rows = stmt.query_map(params![dest.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// The routes with records queued for replay, by name. Walks the
    /// `(dest, route, id)` index one route at a time (a skip scan), so it
    /// costs a lookup per route however deep the queue is.
    pub fn routes_to_replay(&self) -> Result<Vec<String>, SpoolError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "WITH RECURSIVE routes(name) AS ( \
                   SELECT MIN(route) FROM queue WHERE dest = 'replay' \
                   UNION ALL \
                   SELECT (SELECT MIN(route) FROM queue WHERE dest = 'replay' AND route > name) \
                   FROM routes WHERE name IS NOT NULL \
                 ) SELECT name FROM routes WHERE name IS NOT NULL",
            )?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// When one route's oldest record queued for replay is due
    /// (`next_at_ms`), if it has one; reads no body.
    pub fn replay_head_due_at(&self, route: &str) -> Result<Option<i64>, SpoolError> {
        self.read(|c| {
            c.query_row(
                "SELECT next_at_ms FROM queue WHERE dest = 'replay' AND route = ?1 ORDER BY id LIMIT 1",
                params![route],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// One route's records queued for replay with ids after `after` ("" for
    /// all), oldest first: up to `limit`, as many as [`BATCH_BYTES`] of
    /// records hold (at least one).
    pub fn queued_for_replay(
        &self,
        route: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<QueuedRecord>, SpoolError> {
        let filter = "dest = 'replay' AND route = ?1 AND id > ?2";
        self.read(|c| batch(c, filter, params![route, after], limit))
    }

    /// Every queued record, oldest first (for `backstop queue list`).
    pub fn list(&self, limit: usize) -> Result<Vec<QueuedRecord>, SpoolError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, route, CAST(record AS BLOB), attempts, next_at_ms, last_error FROM queue \
                 ORDER BY id LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit as i64], queued_row)?;
            rows.collect()
        })
    }

    /// Where a queued record is bound, if it is queued.
    pub fn destination_of(&self, id: &str) -> Result<Option<Destination>, SpoolError> {
        self.read(|c| {
            let dest: Option<String> = c
                .prepare_cached("SELECT dest FROM queue WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            Ok(dest.map(|d| match d.as_str() {
                "kafka" => Destination::Kafka,
                _ => Destination::Replay,
            }))
        })
    }

    pub fn get(&self, id: &str) -> Result<Option<QueuedRecord>, SpoolError> {
        self.read(|c| {
            c.query_row(
                "SELECT id, route, CAST(record AS BLOB), attempts, next_at_ms, last_error FROM queue WHERE id = ?1",
                params![id],
                queued_row,
            )
            .optional()
        })
    }

    /// The newest `limit` dead letters, without their records: SQLite
    /// reads the request line out of each (a thousand 10 MiB uploads would
    /// otherwise be read whole into memory for a listing).
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetterSummary>, SpoolError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT d.id, d.route, d.attempts, d.error, d.dead_at_ms, \
                   CASE WHEN json_valid(CAST(d.record AS TEXT)) THEN \
                     json_extract(CAST(d.record AS TEXT), '$.captured_at', '$.request.method', '$.request.path') \
                   END \
                 FROM (SELECT id FROM dead_letters ORDER BY dead_at_ms DESC, id DESC LIMIT ?1) AS newest \
                 JOIN dead_letters AS d ON d.id = newest.id \
                 ORDER BY d.dead_at_ms DESC, d.id DESC",
            )?;
            let rows = stmt.query_map(params![limit as i64], dead_summary_row)?;
            rows.collect()
        })
    }

    pub fn get_dead(&self, id: &str) -> Result<Option<DeadLetter>, SpoolError> {
        self.read(|c| {
            c.query_row(
                "SELECT id, route, CAST(record AS BLOB), attempts, error, dead_at_ms FROM dead_letters WHERE id = ?1",
                params![id],
                dead_row,
            )
            .optional()
        })
    }

    pub fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.read(|c| {
            // One statement, so one snapshot: counted one by one, a record
            // moving to the dead letters in between was counted in both.
            let (depth, kafka, dead, oldest): (i64, i64, i64, Option<i64>) =
                c.query_row(STATS, [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?;
            let oldest_age_s = oldest.map_or(0.0, |ms| ((now_ms() - ms).max(0) as f64) / 1000.0);
            Ok(SpoolStats {
                depth: depth as u64,
                oldest_age_s,
                dead_letters: dead as u64,
                waiting_for_kafka: kafka as u64,
            })
        })
    }
}

/// The spool's counts and its oldest capture, read at every `/metrics`
/// scrape and `/queue` poll: each from an index, none from the records (a
/// backlog can be gigabytes of bodies, and `captured_ms` lies after them).
const STATS: &str = "SELECT (SELECT COUNT(*) FROM queue WHERE dest = 'replay'), \
                            (SELECT COUNT(*) FROM queue WHERE dest = 'kafka'), \
                            (SELECT COUNT(*) FROM dead_letters), \
                            (SELECT MIN(captured_ms) FROM queue)";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    id          TEXT PRIMARY KEY,
    route       TEXT NOT NULL,
    record      BLOB NOT NULL,
    dest        TEXT NOT NULL,
    captured_ms INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at_ms  INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_dest ON queue (dest, id);
CREATE INDEX IF NOT EXISTS queue_route ON queue (dest, route, id);
CREATE INDEX IF NOT EXISTS queue_oldest ON queue (captured_ms);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          TEXT PRIMARY KEY,
    route       TEXT NOT NULL,
    record      BLOB NOT NULL,
    attempts    INTEGER NOT NULL,
    error       TEXT NOT NULL,
    dead_at_ms  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dead_letters_newest ON dead_letters (dead_at_ms, id);
";

/// Whether the spool has a queue but not yet its `queue_oldest` index.
fn lacks_oldest_index(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'queue') \
            AND NOT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'queue_oldest')",
        [],
        |r| r.get(0),
    )
}

fn open_connection(path: &Path) -> Result<Connection, SpoolError> {
    let conn = Connection::open(path)?;
    // WAL lets readers (the CLI, the admin API) work beside the writer;
    // synchronous = FULL makes every commit wait for fsync: the durability
    // the client is promised.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// Dead letters requeued or purged per transaction.
const CHUNK: u64 = 256;

/// The most record bytes one batch read takes into memory (the first
/// record whatever its size): 128 records of 10 MiB uploads would be well
/// over a gigabyte per route, read at once by every route's task.
pub const BATCH_BYTES: i64 = 32 << 20;

/// The queued records matching `filter` (a condition on `queue` over the
/// parameters `args`, `?1` to `?N`), oldest first: up to `limit`, as many
/// as [`BATCH_BYTES`] of records hold (at least one). Their sizes are read
/// first, without the records, then the records within the budget.
fn batch(
    c: &Connection,
    filter: &str,
    args: &[&dyn rusqlite::ToSql],
    limit: usize,
) -> rusqlite::Result<Vec<QueuedRecord>> {
    let n = args.len();
    let limit = limit as i64;
    let mut sizes = c.prepare_cached(&format!(
        "SELECT id, octet_length(record) FROM queue WHERE {filter} ORDER BY id LIMIT ?{}",
        n + 1
    ))?;
    let sizes = sizes.query_map([args, &[&limit]].concat().as_slice(), |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    let Some(last) = last_within_budget(sizes)? else {
        return Ok(Vec::new());
    };
    let mut records = c.prepare_cached(&format!(
        "SELECT id, route, CAST(record AS BLOB), attempts, next_at_ms, last_error FROM queue \
         WHERE {filter} AND id <= ?{} ORDER BY id LIMIT ?{}",
        n + 1,
        n + 2
    ))?;
    let rows = records.query_map([args, &[&last, &limit]].concat().as_slice(), queued_row)?;
    rows.collect()
}

/// The id of the last of `rows` (id, size; in id order) that starts
/// within [`BATCH_BYTES`]; `None` for no rows.
fn last_within_budget(
    rows: impl Iterator<Item = rusqlite::Result<(String, i64)>>,
) -> rusqlite::Result<Option<String>> {
    let (mut last, mut taken) = (None, 0i64);
    for row in rows {
        let (id, size) = row?;
        if last.is_some() && taken >= BATCH_BYTES {
            break;
        }
        taken = taken.saturating_add(size);
        last = Some(id);
    }
    Ok(last)
}

fn queued_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<QueuedRecord> {
    Ok(QueuedRecord {
        id: r.get(0)?,
        route: r.get(1)?,
        record: r.get(2)?,
        attempts: r.get(3)?,
        next_at_ms: r.get(4)?,
        last_error: r.get(5)?,
    })
}

fn dead_summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetterSummary> {
    // `[captured_at, method, path]` as JSON, or NULL for a record that is
    // not JSON. Read as bytes: SQLite's JSON functions do not check UTF-8,
    // and a record with a byte that is not must neither fail the whole
    // listing nor lose its other fields.
    let request: Option<[Option<String>; 3]> = r
        .get_ref(5)?
        .as_bytes_or_null()
        .ok()
        .flatten()
        .and_then(|bytes| serde_json::from_str(&String::from_utf8_lossy(bytes)).ok());
    let [captured_at, method, path] = request.unwrap_or_default();
    Ok(DeadLetterSummary {
        id: r.get(0)?,
        route: r.get(1)?,
        attempts: r.get(2)?,
        error: r.get(3)?,
        dead_at_ms: r.get(4)?,
        captured_at,
        method,
        path,
    })
}

fn dead_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        route: r.get(1)?,
        record: r.get(2)?,
        attempts: r.get(3)?,
        error: r.get(4)?,
        dead_at_ms: r.get(5)?,
    })
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The writer thread: one transaction per batch of pending writes.
fn writer_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    appended: Arc<Notify>,
    commits: Arc<std::sync::atomic::AtomicU64>,
    records_written: Arc<std::sync::atomic::AtomicU64>,
    kafka_backlog: Arc<KafkaBacklog>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match apply_batch(&mut conn, &batch) {
            Ok(results) => {
                // Records that came into the queue: the rows each write
                // added (none for an append that failed or was there
                // already; thousands for one requeue). Records handed from
                // Kafka's side to replay were counted when they came, but
                // wake the worker too.
                let rows = |came: fn(&Write) -> bool| -> u64 {
                    batch
                        .iter()
                        .zip(&results)
                        .filter(|(j, _)| came(&j.write))
                        .filter_map(|(_, result)| result.as_ref().ok())
                        .sum()
                };
                let appends = rows(|w| matches!(w, Write::Append { .. } | Write::Requeue { .. }));
                let handed = rows(|w| matches!(w, Write::ToReplay { .. }));
                // Before anyone hears of the commit: a client told its
                // request was captured must find the backlog marked.
                let to_kafka = batch.iter().any(|j| {
                    matches!(
                        j.write,
                        Write::Append {
                            dest: Destination::Kafka,
                            ..
                        }
                    )
                });
                if to_kafka {
                    kafka_backlog.set_committed(true);
                } else if kafka_backlog.committed() && batch.iter().any(|j| j.write.removes()) {
                    // Unknown on error: kept marked (captures queue here,
                    // in order, rather than go to Kafka ahead of them).
                    let holds = holds_kafka_records(&conn).unwrap_or(true);
                    kafka_backlog.set_committed(holds);
                }
                commits.fetch_add(1, Relaxed);
                records_written.fetch_add(appends, Relaxed);
                for (job, result) in batch.drain(..).zip(results) {
                    let _ = job.reply.send(result);
                }
                if appends + handed > 0 {
                    appended.notify_one();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                let message = e.to_string();
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(SpoolError::Commit(message.clone())));
                }
            }
        }
    }
}

/// Whether any record waits for Kafka.
fn holds_kafka_records(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM queue WHERE dest = 'kafka')",
        [],
        |r| r.get(0),
    )
}

impl Write {
    /// Whether it may take a record out of the queue, or out of Kafka's
    /// part of it.
    fn removes(&self) -> bool {
        matches!(
            self,
            Write::Delete { .. } | Write::DeadLetter { .. } | Write::ToReplay { .. }
        )
    }
}

/// Applies a batch in one transaction. A write that fails alone (a bad id)
/// gets its own error and leaves nothing behind (each runs in a savepoint:
/// a dead letter's copy never stays without its removal); the others still
/// commit. A failure after which SQLite rolled the whole transaction back
/// (a full disk, an I/O error, no memory) fails the whole batch: the writes
/// before it are gone, and those after it must not run outside a
/// transaction (stored, yet answered as failed).
fn apply_batch(
    conn: &mut Connection,
    batch: &[Job],
) -> rusqlite::Result<Vec<Result<u64, SpoolError>>> {
    let mut tx = conn.transaction()?;
    let mut results = Vec::with_capacity(batch.len());
    let now = now_ms();
    for job in batch {
        let savepoint = tx.savepoint()?;
        match apply_one(&savepoint, &job.write, now) {
            Ok(n) => {
                savepoint.commit()?;
                results.push(Ok(n as u64));
            }
            Err(e) => {
                // Dropped, the savepoint rolls its writes back.
                drop(savepoint);
                if tx.is_autocommit() {
                    return Err(e);
                }
                results.push(Err(SpoolError::Db(e)));
            }
        }
    }
    tx.commit()?;
    Ok(results)
}

/// Moves the dead letters with ids from `first` to `last` back to the
/// queue, each with its capture time (its UUIDv7's own: the dead-letter
/// table keeps none), so that the queue's oldest age stays true rather
/// than starting again at the requeue. An id that is no UUIDv7 gets `now`.
fn requeue(conn: &Connection, first: &str, last: &str, now: i64) -> rusqlite::Result<usize> {
    let ids = conn
        .prepare_cached("SELECT id FROM dead_letters WHERE id >= ?1 AND id <= ?2")?
        .query_map(params![first, last], |row| row.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut insert = conn.prepare_cached(
        "INSERT OR IGNORE INTO queue (id, route, record, dest, captured_ms) \
         SELECT id, route, record, 'replay', ?2 FROM dead_letters WHERE id = ?1",
    )?;
    let mut moved = 0;
    for id in &ids {
        moved += insert.execute(params![id, captured_ms(id).unwrap_or(now)])?;
    }
    conn.execute(
        "DELETE FROM dead_letters WHERE id >= ?1 AND id <= ?2",
        params![first, last],
    )?;
    Ok(moved)
}

/// The capture time a UUIDv7 id carries, in milliseconds since the epoch.
fn captured_ms(id: &str) -> Option<i64> {
    let (secs, nanos) = uuid::Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    i64::try_from(secs)
        .ok()?
        .checked_mul(1000)?
        .checked_add(i64::from(nanos / 1_000_000))
}

/// One write of a batch.
fn apply_one(conn: &Connection, write: &Write, now: i64) -> rusqlite::Result<usize> {
    match write {
        Write::Append { id, route, record, dest } => conn
            .prepare_cached(
                "INSERT OR IGNORE INTO queue (id, route, record, dest, captured_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![id, route, record, dest.as_str(), now])),
        Write::Delete { id } => conn
            .prepare_cached("DELETE FROM queue WHERE id = ?1")
            .and_then(|mut s| s.execute(params![id])),
        Write::RetryLater {
            id,
            attempts,
            next_at_ms,
            error,
        } => conn
            .prepare_cached("UPDATE queue SET attempts = ?2, next_at_ms = ?3, last_error = ?4 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![id, attempts, next_at_ms, error])),
        Write::DeadLetter { id, attempts, error } => conn
            .execute(
                "INSERT OR REPLACE INTO dead_letters (id, route, record, attempts, error, dead_at_ms) \
                 SELECT id, route, record, ?2, ?3, ?4 FROM queue WHERE id = ?1",
                params![id, attempts, error, now],
            )
            .and_then(|n| conn.execute("DELETE FROM queue WHERE id = ?1", params![id]).map(|_| n)),
        Write::KeepDead {
            id,
            route,
            record,
            attempts,
            error,
        } => conn.execute(
            "INSERT OR REPLACE INTO dead_letters (id, route, record, attempts, error, dead_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, route, record, attempts, error, now],
        ),
        Write::Requeue { first, last } => requeue(conn, first, last, now),
        Write::ToReplay { id } => conn
            .prepare_cached(
                "UPDATE queue SET dest = 'replay' WHERE dest = 'kafka' AND (id = ?1 OR ?1 IS NULL)",
            )
            .and_then(|mut s| s.execute(params![id])),
        Write::PurgeDead => conn.execute(
            &format!("DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters ORDER BY id LIMIT {CHUNK})"),
            [],
        ),
        // Its copy a requeue put back in the queue while it was being
        // delivered goes too: the worker would deliver it a second time.
        Write::DeleteDead { id } => conn
            .execute("DELETE FROM dead_letters WHERE id = ?1", params![id])
            .and_then(|dead| {
                conn.execute("DELETE FROM queue WHERE id = ?1 AND dest = 'replay'", params![id])
                    .map(|queued| dead + queued)
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_stops_once_its_records_fill_the_budget() {
        let last = |sizes: &[i64]| {
            let rows = sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| Ok((i.to_string(), size)));
            last_within_budget(rows).unwrap()
        };
        const MIB: i64 = 1 << 20;
        assert_eq!(last(&[]), None);
        assert_eq!(
            last(&[40 * MIB, 1]),
            Some("0".into()),
            "the first whatever its size"
        );
        assert_eq!(
            last(&[10 * MIB; 6]),
            Some("3".into()),
            "the fourth starts at 30 MiB"
        );
        assert_eq!(last(&[1, 40 * MIB, 1]), Some("1".into()));
        assert_eq!(last(&[1; 128]), Some("127".into()));
    }

    /// A write that fails for want of room (SQLite may then roll back the
    /// whole transaction) leaves no job answered otherwise than stored: a
    /// capture reported failed is not kept (its client sends it again),
    /// one reported stored is kept.
    #[test]
    fn every_answer_of_a_batch_that_ran_out_of_room_is_true() {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        c.execute_batch(&format!("PRAGMA max_page_count = {}", pages + 8))
            .unwrap();
        let append = |id: &str, len: usize| Job {
            write: Write::Append {
                id: id.into(),
                route: "r".into(),
                record: vec![b'x'; len],
                dest: Destination::Replay,
            },
            reply: oneshot::channel().0,
            _place: None,
        };
        let batch = [append("a", 10), append("b", 1 << 20), append("c", 10)];
        let answers = match apply_batch(&mut c, &batch) {
            Ok(answers) => answers.iter().map(Result::is_ok).collect(),
            Err(_) => vec![false; 3],
        };
        let stored: Vec<bool> = ["a", "b", "c"]
            .iter()
            .map(|id| {
                c.query_row("SELECT count(*) FROM queue WHERE id = ?1", [id], |r| {
                    r.get::<_, i64>(0)
                })
                .unwrap()
                    == 1
            })
            .collect();
        assert!(!answers[1], "the big one cannot fit");
        assert_eq!(answers, stored, "answered (ok?) vs stored");
    }

    /// A capture finds the Kafka backlog from the moment one before it
    /// failed to reach Kafka (not only once that one's append commits),
    /// and until the forwarder has taken the last one.
    #[tokio::test]
    async fn the_kafka_backlog_holds_from_a_failed_send_to_the_last_forward() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        assert!(spool.join_kafka_backlog().is_none());
        let failed = spool.kafka_backlog_place();
        let behind = spool.join_kafka_backlog();
        assert!(behind.is_some(), "queued behind the one on its way in");
        let record = b"{}".to_vec();
        spool
            .append("a", "r", record, Destination::Kafka, None)
            .await
            .unwrap();
        drop((failed, behind));
        assert!(spool.join_kafka_backlog().is_some(), "committed");
        spool.delete("a").await.unwrap();
        assert!(spool.join_kafka_backlog().is_none(), "none left");
    }

    /// Records written counts the records that came into the queue, not
    /// the writes: an append of a record already there adds none, a
    /// requeue of many adds each.
    #[tokio::test]
    async fn records_written_counts_records_not_writes() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let append =
            |id: &'static str| spool.append(id, "r", b"{}".to_vec(), Destination::Replay, None);
        append("a").await.unwrap();
        append("a").await.unwrap();
        assert_eq!(
            spool.commit_stats().1,
            1,
            "the second append found it there"
        );
        for id in ["b", "c", "d"] {
            let kept = spool.keep_dead_letter(id, "r", b"{}".to_vec(), 1, "test");
            kept.await.unwrap();
        }
        assert_eq!(spool.requeue(None).await.unwrap(), 3);
        assert_eq!(spool.commit_stats().1, 4, "one append and three requeued");
    }

    /// A Kafka capture's dead letter, which was never in the queue, is
    /// kept whole among the dead letters and can be requeued like any.
    #[tokio::test]
    async fn a_dead_letter_the_queue_never_held_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let record = b"{\"v\":1}".to_vec();
        let kept = spool.keep_dead_letter("k1", "r", record.clone(), 3, "backend answered 400");
        kept.await.unwrap();
        let dead = spool.get_dead("k1").unwrap().unwrap();
        let got = (dead.route.as_str(), dead.attempts, dead.error.as_str());
        assert_eq!(got, ("r", 3, "backend answered 400"));
        assert_eq!(dead.record, record);
        assert_eq!(spool.requeue(Some("k1")).await.unwrap(), 1);
        let queued = spool.queued_ids(Destination::Replay).unwrap();
        assert_eq!(queued, [("k1".to_string(), "r".to_string())]);
    }

    #[test]
    fn the_stats_read_indexes_not_records() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        let mut plan = c.prepare(&format!("EXPLAIN QUERY PLAN {STATS}")).unwrap();
        let steps: Vec<String> = plan
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let reads: Vec<&String> = steps
            .iter()
            .filter(|s| s.starts_with("SCAN ") || s.starts_with("SEARCH "))
            .filter(|s| !s.ends_with("CONSTANT ROW"))
            .collect();
        assert_eq!(reads.len(), 4, "{steps:?}");
        for read in reads {
            assert!(read.contains("COVERING INDEX"), "{read} in {steps:?}");
        }
    }
}
