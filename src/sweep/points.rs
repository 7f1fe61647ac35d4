//! A sweep's hold on the processes that train its points: a stop passed
//! on while the sweep lives, and a stop that reaches them when it dies.

use std::process::Command;

/// Ask a point's process to stop after its current step.
pub(super) fn pass_on_stop(child: &std::process::Child) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signals a child process this sweep started and has not
        // yet waited for.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    #[cfg(not(unix))]
    let _ = child;
}

/// Make a point's process stop when this thread of the sweep ends, even
/// when the sweep itself is killed with a signal it cannot catch (SIGKILL,
/// an out-of-memory kill): the point gets a SIGHUP, checkpoints the step
/// under way and exits, instead of training on unwatched. On Linux the
/// signal follows the thread that started the process (each point's thread
/// waits for its process before it ends), and a dying sweep may send it
/// once per thread, which is why it is SIGHUP: a run stops on the first and
/// ignores the rest, where a second SIGTERM would end it at once.
pub(super) fn stop_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and
        // makes only async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The sweep may have died between fork and prctl.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    libc::_exit(129);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
