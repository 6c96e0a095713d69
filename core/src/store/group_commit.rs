//! Group commit on the embedded Store's one writer connection.
//!
//! Every statement sent to SQLite through sqlx is a round trip to the connection's own thread,
//! and with one writer each write waits for the one before: the task holding the writer sends
//! its statement, the connection's thread wakes, runs it and answers, the task wakes and hands
//! the writer to the next task, which wakes and sends. On two busy cores each wake-up waits for
//! a CPU, and under load (runs created, claimed and ended on two workers at once) a one-row
//! write took half a millisecond, most of it this relay; every commit also wrote its own copies
//! of the same pages (the runs table's last leaf, its status index) to the write-ahead log.
//!
//! The hot writes (a run's creation, claim, step records and end) are queued instead. The first
//! write to find the queue idle starts a leader task; the leader takes the writer and everything
//! queued, and sends it as one query: `BEGIN IMMEDIATE`, each write's statements in turn, `COMMIT`
//! (one round trip, one commit), then answers each write and takes what queued meanwhile. A write
//! alone in the queue is the same query with one write in it, so an idle Store answers about as
//! fast as before.
//!
//! The statements use positional parameters (`?`) only: sqlx binds a query's arguments to its
//! statements in turn, and numbered ones (`?12`) would refer to the whole query's list. When the
//! query fails (one write's statement failed), the transaction is rolled back and each write run
//! again as a query of its own, so one bad write never fails the others.

use std::sync::Mutex;

use futures_util::TryStreamExt;
use sqlx::Executor;
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{Arguments, Either};
use tokio::sync::oneshot;

use super::sqlite::{Writer, backend};
use super::{Result, StoreError};

/// The most writes one commit takes; the rest wait for the next.
const MOST: usize = 32;
/// The most new runs a commit takes when nothing else waits...
const MOST_NEW: usize = 8;
/// ...and beside writes that running runs wait for.
const NEW_ALONGSIDE: usize = 2;

/// What one statement answered.
pub(super) struct Answer {
    pub rows: Vec<SqliteRow>,
    pub changes: u64,
}

pub(super) type BindError = sqlx::error::BoxDynError;

/// A write for the group commit.
pub(super) trait Write: Send + Sync + 'static {
    type Out: Send + 'static;
    /// Its statements, each ending in `;\n`, with positional parameters only, and how many.
    fn sql(&self) -> (&'static str, usize);
    /// Adds its arguments, in the order of its parameters.
    fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError>;
    /// Its result, from its statements' answers (one per statement).
    fn read(self, answers: Vec<Answer>) -> Result<Self::Out>;
    /// What it writes: where it goes in its group, and whether a running run waits for it.
    fn kind(&self) -> Kind;
    /// Whether it is left out when its caller has gone away before its group is taken (a step's
    /// "running" record its end overtook): nothing is written then, as when a caller goes away
    /// before it reaches the writer.
    fn droppable(&self) -> bool {
        false
    }
}

/// What a write writes. A group's writes are sent in this order (then by their statements, then
/// as queued), so that groups of the same writes are the same query and sqlx's statement cache
/// keeps a few queries, not one per order they came in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Kind {
    Claim,
    Step,
    Finish,
    /// A new run: the others are what running runs wait for, and go first (see [`take`]).
    NewRun,
}

impl Kind {
    /// Whether a running run waits for it.
    fn urgent(self) -> bool {
        self != Kind::NewRun
    }
}

trait Queued: Send + Sync {
    /// Whether it can be left out: droppable, and nobody waits for it any more.
    fn abandoned(&self) -> bool;
    fn kind(&self) -> Kind;
    fn sql(&self) -> (&'static str, usize);
    fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError>;
    fn answer(self: Box<Self>, answers: Result<Vec<Answer>>);
}

struct Pending<W: Write> {
    write: W,
    reply: oneshot::Sender<Result<W::Out>>,
}

impl<W: Write> Queued for Pending<W> {
    fn abandoned(&self) -> bool {
        self.write.droppable() && self.reply.is_closed()
    }

    fn kind(&self) -> Kind {
        self.write.kind()
    }

    fn sql(&self) -> (&'static str, usize) {
        self.write.sql()
    }

    fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError> {
        self.write.bind(args)
    }

