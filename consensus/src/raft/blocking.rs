//! Where the replica's blocking storage work runs: log reads for replication and snapshot
//! build, install and verification.
//!
//! In a server that work goes to tokio's blocking pool, so a slow disk never stalls a runtime
//! worker. The deterministic simulator runs everything on one thread in simulated time; a pool
//! thread would finish on real time, at a point that differs from one run of a seed to the next,
//! so there the work runs inline instead (its engine is in memory and its snapshot files are
//! small). The choice is per thread because a simulation owns its whole thread: one run can never
//! switch another run's mode.

use std::cell::Cell;
use std::io;

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Makes blocking storage work started from this thread run inline, for the rest of the
/// thread's life. Only the simulator calls it.
pub fn run_inline_on_this_thread() {
    INLINE.with(|i| i.set(true));
}

/// Runs `f` off the async workers (or inline, see the module documentation).
pub async fn run<F, T>(f: F) -> io::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if INLINE.with(Cell::get) {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inline_mode_runs_on_the_calling_thread() {
        let caller = std::thread::current().id();
        let pooled = run(|| std::thread::current().id()).await.unwrap();
        assert_ne!(pooled, caller, "by default the work goes to the blocking pool");
        run_inline_on_this_thread();
        let inline = run(|| std::thread::current().id()).await.unwrap();
        assert_eq!(inline, caller);
    }
}
