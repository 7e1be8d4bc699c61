//! Commands run under Landlock (Linux): they may read everywhere except the daemon's home
//! (its state file holds the token: a command that read it could approve its own prompts),
//! and write only in the session's workspace, the temporary directory, `/dev/null` and the
//! roots the user added (`--sandbox-write`). Where the kernel has no Landlock, commands run
//! unsandboxed and `/v3/health` says `sandbox: "none"`. Where the kernel has Landlock ABI 6,
//! they also cannot signal processes outside the sandbox (the daemon) or connect to abstract
//! sockets made outside it.
//!
//! The rules are built by the daemon and enforced by the command's own process between fork
//! and exec (Landlock restricts a thread and what it starts afterwards). Capabilities are
//! dropped on a short-lived thread that spawns the command; the daemon's own threads keep
//! theirs.

use std::path::{Path, PathBuf};

use rustix::thread::CapabilitySet;

use landlock::{
    ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope,
};

/// What sandboxed commands may do to `.git/config`, `.git/hooks` and `.git/info` (reported by
/// `/v3/health`): they stay writable, since `git add` and `git commit` must work and Landlock
/// cannot take a path out of a writable tree; a mount namespace could bind them read-only,
/// but a command can still rename `.git` away or plant `.git/commondir`, so that would not be
/// a boundary either. The boundary is elsewhere: the file tools always ask before writing
/// there, and a `git` grant holds only while they are unchanged.
pub const GIT_METADATA: &str = "writable";

/// The Landlock ABI the rules are written for; older kernels enforce what they know.
const TARGET_ABI: ABI = ABI::V5;
/// The ABI of the scopes (6: signals and abstract sockets); older kernels go without them.
const SCOPE_ABI: ABI = ABI::V6;

/// Where sandboxed commands may write, and what they may not read.
#[derive(Debug, Clone)]
pub struct Sandbox {
    hidden: PathBuf,
    extra_writes: Vec<PathBuf>,
    available: bool,
}

impl Sandbox {
    /// The sandbox for a daemon whose home is `hidden`; probes the kernel once.
    pub fn probe(hidden: &Path, extra_writes: Vec<PathBuf>) -> Self {
        let available = std::thread::spawn(|| {
            let status = Ruleset::default()
                .handle_access(AccessFs::from_all(TARGET_ABI))
                .and_then(|r| r.create())
                .and_then(|r| r.restrict_self());
            matches!(
                status.map(|s| s.ruleset),
                Ok(RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced)
            )
        })
        .join()
        .unwrap_or(false);
        Self {
            hidden: hidden.canonicalize().unwrap_or_else(|_| hidden.to_owned()),
            extra_writes,
            available,
        }
    }

    /// `landlock` when commands are confined, `none` when the kernel cannot.
    pub fn kind(&self) -> &'static str {
        if self.available { "landlock" } else { "none" }
    }

    /// Spawns `command` confined to write in `workspace` (and the other write roots).
    pub async fn spawn(
        &self,
        command: tokio::process::Command,
        workspace: &Path,
    ) -> std::io::Result<tokio::process::Child> {
        self.spawn_with(command, workspace, None).await
    }

    /// Spawns `command` confined to write in the open workspace: its write rule names the
    /// directory the session opened (its handle), not whatever its path names now.
    pub async fn spawn_in(
        &self,
        command: tokio::process::Command,
        workspace: &crate::agent::Workspace,
    ) -> std::io::Result<tokio::process::Child> {
        // A workspace that holds the home (`--allow-any-workspace`) is split around it by
        // path; any other is named by its handle.
        let handle = if self.hidden.starts_with(workspace.root()) {
            None
        } else {
            Some(workspace.dir().try_clone()?)
        };
        self.spawn_with(command, workspace.root(), handle).await
    }

    async fn spawn_with(
        &self,
        mut command: tokio::process::Command,
        workspace: &Path,
        handle: Option<cap_std::fs::Dir>,
    ) -> std::io::Result<tokio::process::Child> {
        if !self.available {
            return spawn_from_thread(move || drop_capabilities().and_then(|()| command.spawn()))
                .await;
        }
        let reads = read_roots(&self.hidden);
        let mut wanted = vec![std::env::temp_dir(), "/dev/null".into()];
        if handle.is_none() {
            wanted.push(workspace.to_owned());
        }
        wanted.extend(self.extra_writes.iter().cloned());
        // A write root above the daemon's home (a home in /tmp) must not expose it.
        let writes: Vec<PathBuf> = wanted
            .iter()
            .map(|root| root.canonicalize().unwrap_or_else(|_| root.clone()))
            .flat_map(|root| except(&root, &self.hidden))
            .collect();
        spawn_from_thread(move || {
            drop_capabilities()?;
            let ruleset = ruleset(&reads, &writes, handle)?;
            // SAFETY: two system calls between fork and exec, nothing allocated.
            unsafe {
                command.pre_exec(move || restrict(ruleset.as_ref()));
            }
            command.spawn()
        })
        .await
    }
}

/// Runs `spawn` on a short-lived thread of its own: what it restricts (capabilities, the
/// Landlock domain) is that thread's and its children's, never the daemon's.
async fn spawn_from_thread(
    spawn: impl FnOnce() -> std::io::Result<tokio::process::Child> + Send + 'static,
) -> std::io::Result<tokio::process::Child> {
    let runtime = tokio::runtime::Handle::current();
    let (reply, answer) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _entered = runtime.enter();
        let _ = reply.send(spawn());
    });
    answer
        .await
        .map_err(|_| std::io::Error::other("the sandbox thread failed"))?
}

