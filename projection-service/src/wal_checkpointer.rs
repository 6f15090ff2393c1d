//! Background WAL checkpoints for a rebuild's writer on the embedded store:
//! the writer's connection never checkpoints on commit; this thread does, on
//! a connection of its own, so copying the WAL into the read-model file and
//! syncing it overlap the next batches instead of stalling the writer.
//!
//! Why: with SQLite's automatic checkpoint a rebuild's writer spent about a
//! third of its time in `COMMIT`s that checkpointed (a 64 MiB copy and an
//! fsync every few dozen batches), and the fold waited for it
//! (bench/README.md, cause 4).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rusqlite::Connection;

/// Checkpoints the WAL of one read-model file while its owner writes.
pub(crate) struct WalCheckpointer {
    nudges: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Frames in the WAL at the last checkpoint (0 after a restart).
    frames: Arc<AtomicI64>,
    restart_at_pages: i64,
    /// Held while either connection checkpoints: SQLite answers a second
    /// checkpoint `SQLITE_BUSY` at once rather than waiting for the first.
    checkpointing: Arc<Mutex<()>>,
}

impl WalCheckpointer {
    /// Starts the thread on `connection` (the same file as the writer's).
    /// After each commit ([`committed`](Self::committed)) it copies what is
    /// committed into the file without blocking the writer (`PASSIVE`).
    pub(crate) fn start(connection: Connection, restart_at_pages: i64) -> std::io::Result<Self> {
        // One nudge waiting is enough: a checkpoint copies every commit before it.
        let (nudges, nudged) = sync_channel::<()>(1);
        let frames = Arc::new(AtomicI64::new(0));
        let seen = frames.clone();
        let serial = Arc::new(Mutex::new(()));
        let checkpointing = serial.clone();
        let thread = std::thread::Builder::new()
            .name("crm-wal-checkpoint".into())
            .spawn(move || {
                while nudged.recv().is_ok() {
                    let passive = {
                        let _one_at_a_time = lock(&serial);
                        wal_checkpoint(&connection, "PASSIVE")
                    };
                    match passive {
                        Ok((_, in_wal, _)) => seen.store(in_wal, Ordering::Relaxed),
                        // Not fatal: what is committed stays in the WAL, and the
                        // next checkpoint copies it.
                        Err(error) => {
                            tracing::warn!(%error, "rebuild: background WAL checkpoint failed")
                        }
                    }
                }
            })?;
        Ok(Self {
            nudges: Some(nudges),
            thread: Some(thread),
            frames,
            restart_at_pages,
            checkpointing,
        })
    }

    /// Called by the writer on its own connection after each commit. Once the
    /// WAL holds `restart_at_pages`, the writer makes its next commit start
    /// the WAL over (`RESTART`: copies the little the thread has not, syncs,
    /// waits for readers of the WAL), so the WAL stays about that size, as
    /// SQLite's automatic checkpoint keeps it. It is the writer's job because
    /// a checkpoint wanting the write lock from another connection would
    /// wait for a gap between the writer's transactions that never comes.
    /// Then asks the thread for a checkpoint.
    pub(crate) fn committed(&self, writer: &Connection) {
        if self.frames.load(Ordering::Relaxed) >= self.restart_at_pages {
            let restarted = {
                let _one_at_a_time = lock(&self.checkpointing);
                wal_checkpoint(writer, "RESTART")
            };
            match restarted {
                Ok((0, _, _)) => self.frames.store(0, Ordering::Relaxed),
                // Busy (another process checkpointing, or a reader that outlasted
                // the busy timeout): tried again after the next commit.
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "rebuild: WAL restart failed"),
            }
        }
        let Some(nudges) = &self.nudges else { return };
        match nudges.try_send(()) {
            // Full: a nudge is waiting already.
            Ok(()) | Err(TrySendError::Full(())) => {}
            // The thread is gone (it panicked): the writer checkpoints itself,
            // as SQLite's automatic checkpoint would have.
            Err(TrySendError::Disconnected(())) => {
                if let Ok((_, in_wal, _)) = wal_checkpoint(writer, "PASSIVE") {
                    self.frames.store(in_wal, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Drop for WalCheckpointer {
    /// Stops the thread after the checkpoint it is running, if any.
    fn drop(&mut self) {
        self.nudges.take();
        if let Some(thread) = self.thread.take() {
            // A panic there lost nothing committed; the writer's outcome stands.
            let _ = thread.join();
        }
    }
}

/// `PRAGMA wal_checkpoint` in `mode`: (busy, frames in the WAL, frames copied).
fn wal_checkpoint(connection: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    connection.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    })
}

/// A poisoned lock guards nothing but the turn: take it anyway.
fn lock(turn: &Mutex<()>) -> MutexGuard<'_, ()> {
    turn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
