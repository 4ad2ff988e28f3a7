//! Deterministic "OS randomness" for a simulation thread.
//!
//! Randomness reaches a run from places the simulator does not control: `std`'s `HashMap` keys,
//! tokio's per-runtime RNG (which picks the branch order of every `select!`), `rand`'s thread RNG
//! (openraft's election timeouts, the client's session id and backoff jitter). All of them are
//! seeded, in the end, by the `getrandom` C function. This module defines that symbol in the
//! simulator's binaries, so the linker binds every caller in the process to it, and answers from a
//! per-thread generator seeded with the run's seed. A thread that was never seeded gets real
//! entropy from the kernel, so the Jepsen runner and the tests' own threads are unaffected.
//!
//! A run must own its thread from the start ([`crate::sim::run`] spawns one): `std` draws its
//! hash keys once per thread, and tokio's seed generator once per runtime, so a thread that had
//! already drawn real entropy could not be made deterministic afterwards.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

thread_local! {
    static RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Bytes served from seeded generators, process-wide: lets a test prove the override is linked.
static SEEDED_DRAWS: AtomicU64 = AtomicU64::new(0);

/// From now on, randomness drawn on this thread comes from `seed`.
pub fn seed_this_thread(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = Some(StdRng::seed_from_u64(seed ^ 0x5EED_0FBA_5A17)));
}

/// How many `getrandom` calls seeded generators have answered in this process.
pub fn seeded_draws() -> u64 {
    SEEDED_DRAWS.load(Ordering::Relaxed)
}

/// The libc `getrandom(3)` entry point, overridden (see the module documentation).
///
/// # Safety
/// The caller guarantees, as for libc's, that `buf` is valid for `len` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getrandom(buf: *mut u8, len: usize, flags: u32) -> isize {
    let served = RNG
        .try_with(|r| match r.try_borrow_mut() {
            Ok(mut slot) => match slot.as_mut() {
                Some(rng) => {
                    // SAFETY: the caller guarantees `buf` is valid for `len` bytes.
                    let out = unsafe { std::slice::from_raw_parts_mut(buf, len) };
                    rng.fill_bytes(out);
                    true
                }
                None => false,
            },
            Err(_) => false,
        })
        .unwrap_or(false);
    if served {
        SEEDED_DRAWS.fetch_add(1, Ordering::Relaxed);
        return len as isize;
    }
    // SAFETY: forwarded unchanged to the kernel, under the caller's guarantee.
    unsafe { libc::syscall(libc::SYS_getrandom, buf, len, flags) as isize }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;

    fn on_fresh_thread(seed: Option<u64>) -> (u64, u64) {
        std::thread::spawn(move || {
            if let Some(seed) = seed {
                seed_this_thread(seed);
            }
            let keys = RandomState::new().hash_one(42u64);
            let drawn = rand::random::<u64>();
            (keys, drawn)
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_seeded_thread_draws_the_same_hash_keys_and_random_numbers() {
        assert_eq!(on_fresh_thread(Some(7)), on_fresh_thread(Some(7)));
        assert_ne!(on_fresh_thread(Some(7)), on_fresh_thread(Some(8)));
        assert!(seeded_draws() > 0);
    }

    #[test]
    fn an_unseeded_thread_gets_real_entropy() {
        assert_ne!(on_fresh_thread(None), on_fresh_thread(None));
    }
}