    fn answer(self: Box<Self>, answers: Result<Vec<Answer>>) {
        let Pending { write, reply } = *self;
        // The caller may have gone away: its write is done all the same.
        let _ = reply.send(answers.and_then(|a| write.read(a)));
    }
}

#[derive(Default)]
pub(super) struct Queue {
    writes: Vec<Box<dyn Queued>>,
    /// Whether a leader task is running (it takes whatever is queued before it stops).
    leading: bool,
    /// How many groups were taken.
    groups: u64,
}

fn queue(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    match q.lock() {
        Ok(q) => q,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Writer {
    /// Queues `write` for the next group commit and waits for its answer, given once it is
    /// committed (or failed).
    pub(super) async fn write<W: Write>(&self, write: W) -> Result<W::Out> {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut q = queue(&self.queue);
            q.writes.push(Box::new(Pending { write, reply }));
            !std::mem::replace(&mut q.leading, true)
        };
        if lead {
            // A task of its own: a caller that goes away must not take the leader with it.
            let me = self.clone();
            tokio::spawn(async move { me.lead().await });
        }
        answer
            .await
            .map_err(|_| StoreError::Backend("the writer stopped before the write".into()))?
    }

    async fn lead(&self) {
        // However the leader ends (a panic in a write's reading, the runtime shutting down), the
        // queue does not stay with no leader and writes waiting.
        let _leaving = Leaving(self);
        loop {
            let mut conn = self.lock().await;
            let writes = {
                let mut q = queue(&self.queue);
                if q.writes.is_empty() {
                    return;
                }
                q.groups += 1;
                take(&mut q.writes)
            };
            let answers = match commit(&mut conn, &writes).await {
                Ok(answers) => answers.into_iter().map(Ok).collect(),
                Err(e) if writes.len() == 1 => vec![Err(e)],
                // Each on its own: only the one that fails fails.
                Err(_) => {
                    let mut answers = Vec::with_capacity(writes.len());
                    for write in &writes {
                        answers.push(
                            commit(&mut conn, std::slice::from_ref(write))
                                .await
                                .map(|mut a| a.pop().unwrap_or_default()),
                        );
                    }
                    answers
                }
            };
            drop(conn);
            for (write, answer) in writes.into_iter().zip(answers) {
                write.answer(answer);
            }
        }
    }
}

/// The writes for the next commit, out of `queued`: the urgent ones (all but new runs), with at most
/// [`NEW_ALONGSIDE`] others (new runs, in their order, which is their numbers' order); up to
/// [`MOST_NEW`] new runs when nothing urgent waits. A burst of new runs (a script, a webhook
/// storm) would otherwise put a commit of many runs' creation between every running run and its
/// next write; the queue of runs holds work enough for the workers meanwhile. The group is put in
/// [`Kind`]'s order. Two writes of one run are never reordered: a run's writes come one
/// after the other, but for a step's "running" record its end overtook (its caller went on), a
/// `Step` queued before that end: it goes before a `Finish` by kind and before another `Step` by
/// the queue's order (and a record written after the run's end would be refused by its claim).
fn take(queued: &mut Vec<Box<dyn Queued>>) -> Vec<Box<dyn Queued>> {
    queued.retain(|w| !w.abandoned());
    let urgent_count = queued
        .iter()
        .filter(|w| w.kind().urgent())
        .count()
        .min(MOST);
    let mut others = if urgent_count == 0 {
        MOST_NEW
    } else {
        NEW_ALONGSIDE
    };
    let mut urgent_left = urgent_count;
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    for write in queued.drain(..) {
        if write.kind().urgent() && urgent_left > 0 {
            urgent_left -= 1;
            taken.push(write);
        } else if !write.kind().urgent() && others > 0 {
            others -= 1;
            taken.push(write);
        } else {
            kept.push(write);
        }
    }
    *queued = kept;
    // Stable: writes of one kind and statements keep the queue's order.
    taken.sort_by_key(|w| (w.kind(), w.sql().0.as_ptr() as usize));
    taken
}

/// Ends a leader's turn: the next write starts a new leader; writes already queued get one now.
struct Leaving<'a>(&'a Writer);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        let mut q = queue(&self.0.queue);
        q.leading = false;
        if !q.writes.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            q.leading = true;
            let me = self.0.clone();
            runtime.spawn(async move { me.lead().await });
        }
    }
}

