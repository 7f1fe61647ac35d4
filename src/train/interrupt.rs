//! Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM, which schedulers
//! send before they kill a job: the step under way finishes, a checkpoint
//! of it is written, and the run ends with an error that says how to
//! continue it.
//!
//! The handler is installed for the length of a run of one process (the
//! ranks of a run of several would have to agree on the step to stop at;
//! there both signals keep their usual effect) and the previous handlers
//! come back after it. A signal the process ignores (a job started with
//! `nohup`) stays ignored. The handler resets itself when it fires, so a
//! second Ctrl-C ends the process at once, as usual; checkpoints are
//! written atomically, so even that loses nothing already saved.
//!
//! The request is a process-wide flag because a signal handler can reach
//! nothing else; the training loop reads it between steps.
//!
//! SIGHUP (the terminal closed, or the sweep that started the run died)
//! stops the run the same way, however often it comes.
//!
//! A training process also ignores SIGPIPE from its first step on, and the
//! console asks for a stop when its output pipe has closed (`switchyard
//! train | tee log` with the `tee` gone, or a sweep killed under its
//! points): the run checkpoints its step and ends instead of dying at its
//! next line of output.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the handler, read by the training loop between steps.
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a stop was asked for since the handlers were installed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Ask the training loop to stop after the step under way, as a signal
/// does (the console, when its output has nowhere to go).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Ignore SIGPIPE for the rest of the process, so that a write to a closed
/// pipe fails instead of killing it. A training process writes its lines
/// through the console, which notices the failure, and ends with its error
/// through `main`'s return, which ignores one.
pub fn survive_closed_output() {
    #[cfg(unix)]
    // SAFETY: sets the disposition of one signal; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// The error a run stopped by a signal ends with: where it stopped, and
/// the command that continues it from `run_dir`.
pub fn stopped(step: u64, total: u64, run_dir: &Path) -> anyhow::Error {
    let name = run_dir.file_name().unwrap_or_default().to_string_lossy();
    let runs = run_dir.parent().unwrap_or(Path::new("."));
    anyhow::anyhow!(
        "interrupted: stopped after step {step} of {total} and saved a checkpoint of it; \
         continue with `switchyard train --config <the same config> --runs-dir {} \
         --name {name} --resume`",
        runs.display()
    )
}

/// The handlers, installed while this lives.
pub struct StopOnSignal {
    #[cfg(unix)]
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

#[cfg(unix)]
extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: nothing else is safe in a signal handler.
    REQUESTED.store(true, Ordering::SeqCst);
}

impl StopOnSignal {
    /// Catch SIGINT, SIGTERM and SIGHUP until dropped.
    pub fn install() -> Self {
        REQUESTED.store(false, Ordering::SeqCst);
        #[cfg(unix)]
        {
            let mut previous = Vec::new();
            for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                // SAFETY: sigaction with zeroed, then filled, structs; the
                // handler only stores to an atomic.
                unsafe {
                    let mut old: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(signal, std::ptr::null(), &mut old) != 0
                        || old.sa_sigaction == libc::SIG_IGN
                    {
                        continue;
                    }
                    let mut new: libc::sigaction = std::mem::zeroed();
                    new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                    // A second SIGHUP asks for nothing more: the kernel
                    // may send a sweep's point several when the sweep dies
                    // (one as each of its threads goes).
                    new.sa_flags = if signal == libc::SIGHUP {
                        libc::SA_RESTART
                    } else {
                        libc::SA_RESETHAND | libc::SA_RESTART
                    };
                    libc::sigemptyset(&mut new.sa_mask);
                    if libc::sigaction(signal, &new, std::ptr::null_mut()) == 0 {
                        previous.push((signal, old));
                    }
                }
            }
            Self { previous }
        }
        #[cfg(not(unix))]
        Self {}
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        #[cfg(unix)]
        for (signal, old) in &self.previous {
            // SAFETY: puts back the action read in `install`.
            unsafe {
                libc::sigaction(*signal, old, std::ptr::null_mut());
            }
        }
    }
}
