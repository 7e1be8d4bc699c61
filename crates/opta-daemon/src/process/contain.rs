//! Every command's processes, tracked to their end. Each command (`run_command`, a
//! background process) runs in a cgroup of its own, made under the daemon's cgroup for its
//! home (`opta-<hash of the home>`). The child joins it before it runs anything, so whatever
//! it starts is inside too, whether it calls `setsid`, forks twice or changes its process
//! group; stopping the command writes `cgroup.kill`, which kills all of them. A daemon that
//! was killed leaves its cgroups behind: the next start on the same home kills what is in
//! them and removes them ([`Containment::recover`]).
//!
//! Limits (`--command-max-procs`, `--command-max-memory-mb`) go through whichever hierarchy
//! has the `pids` and `memory` controllers: cgroup v2 where they are enabled, else the v1
//! hierarchy that has them (hybrid hosts); memory falls back to `RLIMIT_AS`. Where no cgroup
//! can be made (no cgroup v2, no permission), commands run in their own process group only
//! and `/v3/health` says `processes: "process-group"`.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What each command may use (flags `--command-max-procs`, `--command-max-memory-mb`; 0: no
/// limit).
#[derive(Debug, Clone, Copy)]
pub struct CommandCaps {
    /// Processes (and threads) at once.
    pub max_procs: u64,
    /// Memory in bytes.
    pub max_memory_bytes: u64,
}

impl Default for CommandCaps {
    fn default() -> Self {
        Self {
            max_procs: 256,
            max_memory_bytes: 4096 << 20,
        }
    }
}

/// How commands are tracked, probed once at start.
#[derive(Debug)]
pub struct Containment {
    caps: CommandCaps,
    /// The daemon's cgroup v2 directory for this home (`None`: process groups only).
    cgroup: Option<PathBuf>,
    /// Per limited controller, where its cgroups are made and the file that holds the limit.
    limited: Vec<Limit>,
}

#[derive(Debug)]
struct Limit {
    /// This home's directory in that hierarchy.
    dir: PathBuf,
    /// The controller, enabled for the cgroups below `dir` when it is the v2 one.
    controller: &'static str,
    /// The limit's file and its value.
    file: &'static str,
    value: u64,
}

/// How long a killed cgroup may take to empty before it is left for the next start.
const EMPTY_WAIT: Duration = Duration::from_secs(5);

impl Containment {
    /// Probes the host for `home`: makes (or finds) the daemon's cgroup directories.
    pub fn probe(home: &Path, caps: CommandCaps) -> Self {
        let name = format!("opta-{:016x}", fnv1a(home.as_os_str().as_encoded_bytes()));
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let cgroup = hierarchy_dir(&mounts, &own, None)
            .map(|dir| dir.join(&name))
            .filter(|dir| make_dir(dir) && dir.join("cgroup.kill").exists());
        let mut limited = Vec::new();
        for (controller, v2_file, v1_file, value) in [
            ("pids", "pids.max", "pids.max", caps.max_procs),
            (
                "memory",
                "memory.max",
                "memory.limit_in_bytes",
                caps.max_memory_bytes,
            ),
        ] {
            if value == 0 {
                continue;
            }
            let v2 = cgroup.as_ref().filter(|dir| enable(dir, controller));
            let place = match v2 {
                Some(dir) => Some((dir.clone(), v2_file)),
                None => hierarchy_dir(&mounts, &own, Some(controller))
                    .map(|dir| dir.join(&name))
                    .filter(|dir| make_dir(dir))
                    .map(|dir| (dir, v1_file)),
            };
            if let Some((dir, file)) = place {
                limited.push(Limit {
                    dir,
                    controller,
                    file,
                    value,
                });
            }
        }
        Self {
            caps,
            cgroup,
            limited,
        }
    }

    /// Process groups only, no cgroup and no limit (for tests of what runs inside).
    pub fn process_groups_only() -> Self {
        Self {
            caps: CommandCaps {
                max_procs: 0,
                max_memory_bytes: 0,
            },
            cgroup: None,
            limited: Vec::new(),
        }
    }

