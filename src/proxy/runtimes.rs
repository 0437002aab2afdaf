//! The two runtimes connections run on, and why. Accept loops, the setup of every connection
//! (PROXY header, TLS handshake, CONNECT, dial) and its first moments of relaying run on the
//! *setup* runtime, whose threads the binary starts at the lowest scheduling priority (Linux
//! `SCHED_IDLE`). A connection that has relayed for [`SETTLE`] moves, between two packets, to
//! the *relay* runtime at normal priority, where the control plane and the admin server run
//! too (docs/architecture.md, "Established devices first").
//!
//! Why: in a reconnect storm hundreds of handshakes are runnable at once, each step tens of
//! microseconds of signing that a thread cannot interrupt, and a packet for an established
//! device used to wait behind them in the same run queue. With the storm on threads the kernel
//! ranks below every normal thread, that packet's wake-up preempts a handshake at once, on any
//! instruction. The storm itself pays nothing for it: a connection that ends within [`SETTLE`]
//! (the storm's failed or short sessions) never moves, so handshakes cost what they cost on
//! one runtime, and a connection that lives on moves once.
//!
//! Without a setup runtime (tests, the library used on its own) connections stay on the
//! runtime that accepted them.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::Handle;

/// How long a connection relays on the setup runtime before it moves to the relay runtime.
/// Long enough that a storm's short sessions (refused, or a CONNECT, a CONNACK and gone)
/// end before it; short enough that a device reconnecting in a storm is soon served first.
pub const SETTLE: Duration = Duration::from_millis(250);

/// How long to wait before asking again when a connection had bytes under way at the moment
/// it was to move.
pub const SETTLE_RETRY: Duration = Duration::from_millis(20);

static SETUP: OnceLock<Handle> = OnceLock::new();

/// Names the runtime that accepts and sets up connections (once per process; the binary calls
/// it before it starts the proxy).
pub fn set_setup_runtime(handle: Handle) {
    let _ = SETUP.set(handle);
}

/// The setup runtime, when the process has one.
pub fn setup_runtime() -> Option<Handle> {
    SETUP.get().cloned()
}

/// Moves the calling thread to `SCHED_IDLE`: below every normal thread, preempted by any of
/// them that wakes. Returns the error when the system refuses (a seccomp profile that forbids
/// it): the thread then runs at normal priority, connections are still moved, and only the
/// preemption is lost.
pub fn lower_priority() -> Result<(), String> {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy, ThreadSchedulePolicy,
    };
    use thread_priority::ThreadPriority;
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle).map_err(|e| format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_can_lower_its_own_priority() {
        std::thread::spawn(|| {
            super::lower_priority().unwrap();
            assert_eq!(
                thread_priority::unix::thread_schedule_policy().unwrap(),
                thread_priority::unix::ThreadSchedulePolicy::Normal(
                    thread_priority::unix::NormalThreadSchedulePolicy::Idle
                )
            );
        })
        .join()
        .unwrap();
    }
}
