//! The background writer: builds and writes the newest state off the sync
//! loop's thread, and flushes it on drop.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread::JoinHandle,
};

use super::{ProvenanceError, State};

/// A state file to build and write.
type Job = Box<dyn FnOnce() -> State + Send>;
/// What the writer reports after each write.
type Report = Box<dyn FnMut(&Path, Result<PathBuf, ProvenanceError>) + Send>;

#[derive(Default)]
struct Slot {
    next: Option<Job>,
    closed: bool,
}

/// Builds and writes state files on a thread of its own, so that the sync
/// loop never waits on serialization or the file system (a 10,000-pod
/// cluster's file takes about three times its compile). Newest wins: a
/// state superseded before the thread got to it is never written. The
/// file therefore lags the maps by one write at most; readers treat an
/// entry the file does not describe as stale. Dropping the writer writes
/// what is pending, then stops the thread.
pub struct Writer {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the thread writing to `dir`; `report` is called on it after
    /// every write.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(dir: PathBuf, mut report: Report) -> std::io::Result<Self> {
        let shared: Arc<(Mutex<Slot>, Condvar)> = Arc::default();
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("netpol-state".into())
            .spawn(move || {
                let (slot, cv) = &*theirs;
                loop {
                    let job = {
                        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
                        while s.next.is_none() && !s.closed {
                            s = cv.wait(s).unwrap_or_else(PoisonError::into_inner);
                        }
                        match s.next.take() {
                            Some(job) => job,
                            None => return,
                        }
                    };
                    let result = job().write(&dir);
                    report(&dir, result);
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands over the next state (replacing one not written yet).
    pub fn submit(&self, build: impl FnOnce() -> State + Send + 'static) {
        let (slot, cv) = &*self.shared;
        slot.lock().unwrap_or_else(PoisonError::into_inner).next = Some(Box::new(build));
        cv.notify_one();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let (slot, cv) = &*self.shared;
        slot.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