    /// `cgroup` when every command is tracked to its end, `process-group` when only its
    /// process group is.
    pub fn kind(&self) -> &'static str {
        if self.cgroup.is_some() {
            "cgroup"
        } else {
            "process-group"
        }
    }

    /// Kills what a previous run of this home's daemon left in its cgroups (it was killed,
    /// so it could not) and removes them, the v2 ones first (their kill empties the v1 ones).
    /// Answers how many cgroup directories were left.
    pub fn recover(&self) -> usize {
        let mut found = 0;
        for top in self.tops() {
            for entry in std::fs::read_dir(top).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    found += 1;
                    kill_and_remove(&entry.path());
                }
            }
        }
        found
    }

    /// Removes this home's cgroup directories when empty (after [`Self::recover`] at start,
    /// and at shutdown): a command makes them again, so idle daemons and tests leave none.
    pub fn release(&self) {
        for top in self.tops() {
            let _ = std::fs::remove_dir(top);
        }
    }

    fn tops(&self) -> impl Iterator<Item = &Path> {
        self.cgroup
            .iter()
            .map(PathBuf::as_path)
            .chain(self.limited.iter().map(|l| l.dir.as_path()))
    }

    /// Makes `command` start in a cgroup of its own (and its limits): the child joins it
    /// before it runs anything. The cell kills everything inside when dropped.
    pub fn prepare(&self, command: &mut tokio::process::Command) -> io::Result<Cell> {
        let id = format!("cmd-{:016x}", rand::random::<u64>());
        let mut cell = Cell {
            dirs: Vec::new(),
            kill: None,
            joins: Vec::new(),
        };
        if let Some(top) = &self.cgroup {
            let dir = top.join(&id);
            for limit in self.limited.iter().filter(|l| &l.dir == top) {
                make_dirs(top)?;
                enable(top, limit.controller);
            }
            make_dirs(&dir)?;
            cell.kill = Some(dir.join("cgroup.kill"));
            cell.dirs.push(dir);
        }
        let mut memory_limited = false;
        for limit in &self.limited {
            let dir = limit.dir.join(&id);
            if !cell.dirs.contains(&dir) {
                make_dirs(&dir)?;
                cell.dirs.push(dir.clone());
            }
            std::fs::write(dir.join(limit.file), limit.value.to_string())?;
            memory_limited |= limit.controller == "memory";
        }
        for dir in &cell.dirs {
            let procs = OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?;
            cell.joins.push(OwnedFd::from(procs));
        }
        let joins: Vec<i32> = cell.joins.iter().map(AsRawFd::as_raw_fd).collect();
        let address_space = (!memory_limited && self.caps.max_memory_bytes > 0)
            .then_some(self.caps.max_memory_bytes);
        // SAFETY: runs in the child between fork and exec; it only makes system calls
        // (write to descriptors opened above, which the child holds until exec; setrlimit)
        // and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                for fd in &joins {
                    // "0" moves the writer, this child, into the cgroup.
                    let fd = rustix::fd::BorrowedFd::borrow_raw(*fd);
                    rustix::io::write(fd, b"0")?;
                }
                if let Some(bytes) = address_space {
                    let limit = rustix::process::Rlimit {
                        current: Some(bytes),
                        maximum: Some(bytes),
                    };
                    rustix::process::setrlimit(rustix::process::Resource::As, limit)?;
                }
                Ok(())
            });
        }
        Ok(cell)
    }
}

/// One command's cgroups. Dropping it kills every process in them (`cgroup.kill`) and
/// removes them once empty (on a thread of its own: never on the runtime).
#[derive(Debug)]
pub struct Cell {
    dirs: Vec<PathBuf>,
    kill: Option<PathBuf>,
    joins: Vec<OwnedFd>,
}

impl Cell {
    /// Kills every process of the command, those that left its process group included
    /// (where it has a v2 cgroup; its v1 cgroups are emptied when it is dropped).
    pub fn kill(&self) {
        if let Some(kill) = &self.kill {
            let _ = std::fs::write(kill, "1");
        }
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        self.kill();
        self.joins.clear();
        // Usually empty already (the command ended and left nothing): removed at once;
        // else on a thread that waits for the kill to take.
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.retain(|dir| {
            let gone = std::fs::remove_dir(dir).is_ok();
            if gone {
                remove_home_dir(dir);
            }
            !gone
        });
        if dirs.is_empty() {
            return;
        }
        std::thread::spawn(move || {
            for dir in dirs {
                kill_and_remove(&dir);
                remove_home_dir(&dir);
            }
        });
    }
}

