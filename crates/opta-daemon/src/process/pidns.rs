//! A PID namespace per command, for hosts where no cgroup can be made (a user without a
//! delegated cgroup, many containers). The command runs as process 2 of a namespace of its
//! own, under a small init (process 1) that waits for it and reaps orphans; when the
//! command ends, the init ends, and the kernel kills every process left in the namespace,
//! whether it called `setsid` or forked twice. The child the daemon started stays outside
//! as a supervisor: it writes the namespace's user mappings, then waits for the init and
//! passes on how the command ended; when the daemon dies (even by `kill -9`), the pipe it
//! watches closes and it kills the init, so nothing outlives the daemon either.
//!
//! ```text
//! daemon ── supervisor (outer ns, the command's process group leader)
//!              └── init (pid 1 of a new user + PID namespace; dies with the supervisor)
//!                     └── the command (pid 2) ── whatever it starts
//! ```
//!
//! A user namespace comes with it because an unprivileged user may only make a PID
//! namespace inside one. The user's own ids are mapped (all of them when the daemon is
//! root), so files keep their owners. Everything here runs between fork and exec of a
//! multi-threaded process: system calls only, nothing allocated.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What the child needs, prepared before the fork.
#[derive(Debug, Clone)]
pub(crate) struct Namespace {
    /// `/proc/PID/uid_map` and `gid_map` contents.
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    /// Not root: `setgroups` must be denied before the gid map, and the init's /proc files
    /// must be the user's while the supervisor writes the maps.
    unprivileged: bool,
    /// `RLIMIT_NPROC` inside the namespace (counted per user namespace since Linux 5.14;
    /// 0: none). Root is not held to it.
    max_procs: u64,
    /// The read end of the daemon's life pipe: it reads end-of-file once the daemon is gone.
    life: RawFd,
}

/// The daemon's life pipe: the daemon holds the write end until it ends; supervisors watch
/// the read end. Both ends are close-on-exec, so no command inherits them.
#[derive(Debug)]
pub(crate) struct LifePipe {
    read: OwnedFd,
    _write: OwnedFd,
}

impl LifePipe {
    pub(crate) fn new() -> io::Result<Self> {
        let [read, write] = pipe()?;
        // SAFETY: both descriptors were just made and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(read), OwnedFd::from_raw_fd(write)) };
        Ok(Self {
            read,
            _write: write,
        })
    }
}

impl Namespace {
    /// The namespace for commands of this daemon (its user, `max_procs`, its life pipe).
    pub(crate) fn new(life: &LifePipe, max_procs: u64) -> Self {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let root = uid == 0;
        let map = |id: u32| {
            if root {
                b"0 0 4294967295\n".to_vec()
            } else {
                format!("{id} {id} 1\n").into_bytes()
            }
        };
        Self {
            uid_map: map(uid),
            gid_map: map(gid),
            unprivileged: !root,
            max_procs: if nproc_is_per_namespace() {
                max_procs
            } else {
                0
            },
            life: life.read.as_raw_fd(),
        }
    }

    /// Called in the child between fork and exec: returns (`Ok`) only in the command's
    /// process, inside the new namespace; the supervisor and the init never return.
    ///
    /// # Safety
    /// Only between fork and exec, in a child whose other threads are gone.
    pub(crate) unsafe fn enter(&self) -> io::Result<()> {
        let sync = pipe()?;
        let status = match pipe() {
            Ok(status) => status,
            Err(e) => {
                close_pair(sync);
                return Err(e);
            }
        };
        // SAFETY: a raw clone without a new stack is a fork; the child only makes system
        // calls until it execs or exits.
        let init = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if init < 0 {
            let e = io::Error::last_os_error();
            close_pair(sync);
            close_pair(status);
            return Err(e);
        }
        if init == 0 {
            // SAFETY: the new init, single-threaded.
            return unsafe { self.init(sync, status) };
        }
        let init = init as libc::pid_t;
        // SAFETY: the supervisor, single-threaded.
        unsafe { self.supervise(init, sync, status) }
    }