/// Capabilities a sandboxed command never holds, even run as root: each reaches past the
/// sandbox (the daemon's memory and environment through ptrace or `/proc`, kernel modules,
/// device nodes that read the disk raw, mounts, raw I/O, file handles, BPF).
const DROPPED_CAPABILITIES: CapabilitySet = CapabilitySet::SYS_PTRACE
    .union(CapabilitySet::SYS_MODULE)
    .union(CapabilitySet::SYS_RAWIO)
    .union(CapabilitySet::MKNOD)
    .union(CapabilitySet::SYS_ADMIN)
    .union(CapabilitySet::SYS_BOOT)
    .union(CapabilitySet::SYS_TIME)
    .union(CapabilitySet::DAC_READ_SEARCH)
    .union(CapabilitySet::BPF)
    .union(CapabilitySet::PERFMON)
    .union(CapabilitySet::MAC_ADMIN)
    .union(CapabilitySet::MAC_OVERRIDE)
    .union(CapabilitySet::AUDIT_CONTROL)
    .union(CapabilitySet::SYSLOG);

/// Removes [`DROPPED_CAPABILITIES`] from the calling thread (and so from what it starts): from
/// its bounding set, so no program it runs gets them back, and from its own sets. A thread
/// that never had them (not root) changes nothing.
fn drop_capabilities() -> std::io::Result<()> {
    for capability in DROPPED_CAPABILITIES.iter() {
        // Needs CAP_SETPCAP; without it the thread has none of these to lose.
        let _ = rustix::thread::remove_capability_from_bounding_set(capability);
    }
    let mut sets = rustix::thread::capabilities(None)?;
    sets.effective.remove(DROPPED_CAPABILITIES);
    sets.permitted.remove(DROPPED_CAPABILITIES);
    sets.inheritable.remove(DROPPED_CAPABILITIES);
    rustix::thread::set_capabilities(None, sets)?;
    Ok(())
}

/// The ruleset for the rules, to be enforced in the command's process ([`restrict`]), after
/// whatever else it sets up (a PID namespace's supervisor and init are not confined; they run
/// only the daemon's code). `None` where the kernel enforces nothing.
fn ruleset(
    reads: &[PathBuf],
    writes: &[PathBuf],
    workspace: Option<cap_std::fs::Dir>,
) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::from_read(TARGET_ABI);
    let fail = |e: landlock::RulesetError| std::io::Error::other(format!("sandbox: {e}"));
    // Scoped (where the kernel has ABI 6): no signal to a process outside the sandbox (the
    // daemon: SIGSTOP, SIGKILL) and no connection to its abstract sockets. A sandboxed
    // process can never ptrace one outside either (Landlock's rule since ABI 1), so the
    // daemon's memory and `/proc/PID/environ` are out of reach.
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .map_err(fail)?
        .scope(Scope::from_all(SCOPE_ABI))
        .map_err(fail)?
        .create()
        .map_err(fail)?;
    for (paths, access) in [(reads, read), (writes, all)] {
        for path in paths {
            // A root that does not exist (a temp dir not made yet) is skipped.
            if let Ok(fd) = PathFd::new(path) {
                ruleset = ruleset
                    .add_rule(PathBeneath::new(fd, access))
                    .map_err(fail)?;
            }
        }
    }
    if let Some(dir) = workspace {
        ruleset = ruleset.add_rule(PathBeneath::new(dir, all)).map_err(fail)?;
    }
    Ok(ruleset.into())
}

/// Restricts the calling process (a command between fork and exec) to `ruleset`.
fn restrict(ruleset: Option<&std::os::fd::OwnedFd>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let Some(ruleset) = ruleset else {
        return Ok(());
    };
    // SAFETY: plain system calls; the descriptor is open (the command owns it until exec).
    unsafe {
        // Required to restrict without CAP_SYS_ADMIN; no program it runs gains privileges.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Every directory that may be read: everything except the branch that holds `hidden`.
fn read_roots(hidden: &Path) -> Vec<PathBuf> {
    except(Path::new("/"), hidden)
}

/// `top` as rule roots, minus the branch down to `hidden` when `hidden` lies inside it (the
/// siblings at each level are kept whole; `hidden` itself is left out). Rules only add
/// access, so a hidden path is kept out by never naming a root above it.
fn except(top: &Path, hidden: &Path) -> Vec<PathBuf> {
    let Ok(below) = hidden.strip_prefix(top) else {
        return vec![top.to_owned()];
    };
    let mut roots = Vec::new();
    let mut level = top.to_owned();
    for part in below.components() {
        let next = level.join(part);
        if let Ok(entries) = std::fs::read_dir(&level) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path != next {
                    roots.push(path);
                }
            }
        }
        level = next;
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::read_roots;

    #[test]
    fn a_write_root_above_the_hidden_path_is_split_around_it() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("home/daemon")).unwrap();
        std::fs::create_dir_all(root.join("scratch")).unwrap();
        let roots = super::except(&root, &root.join("home/daemon"));
        assert_eq!(roots, vec![root.join("scratch")]);
        let elsewhere = super::except(&root.join("scratch"), &root.join("home/daemon"));
        assert_eq!(elsewhere, vec![root.join("scratch")]);
    }

    #[test]
    fn the_hidden_branch_is_left_out_and_its_siblings_kept() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("home/daemon")).unwrap();
        std::fs::create_dir_all(root.join("home/work")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        let roots = read_roots(&root.join("home/daemon"));
        assert!(roots.contains(&root.join("other")));
        assert!(roots.contains(&root.join("home/work")));
        assert!(
            !roots
                .iter()
                .any(|r| root.join("home/daemon").starts_with(r))
        );
        assert!(roots.contains(&std::path::PathBuf::from("/usr")));
    }
}