/// Runs `writes` as one query in one transaction; each write's answers, or the first error
/// (everything rolled back).
async fn commit(
    conn: &mut SqliteConnection,
    writes: &[Box<dyn Queued>],
) -> Result<Vec<Vec<Answer>>> {
    let mut sql = String::from("BEGIN IMMEDIATE;\n");
    let mut args = SqliteArguments::default();
    for write in writes {
        sql.push_str(write.sql().0);
        write
            .bind(&mut args)
            .map_err(|e| StoreError::Backend(format!("binding a write: {e}")))?;
    }
    sql.push_str("COMMIT;\n");
    let items: std::result::Result<Vec<_>, _> = conn
        .fetch_many(sqlx::query_with(sqlx::AssertSqlSafe(sql), args))
        .try_collect()
        .await;
    let items = match items {
        Ok(items) => items,
        Err(e) => {
            // Nothing of it stays. (When the BEGIN itself failed there is nothing to roll
            // back, and this fails too.)
            let _ = conn.execute("ROLLBACK").await;
            return Err(backend(e));
        }
    };
    // BEGIN's answer, then each statement's rows and answer, then COMMIT's.
    let mut items = items.into_iter();
    let mut statement = move || {
        let mut rows = Vec::new();
        for item in items.by_ref() {
            match item {
                Either::Right(row) => rows.push(row),
                Either::Left(done) => {
                    return Some(Answer {
                        rows,
                        changes: done.rows_affected(),
                    });
                }
            }
        }
        None
    };
    let missing =
        || StoreError::Backend("a group commit answered fewer statements than it ran".into());
    statement().ok_or_else(missing)?;
    let mut answers = Vec::with_capacity(writes.len());
    for write in writes {
        let count = write.sql().1;
        let mut own = Vec::with_capacity(count);
        for _ in 0..count {
            own.push(statement().ok_or_else(missing)?);
        }
        answers.push(own);
    }
    Ok(answers)
}