    /// Process 1: waits for the supervisor's mappings, starts the command as process 2 (it
    /// returns `Ok` there), then reaps until the command ends and reports its status.
    unsafe fn init(&self, sync: [RawFd; 2], status: [RawFd; 2]) -> io::Result<()> {
        // SAFETY (whole function): plain system calls on descriptors this process owns.
        unsafe {
            libc::close(sync[1]);
            libc::close(status[0]);
            // Dies with the supervisor; set before the wait below, so a supervisor that died
            // earlier shows as end-of-file there.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            // The daemon is not dumpable, so this copy of it is not either, and its /proc
            // files belong to root: an unprivileged supervisor could not write the mappings.
            // Dumpable only until they are written (a sandboxed command cannot trace a
            // process outside its sandbox meanwhile, and none has started yet).
            if self.unprivileged {
                libc::prctl(libc::PR_SET_DUMPABLE, 1 as libc::c_ulong);
            }
            libc::write(status[1], b"r".as_ptr().cast(), 1);
            let mut byte = 0u8;
            let mapped = libc::read(sync[0], (&raw mut byte).cast(), 1) == 1;
            libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong);
            if !mapped {
                libc::_exit(127);
            }
            libc::close(sync[0]);
            if self.max_procs > 0 {
                let limit = libc::rlimit {
                    rlim_cur: self.max_procs,
                    rlim_max: self.max_procs,
                };
                libc::setrlimit(libc::RLIMIT_NPROC, &limit);
            }
            let command = libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            );
            if command < 0 {
                return Err(io::Error::last_os_error());
            }
            if command == 0 {
                libc::close(status[1]);
                return Ok(());
            }
            let command = command as libc::pid_t;
            // The init keeps nothing of the command's: its pipes end when the command's do.
            keep_only(&[status[1]]);
            loop {
                let mut wait_status: libc::c_int = 0;
                let reaped = libc::waitpid(-1, &mut wait_status, 0);
                if reaped == command {
                    libc::write(status[1], (&raw const wait_status).cast(), 4);
                    libc::_exit(0);
                }
                if reaped < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    libc::_exit(127);
                }
            }
        }
    }

    /// The supervisor (the daemon's child): maps the namespace's ids, lets the init go on,
    /// then waits for it, or for the daemon's end (then it kills the init), and ends as
    /// the command ended. Returns only an error in setting up, which the daemon then gets
    /// from `spawn`.
    unsafe fn supervise(
        &self,
        init: libc::pid_t,
        sync: [RawFd; 2],
        status: [RawFd; 2],
    ) -> io::Result<()> {
        // SAFETY (whole function): plain system calls on descriptors this process owns.
        unsafe {
            libc::close(sync[0]);
            libc::close(status[1]);
            let mut ready = 0u8;
            let mapped = if libc::read(status[0], (&raw mut ready).cast(), 1) == 1 {
                self.write_maps(init)
            } else {
                // The init ended before it could be mapped (no allocation here: an errno).
                Err(io::Error::from_raw_os_error(libc::ECHILD))
            };
            if let Err(e) = mapped {
                libc::kill(init, libc::SIGKILL);
                libc::close(sync[1]);
                libc::close(status[0]);
                libc::waitpid(init, std::ptr::null_mut(), 0);
                return Err(e);
            }
            // The group's signals are for the command (it is in the same process group); the
            // supervisor outlives them to report how it ended.
            for signal in [
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGUSR1,
                libc::SIGUSR2,
                libc::SIGPIPE,
                libc::SIGALRM,
            ] {
                libc::signal(signal, libc::SIG_IGN);
            }
            libc::write(sync[1], b"1".as_ptr().cast(), 1);
            libc::close(sync[1]);
            keep_only(&[self.life, status[0]]);
            let mut fds = [
                libc::pollfd {
                    fd: self.life,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: status[0],
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            loop {
                let ready = libc::poll(fds.as_mut_ptr(), 2, -1);
                if ready < 0 {
                    if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    libc::kill(init, libc::SIGKILL);
                    break;
                }
                if fds[0].revents != 0 {
                    // The daemon is gone: so is everything the command started.
                    libc::kill(init, libc::SIGKILL);
                    fds[0].fd = -1;
                }
                if fds[1].revents != 0 {
                    break;
                }
            }
            let mut reported: libc::c_int = 0;
            let got = libc::read(status[0], (&raw mut reported).cast(), 4);
            let mut init_status: libc::c_int = 0;
            libc::waitpid(init, &mut init_status, 0);
            let ended = if got == 4 { reported } else { init_status };
            if libc::WIFSIGNALED(ended) {
                let signal = libc::WTERMSIG(ended);
                libc::signal(signal, libc::SIG_DFL);
                libc::kill(libc::getpid(), signal);
                libc::_exit(128 + signal);
            }
            libc::_exit(libc::WEXITSTATUS(ended));
        }
    }

    /// Writes the init's uid and gid maps (from outside its namespace, where the daemon's
    /// user may map what it is).
    unsafe fn write_maps(&self, init: libc::pid_t) -> io::Result<()> {
        let mut path = ProcPath::new(init);
        if self.unprivileged {
            write_file(path.file(b"setgroups\0"), b"deny")?;
        }
        write_file(path.file(b"uid_map\0"), &self.uid_map)?;
        write_file(path.file(b"gid_map\0"), &self.gid_map)
    }
}

/// `/proc/PID/NAME` built on the stack.
struct ProcPath {
    buf: [u8; 64],
    base: usize,
}

impl ProcPath {
    fn new(pid: libc::pid_t) -> Self {
        let mut buf = [0u8; 64];
        let mut len = 0;
        for byte in b"/proc/" {
            buf[len] = *byte;
            len += 1;
        }
        let mut digits = [0u8; 12];
        let mut n = pid.unsigned_abs();
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in (0..count).rev() {
            buf[len] = digits[i];
            len += 1;
        }
        buf[len] = b'/';
        Self { buf, base: len + 1 }
    }

    /// The path of `name` (which ends in a NUL) in this process's directory.
    fn file(&mut self, name: &[u8]) -> *const libc::c_char {
        self.buf[self.base..self.base + name.len()].copy_from_slice(name);
        self.buf.as_ptr().cast()
    }
}

fn write_file(path: *const libc::c_char, contents: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed before returning.
    unsafe {
        let fd = libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, contents.as_ptr().cast(), contents.len());
        let result = if written == contents.len() as isize {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
        libc::close(fd);
        result
    }
}

fn pipe() -> io::Result<[RawFd; 2]> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fds)
}

