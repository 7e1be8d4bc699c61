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
//! can be made (no cgroup v2, no permission), each command runs in a PID namespace of its own
//! (`pidns.rs`), which ends with the command and with the daemon; where neither can be had,
//! commands run in their own process group only. `/v3/health` says which: `processes:
//! "cgroup"`, `"pid-namespace"` or `"process-group"`.

use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::pidns::{LifePipe, Namespace};

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

/// How commands should be tracked (`--command-tracking`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tracking {
    /// The strongest the host allows: a cgroup, else a PID namespace, else a process group.
    #[default]
    Auto,
    /// A PID namespace (no cgroup), else a process group.
    PidNamespace,
    /// The command's process group only: what leaves it is not tracked.
    ProcessGroup,
}

impl Tracking {
    /// Every value, as the flag takes it.
    pub const ALL: [&'static str; 3] = ["auto", "pid-namespace", "process-group"];

    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::PidNamespace => "pid-namespace",
            Self::ProcessGroup => "process-group",
        }
    }
}

impl std::str::FromStr for Tracking {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "pid-namespace" => Ok(Self::PidNamespace),
            "process-group" => Ok(Self::ProcessGroup),
            other => Err(format!(
                "unknown command tracking {other:?} (one of {})",
                Self::ALL.join(", ")
            )),
        }
    }
}

/// How commands are tracked, probed once at start.
#[derive(Debug)]
pub struct Containment {
    caps: CommandCaps,
    /// The daemon's cgroup v2 directory for this home (`None`: no cgroups).
    cgroup: Option<PathBuf>,
    /// Without a cgroup: a PID namespace per command, and the pipe that tells its
    /// supervisor the daemon is gone.
    namespace: Option<(Namespace, LifePipe)>,
    /// With neither: where each `run_command`'s process group is recorded while it runs
    /// (`<pgid>-<start ticks>`), so the next start can end what a killed daemon left.
    /// Background processes are recorded in the store.
    records: Option<PathBuf>,
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
    /// Probes the host for `home`: makes (or finds) the daemon's cgroup directories, else
    /// tries a PID namespace (as `tracking` allows).
    pub fn probe(home: &Path, caps: CommandCaps, tracking: Tracking) -> Self {
        let records = home.join("commands");
        if tracking != Tracking::Auto {
            return Self::without_cgroups(caps, tracking, records);
        }
        let name = format!("opta-{:016x}", fnv1a(home.as_os_str().as_encoded_bytes()));
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let cgroup = hierarchy_dir(&mounts, &own, None)
            .map(|dir| dir.join(&name))
            .filter(|dir| make_dir(dir) && dir.join("cgroup.kill").exists());
        if cgroup.is_none() {
            return Self::without_cgroups(caps, Tracking::PidNamespace, records);
        }
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
            namespace: None,
            records: None,
            limited,
        }
    }

    /// No cgroup: a PID namespace per command where `tracking` asks for one and the host
    /// allows it (tried once, with `true`), else process groups, recorded in `records`.
    fn without_cgroups(caps: CommandCaps, tracking: Tracking, records: PathBuf) -> Self {
        let namespace = (tracking == Tracking::PidNamespace)
            .then(LifePipe::new)
            .and_then(Result::ok)
            .map(|life| (Namespace::new(&life, caps.max_procs), life))
            .filter(|(namespace, _)| namespace_works(namespace));
        let records = namespace.is_none().then_some(records);
        Self {
            caps,
            cgroup: None,
            namespace,
            records,
            limited: Vec::new(),
        }
    }

    /// Process groups only, no cgroup, no limit and no record (for tests of what runs
    /// inside).
    pub fn process_groups_only() -> Self {
        Self {
            caps: CommandCaps {
                max_procs: 0,
                max_memory_bytes: 0,
            },
            cgroup: None,
            namespace: None,
            records: None,
            limited: Vec::new(),
        }
    }

    /// `cgroup` or `pid-namespace` when every command is tracked to its end,
    /// `process-group` when only its process group is.
    pub fn kind(&self) -> &'static str {
        if self.cgroup.is_some() {
            "cgroup"
        } else if self.namespace.is_some() {
            "pid-namespace"
        } else {
            "process-group"
        }
    }

    /// Kills what a previous run of this home's daemon left in its cgroups (it was killed,
    /// so it could not) and removes them, the v2 ones first (their kill empties the v1 ones).
    /// Also removes the empty command cgroups other homes' daemons left when they ended
    /// before their clean-up did (test runs end that way). Answers how many cgroup
    /// directories this home had left.
    pub fn recover(&self) -> usize {
        if let Some(records) = &self.records {
            end_recorded_groups(records);
        }
        for top in self.tops() {
            if let Some(parent) = top.parent() {
                sweep_stale(parent, STALE_AFTER);
            }
        }
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
            record: None,
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
        let namespace = self
            .namespace
            .as_ref()
            .map(|(namespace, _)| namespace.clone());
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
                match &namespace {
                    // Returns here only in the command's process, inside its namespace.
                    Some(namespace) => namespace.enter(),
                    None => Ok(()),
                }
            });
        }
        Ok(cell)
    }

    /// Records the process group `pgid` of a command started with `cell`, where nothing
    /// else would find it after a crash (process groups only); the record goes with the cell.
    pub fn record(&self, cell: &mut Cell, pgid: u32) {
        let Some(records) = &self.records else {
            return;
        };
        let Some(ticks) = super::monitor::start_ticks(pgid) else {
            return;
        };
        let path = records.join(format!("{pgid}-{ticks}"));
        let made = std::fs::create_dir_all(records).and_then(|()| std::fs::write(&path, ""));
        match made {
            Ok(()) => cell.record = Some(path),
            Err(e) => tracing::warn!(error = %e, "a command's process group was not recorded"),
        }
    }
}