/// Adds `value` to `args` (for [`Write::bind`]).
pub(super) fn add<'t, T: sqlx::Encode<'t, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    args: &mut SqliteArguments,
    value: T,
) -> std::result::Result<(), BindError> {
    args.add(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    /// Inserts `x` into the test's own table: a second insert of the same `x` fails.
    struct Insert(i64);

    impl Write for Insert {
        type Out = u64;
        fn sql(&self) -> (&'static str, usize) {
            ("INSERT INTO group_commit_test (x) VALUES (?);\n", 1)
        }
        fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            add(args, self.0)
        }
        fn read(self, answers: Vec<Answer>) -> Result<u64> {
            Ok(answers.iter().map(|a| a.changes).sum())
        }
        fn kind(&self) -> Kind {
            Kind::Claim
        }
    }

    /// A Store in a folder of its own, with the tests' table.
    async fn with_table() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("skiff.db"))
            .await
            .expect("open");
        store
            .writer()
            .lock()
            .await
            .execute("CREATE TABLE group_commit_test (x INTEGER PRIMARY KEY)")
            .await
            .expect("table");
        (dir, store)
    }

    #[tokio::test]
    async fn writes_queued_together_commit_together_and_a_failing_one_fails_alone() {
        let (_dir, store) = with_table().await;
        let writer = store.writer();
        // Polled in one go, they are all queued before the leader runs: one group.
        let answers = futures_util::future::join_all(
            [1, 2, 2, 3].into_iter().map(|x| writer.write(Insert(x))),
        )
        .await;
        assert_eq!(queue(&writer.queue).groups, 1, "one group took the four");
        assert!(
            matches!(answers[0], Ok(1)),
            "{:?}",
            answers[0].as_ref().err()
        );
        assert!(
            matches!(answers[1], Ok(1)),
            "{:?}",
            answers[1].as_ref().err()
        );
        assert!(
            matches!(&answers[2], Err(StoreError::Backend(e)) if e.contains("UNIQUE")),
            "the second insert of 2 fails: {:?}",
            answers[2].as_ref().ok()
        );
        assert!(
            matches!(answers[3], Ok(1)),
            "{:?}",
            answers[3].as_ref().err()
        );
        let stored: Vec<i64> = sqlx::query_scalar("SELECT x FROM group_commit_test ORDER BY x")
            .fetch_all(&mut *writer.lock().await)
            .await
            .expect("read");
        assert_eq!(stored, vec![1, 2, 3], "the others committed, once each");
        // And the writer is free for the next group.
        assert!(matches!(writer.write(Insert(4)).await, Ok(1)));
    }

    /// A write that only says which it is, and its kind.
    struct Tagged(i64, Kind);

    impl Write for Tagged {
        type Out = i64;
        fn sql(&self) -> (&'static str, usize) {
            ("", 0)
        }
        fn bind(&self, _: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            Ok(())
        }
        fn read(self, _: Vec<Answer>) -> Result<i64> {
            Ok(self.0)
        }
        fn kind(&self) -> Kind {
            self.1
        }
    }

    #[test]
    fn running_runs_writes_go_first_with_a_few_new_runs_beside_them() {
        let mut answers = Vec::new();
        let mut queued: Vec<Box<dyn Queued>> = Vec::new();
        for (tag, kind) in [
            (1, Kind::NewRun),
            (2, Kind::NewRun),
            (3, Kind::NewRun),
            (4, Kind::Step),
            (5, Kind::NewRun),
            (6, Kind::Claim),
        ] {
            let (reply, answer) = oneshot::channel();
            queued.push(Box::new(Pending {
                write: Tagged(tag, kind),
                reply,
            }));
            answers.push(answer);
        }
        let taken = take(&mut queued);
        assert!(
            taken.windows(2).all(|w| w[0].kind() <= w[1].kind()),
            "a group is sent in its writes' kind order"
        );
        for write in taken {
            write.answer(Ok(Vec::new()));
        }
        let got: Vec<i64> = answers
            .iter_mut()
            .filter_map(|a| a.try_recv().ok().and_then(|r| r.ok()))
            .collect();
        assert_eq!(
            got,
            vec![1, 2, 4, 6],
            "both urgent writes and the first two new runs"
        );
        assert_eq!(queued.len(), 2, "the other new runs wait, in order");
        assert!(queued.iter().all(|w| w.kind() == Kind::NewRun));
        // With nothing urgent waiting, new runs go up to the most a group takes.
        assert_eq!(take(&mut queued).len(), 2);
    }

    /// A write whose reading panics (a row that is not what the write expects).
    struct Panics;

    impl Write for Panics {
        type Out = ();
        fn sql(&self) -> (&'static str, usize) {
            ("SELECT 1;\n", 1)
        }
        fn bind(&self, _: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            Ok(())
        }
        fn read(self, _: Vec<Answer>) -> Result<()> {
            panic!("a write that panics while its answer is read (on purpose)")
        }
        fn kind(&self) -> Kind {
            Kind::Claim
        }
    }

    #[tokio::test]
    async fn a_leader_that_panics_leaves_the_queue_to_the_next() {
        let (_dir, store) = with_table().await;
        let writer = store.writer();
        assert!(
            matches!(writer.write(Panics).await, Err(StoreError::Backend(_))),
            "its caller hears that the writer stopped"
        );
        let next =
            tokio::time::timeout(std::time::Duration::from_secs(10), writer.write(Insert(1)))
                .await
                .expect("a write after the panic is answered");
        assert!(matches!(next, Ok(1)), "{:?}", next.err());
    }

    /// [`Insert`], left out when nobody waits for it.
    struct MayDrop(Insert);

    impl Write for MayDrop {
        type Out = u64;
        fn sql(&self) -> (&'static str, usize) {
            self.0.sql()
        }
        fn bind(&self, args: &mut SqliteArguments) -> std::result::Result<(), BindError> {
            self.0.bind(args)
        }
        fn read(self, answers: Vec<Answer>) -> Result<u64> {
            self.0.read(answers)
        }
        fn kind(&self) -> Kind {
            self.0.kind()
        }
        fn droppable(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_droppable_write_whose_caller_went_away_is_left_out() {
        use futures_util::FutureExt;
        let (_dir, store) = with_table().await;
        let writer = store.writer();
        // Queued, then its caller goes away before the leader runs (one thread: it has not).
        assert!(writer.write(MayDrop(Insert(5))).now_or_never().is_none());
        assert!(writer.write(Insert(6)).now_or_never().is_none());
        assert!(matches!(writer.write(Insert(7)).await, Ok(1)));
        let stored: Vec<i64> = sqlx::query_scalar("SELECT x FROM group_commit_test ORDER BY x")
            .fetch_all(&mut *writer.lock().await)
            .await
            .expect("read");
        assert_eq!(
            stored,
            vec![6, 7],
            "the abandoned droppable write is left out, an abandoned other one is written"
        );
    }
}