/// Removes the home's directory above a command's cgroup `dir`, when that was its last.
fn remove_home_dir(dir: &Path) {
    if let Some(top) = dir.parent() {
        let _ = std::fs::remove_dir(top);
    }
}

/// Kills what `dir` holds and removes it once it is empty (a cgroup cannot be removed
/// before), waiting at most [`EMPTY_WAIT`]; one left behind is removed by the next start.
/// A v1 cgroup has no `cgroup.kill`: its processes are killed one by one, again while new
/// ones appear.
fn kill_and_remove(dir: &Path) {
    let has_kill = std::fs::write(dir.join("cgroup.kill"), "1").is_ok();
    let deadline = Instant::now() + EMPTY_WAIT;
    loop {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!(cgroup = %dir.display(), "a command's cgroup did not empty in time");
            return;
        }
        if !has_kill {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Creates `dir` and its missing parents; again when a parent was removed meanwhile (the
/// last command of a home removes the home's directory).
fn make_dirs(dir: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 5 => tries += 1,
            other => return other,
        }
    }
}

/// Creates `dir` (its parent must exist); true when it exists afterwards.
fn make_dir(dir: &Path) -> bool {
    match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => true,
        Err(_) => false,
    }
}

/// Enables `controller` for the cgroups below `dir` (v2); true when it is enabled.
fn enable(dir: &Path, controller: &str) -> bool {
    let _ = OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.subtree_control"))
        .and_then(|mut f| f.write_all(format!("+{controller}").as_bytes()));
    std::fs::read_to_string(dir.join("cgroup.subtree_control"))
        .is_ok_and(|enabled| enabled.split_whitespace().any(|c| c == controller))
}

/// This process's cgroup directory in the v2 hierarchy (`controller` `None`) or in the v1
/// hierarchy that has `controller`, from `/proc/self/mountinfo` and `/proc/self/cgroup`.
fn hierarchy_dir(mountinfo: &str, own: &str, controller: Option<&str>) -> Option<PathBuf> {
    let (root, mount) = mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut fields = before.split(' ');
        let root = fields.nth(3)?;
        let mount = fields.next()?;
        let mut after = after.split(' ');
        let fstype = after.next()?;
        let options = after.nth(1).unwrap_or("");
        let wanted = match controller {
            None => fstype == "cgroup2",
            Some(c) => fstype == "cgroup" && options.split(',').any(|o| o == c),
        };
        wanted.then(|| (root.to_owned(), mount.to_owned()))
    })?;
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then(|| path.to_owned())
    })?;
    let below = path.strip_prefix(root.as_str()).unwrap_or(&path);
    Some(Path::new(&mount).join(below.trim_start_matches('/')))
}

/// FNV-1a: a stable name for a home (std's hasher may change between releases, and the
/// next start must find the cgroups the last one left).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
    const OWN: &str = "8:pids:/\n4:memory:/process_api/abc\n0::/user.slice/x.scope\n";

    #[test]
    fn hierarchies_are_found_from_mountinfo_and_the_own_cgroup() {
        assert_eq!(
            hierarchy_dir(MOUNTS, OWN, None),
            Some(PathBuf::from("/sys/fs/cgroup/unified/user.slice/x.scope"))
        );
        assert_eq!(
            hierarchy_dir(MOUNTS, OWN, Some("memory")),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        assert_eq!(
            hierarchy_dir(MOUNTS, OWN, Some("pids")),
            Some(PathBuf::from("/sys/fs/cgroup/pids"))
        );
        assert_eq!(hierarchy_dir(MOUNTS, OWN, Some("cpu")), None);
        // A mount of a sub-tree (a container's view): its root is taken off the path.
        let nested = "41 31 0:38 /docker/1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(
            hierarchy_dir(nested, "0::/docker/1/app\n", None),
            Some(PathBuf::from("/sys/fs/cgroup/app"))
        );
    }

    #[test]
    fn a_home_always_gets_the_same_name() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(
            fnv1a(b"/home/a/.config/opta"),
            fnv1a(b"/home/a/.config/opta")
        );
        assert_ne!(fnv1a(b"/home/a"), fnv1a(b"/home/b"));
    }
}
