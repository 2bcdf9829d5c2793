//! Child processes that cannot outlive the test process.
//!
//! Each child asks the kernel for SIGKILL when its parent dies
//! (`PR_SET_PDEATHSIG`). The kernel means the parent *thread*, and test threads are
//! short-lived, so every child is forked by one spawner thread that lives as long
//! as the process. Killing the runner (even with SIGKILL) therefore kills Envoy.

use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut command, reply) in receiver {
                    let _ = reply.send(spawn_tied(&mut command));
                }
                // The channel never closes while the process lives (the sender is
                // a static); keep this thread alive regardless.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawner thread");
        Mutex::new(sender)
    })
}

#[allow(unsafe_code)]
fn spawn_tied(command: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Spawns `command` so that it is killed when this process exits for any reason.
pub fn spawn(command: Command) -> std::io::Result<Child> {
    let (reply, result) = mpsc::channel();
    spawner().lock().expect("spawner lock").send((command, reply)).expect("spawner alive");
    result.recv().expect("spawner replies")
}

/// Whether a process is still running (a zombie counts as gone).
pub fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}