/// Kills each recorded process group whose leader is still the process recorded (same start
/// time: a reused pid is never signalled), and removes the records.
fn end_recorded_groups(records: &Path) {
    for entry in std::fs::read_dir(records).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let parsed = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pgid, ticks)| {
                Some((pgid.parse::<u32>().ok()?, ticks.parse::<i64>().ok()?))
            });
        if let Some((pgid, ticks)) = parsed
            && super::monitor::start_ticks(pgid) == Some(ticks)
            && let Ok(pgid) = i32::try_from(pgid)
        {
            tracing::info!(pgid, "a command a previous run left behind was killed");
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

/// One command's cgroups. Dropping it kills every process in them (`cgroup.kill`) and
/// removes them once empty (on a thread of its own: never on the runtime).
#[derive(Debug)]
pub struct Cell {
    dirs: Vec<PathBuf>,
    kill: Option<PathBuf>,
    joins: Vec<OwnedFd>,
    /// The command's record, where process groups are recorded.
    record: Option<PathBuf>,
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
        if let Some(record) = self.record.take() {
            let _ = std::fs::remove_file(record);
        }
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

/// How old an empty command cgroup must be to be taken for one left behind: a live daemon
/// moves its command in within milliseconds of making it, and removes it when it ends.
const STALE_AFTER: Duration = Duration::from_secs(120);

/// Removes, below `parent`, every `opta-*/cmd-*` cgroup that holds no process and is older
/// than `age`, then every `opta-*` left empty (a cgroup with processes or children cannot be
/// removed, so a live command is never touched).
fn sweep_stale(parent: &Path, age: Duration) {
    let homes = std::fs::read_dir(parent).into_iter().flatten().flatten();
    for home in homes.filter(|e| e.file_name().to_string_lossy().starts_with("opta-")) {
        sweep_home(&home.path(), age);
    }
}

/// [`sweep_stale`] for one home's directory.
fn sweep_home(home: &Path, age: Duration) {
    let commands = std::fs::read_dir(home).into_iter().flatten().flatten();
    for command in commands.filter(|e| e.file_name().to_string_lossy().starts_with("cmd-")) {
        let old = command
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|elapsed| elapsed > age);
        let empty = std::fs::read_to_string(command.path().join("cgroup.procs"))
            .is_ok_and(|procs| procs.trim().is_empty());
        if old && empty {
            let _ = std::fs::remove_dir(command.path());
        }
    }
    let _ = std::fs::remove_dir(home);
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

/// Whether a command can be started in a PID namespace here (user namespaces may be off,
/// or refused by a container's seccomp policy).
fn namespace_works(namespace: &Namespace) -> bool {
    use std::os::unix::process::CommandExt as _;
    let namespace = namespace.clone();
    let mut probe = std::process::Command::new("true");
    probe
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: `enter` only makes system calls between fork and exec.
    unsafe {
        probe.pre_exec(move || namespace.enter());
    }
    probe.status().is_ok_and(|status| status.success())
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
    fn stale_empty_command_cgroups_are_swept_and_live_ones_kept() {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let Some(parent) = hierarchy_dir(&mounts, &own, None) else {
            return eprintln!("no cgroup v2 here");
        };
        // A home of this test's own, below the real hierarchy.
        let home = parent.join(format!("opta-test-{:016x}", rand::random::<u64>()));
        if std::fs::create_dir(&home).is_err() {
            return eprintln!("cgroups cannot be made here");
        }
        let (stale, busy) = (home.join("cmd-stale"), home.join("cmd-busy"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::create_dir(&busy).unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(busy.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
        // Too young: kept. (Only this home is swept: others belong to live daemons.)
        sweep_home(&home, Duration::from_secs(3600));
        assert!(stale.exists() && busy.exists());
        std::thread::sleep(Duration::from_millis(20));
        sweep_home(&home, Duration::from_millis(1));
        assert!(!stale.exists(), "an old empty command cgroup is removed");
        assert!(
            busy.exists(),
            "a cgroup with a process is kept, and so its home"
        );
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        kill_and_remove(&busy);
        sweep_home(&home, Duration::from_millis(1));
        assert!(!home.exists(), "an empty home is removed");
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