fn close_pair(fds: [RawFd; 2]) {
    // SAFETY: both are this process's own, unused elsewhere.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

/// Closes every descriptor but `keep` (sorted or not, at most two).
unsafe fn keep_only(keep: &[RawFd]) {
    let mut keep_sorted = [RawFd::MAX; 2];
    for (slot, fd) in keep_sorted.iter_mut().zip(keep) {
        *slot = *fd;
    }
    keep_sorted.sort_unstable();
    let mut from: u32 = 0;
    for fd in keep_sorted.into_iter().filter(|fd| *fd != RawFd::MAX) {
        let fd = fd as u32;
        if fd > from {
            // SAFETY: closes descriptors this process no longer needs.
            unsafe { close_range(from, fd - 1) };
        }
        from = fd + 1;
    }
    // SAFETY: as above.
    unsafe { close_range(from, u32::MAX) };
}

unsafe fn close_range(first: u32, last: u32) {
    // SAFETY: the system call only closes descriptors.
    let done = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) } == 0;
    if !done {
        // Before Linux 5.9: one by one, as far as descriptors usually go.
        for fd in first..=last.min(65_535) {
            // SAFETY: as above.
            unsafe { libc::close(fd as RawFd) };
        }
    }
}

/// Whether `RLIMIT_NPROC` counts per user namespace (Linux 5.14 and later); before, it
/// counted all of the user's processes, and a limit would stop their other work.
fn nproc_is_per_namespace() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (5, 14)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_paths_are_built_without_allocating() {
        let mut path = ProcPath::new(40213);
        let file = path.file(b"uid_map\0");
        // SAFETY: `file` points into `path`, NUL-terminated.
        let text = unsafe { std::ffi::CStr::from_ptr(file) };
        assert_eq!(text.to_str().unwrap(), "/proc/40213/uid_map");
        let mut one = ProcPath::new(1);
        // SAFETY: as above.
        let text = unsafe { std::ffi::CStr::from_ptr(one.file(b"setgroups\0")) };
        assert_eq!(text.to_str().unwrap(), "/proc/1/setgroups");
    }
}
