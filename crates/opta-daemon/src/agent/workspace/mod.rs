//! A session's workspace: the directory its file tools may read and change, and nothing
//! outside it.
//!
//! The directory is opened once, when the workspace is set, and every file operation goes
//! through that handle: paths are resolved beneath it by the kernel (`openat2` with
//! `RESOLVE_BENEATH`, through `cap-std`), component by component, at the moment of the
//! operation, so a directory swapped for a symlink while a permission prompt waits, or by a
//! command racing the tool, cannot send a read or a write outside. Symlinks that stay inside
//! are followed; those that leave (absolute ones included) are refused.
//!
//! The workspace's identity (device + inode) is fixed when it is opened. A path that no
//! longer names that directory (renamed and replaced by a link) is refused with
//! [`WorkspaceError::Moved`]; commands, which run by path, check it before they start.
//!
//! The daemon's home (its token, state file, configuration and database) is never reached
//! through a workspace, even one that contains it ([`Protected`]).

mod walk;

use std::ffi::OsString;
use std::io::{self, Read as _, Write as _};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt as _};
use cap_std::fs::{Dir, MetadataExt as _, OpenOptions, OpenOptionsExt as _, PermissionsExt as _};

pub use walk::{Walk, WalkEntry};

/// Why a path is refused. The message is what the model sees.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The workspace itself is unusable.
    #[error("workspace {path}: {reason}")]
    Unusable {
        /// The directory given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The workspace is `/` or holds the daemon's home.
    #[error(
        "workspace {path}: {reason}; choose a project directory (or start the daemon with \
         --allow-any-workspace)"
    )]
    Refused {
        /// The directory given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The directory at the workspace's path is no longer the one the session was given.
    #[error(
        "workspace {0} was moved or replaced since the session opened it; nothing was done \
         (point the session at the directory again to use it)"
    )]
    Moved(PathBuf),
    /// The path is empty or holds a NUL byte.
    #[error("{0:?} is not a usable path")]
    Invalid(String),
    /// The path leads outside the workspace.
    #[error("{requested:?} is outside the workspace ({root}); only paths inside it can be used")]
    Outside {
        /// What was asked for.
        requested: String,
        /// The workspace.
        root: String,
    },
    /// The path is (or leads into) the daemon's own files.
    #[error("{0:?} belongs to the opta daemon (its token and settings); no tool may use it")]
    Protected(String),
    /// The path is a directory where a file was wanted.
    #[error("{0} is a directory")]
    Directory(String),
    /// The path is a FIFO, a device or a socket.
    #[error("{0} is not a regular file")]
    NotRegular(String),
    /// The path could not be examined.
    #[error("{requested}: {error}")]
    Io {
        /// What was asked for.
        requested: String,
        /// What failed.
        error: io::Error,
    },
}

/// Device and inode: which directory (or file) a path named when it was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

impl Identity {
    fn of(meta: &cap_std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    fn of_std(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.dev, self.ino)
    }
}

impl std::str::FromStr for Identity {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (dev, ino) = s.split_once(':').ok_or(())?;
        Ok(Self {
            dev: dev.parse().map_err(|_| ())?,
            ino: ino.parse().map_err(|_| ())?,
        })
    }
}

/// What a file was when a tool looked at it: a write is refused when it is no longer so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    identity: Identity,
    size: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(meta: &cap_std::fs::Metadata) -> Self {
        Self {
            identity: Identity::of(meta),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// The daemon's own directory (its home): no workspace may reach into it, and a workspace
/// that contains it is refused unless the daemon allows any workspace.
#[derive(Debug, Clone, Default)]
pub struct Protected {
    home: Option<PathBuf>,
    allow_any: bool,
}

impl Protected {
    /// Protects `home` (canonicalised when it exists); `allow_any` lets a workspace contain it
    /// (`--allow-any-workspace`), the tools still never reach it.
    pub fn new(home: &Path, allow_any: bool) -> Self {
        Self {
            home: Some(home.canonicalize().unwrap_or_else(|_| home.to_owned())),
            allow_any,
        }
    }

    /// The home's identity now, if it exists.
    fn home_identity(&self) -> Option<Identity> {
        let home = self.home.as_ref()?;
        std::fs::metadata(home).ok().map(|m| Identity::of_std(&m))
    }

    /// Identities of the files the home holds (two levels): a hard link to one of them
    /// inside a workspace is refused too.
    fn home_files(&self) -> Vec<Identity> {
        let Some(home) = &self.home else {
            return Vec::new();
        };
        let mut found = Vec::new();
        let mut dirs = vec![(home.clone(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() && depth < 2 {
                    dirs.push((entry.path(), depth + 1));
                } else if meta.is_file() {
                    found.push(Identity::of_std(&meta));
                }
            }
        }
        found
    }

    /// Whether the home lies below `root` (canonical): only then can a path reach it.
    fn inside(&self, root: &Path) -> bool {
        self.home
            .as_ref()
            .is_some_and(|home| home.starts_with(root))
    }

    /// Whether `root` (canonical) is `/` or holds the home: such a workspace is refused.
    fn refuses(&self, root: &Path) -> Option<String> {
        if self.allow_any {
            return None;
        }
        if root.parent().is_none() {
            return Some("the root directory cannot be a workspace".to_owned());
        }
        let home = self.home.as_ref()?;
        self.inside(root)
            .then(|| format!("it contains the opta daemon's home ({})", home.display()))
    }
}

/// A directory tools are confined to. Cloning shares the open handle.
#[derive(Debug, Clone)]
pub struct Workspace {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Canonical when opened: absolute, no symlinks.
    root: PathBuf,
    dir: Dir,
    identity: Identity,
    protected: Protected,
    /// The daemon's home lies below the root (`--allow-any-workspace`): every directory
    /// opened is checked against it.
    holds_home: bool,
}

impl PartialEq for Workspace {
    fn eq(&self, other: &Self) -> bool {
        self.inner.root == other.inner.root && self.inner.identity == other.inner.identity
    }
}

impl Eq for Workspace {}

/// `cap-std`'s word for a path that resolved outside its directory.
fn is_escape(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
        && e.get_ref()
            .is_some_and(|inner| inner.to_string().contains("led outside"))
}

fn nonblocking_read() -> OpenOptions {
    let mut options = OpenOptions::new();
    // A FIFO would block the open until a writer came; O_NONBLOCK returns at once and the
    // type is checked before anything is read.
    options
        .read(true)
        .follow(FollowSymlinks::No)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    options
}

impl Workspace {
    /// The workspace at `root`, an existing directory given as an absolute path, with no
    /// protected directory (tests and tools that need none).
    pub fn new(root: &Path) -> Result<Self, WorkspaceError> {
        Self::open(root, &Protected::default())
    }

    /// Opens the workspace at `root` under `protected`: refused when it is `/` or holds the
    /// daemon's home (unless allowed).
    pub fn open(root: &Path, protected: &Protected) -> Result<Self, WorkspaceError> {
        let unusable = |reason: String| WorkspaceError::Unusable {
            path: root.to_owned(),
            reason,
        };
        if !root.is_absolute() {
            return Err(unusable("must be an absolute path".into()));
        }
        let canonical = root
            .canonicalize()
            .map_err(|e| unusable(format!("cannot be opened: {e}")))?;
        if let Some(reason) = protected.refuses(&canonical) {
            return Err(WorkspaceError::Refused {
                path: canonical,
                reason,
            });
        }
        let dir = Dir::open_ambient_dir(&canonical, cap_std::ambient_authority())
            .map_err(|e| unusable(format!("cannot be opened: {e}")))?;
        let meta = dir
            .dir_metadata()
            .map_err(|e| unusable(format!("cannot be examined: {e}")))?;
        if !meta.is_dir() {
            return Err(unusable("is not a directory".into()));
        }
        let workspace = Self {
            inner: Arc::new(Inner {
                dir,
                identity: Identity::of(&meta),
                holds_home: protected.inside(&canonical),
                protected: protected.clone(),
                root: canonical,
            }),
        };
        // Swapped between the canonicalisation and the open: not the directory named.
        workspace.ensure_in_place()?;
        Ok(workspace)
    }

    /// Opens the workspace at `root` and requires it to be the directory `pinned` names.
    pub fn reopen(
        root: &Path,
        protected: &Protected,
        pinned: Identity,
    ) -> Result<Self, WorkspaceError> {
        let workspace = Self::open(root, protected)?;
        if workspace.identity() != pinned {
            return Err(WorkspaceError::Moved(root.to_owned()));
        }
        Ok(workspace)
    }

    /// The directory, canonical as it was opened.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Device and inode of the directory.
    pub fn identity(&self) -> Identity {
        self.inner.identity
    }

    /// The open handle (commands start in it; the sandbox's write rule names it).
    pub fn dir(&self) -> &Dir {
        &self.inner.dir
    }

    /// A path that names the open directory itself (`/proc/self/fd/N`), for a child's working
    /// directory: the child changes into it before it runs anything, while the handle is
    /// still open, so it starts in the directory the session opened even if the workspace's
    /// path was swapped meanwhile.
    pub fn handle_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd as _;
        PathBuf::from(format!("/proc/self/fd/{}", self.inner.dir.as_raw_fd()))
    }

    /// Whether the workspace's path still names the directory that was opened.
    pub fn ensure_in_place(&self) -> Result<(), WorkspaceError> {
        let now = std::fs::metadata(&self.inner.root)
            .map_err(|_| WorkspaceError::Moved(self.inner.root.clone()))?;
        if Identity::of_std(&now) != self.inner.identity {
            return Err(WorkspaceError::Moved(self.inner.root.clone()));
        }
        Ok(())
    }

    /// `requested` (relative to the workspace, or absolute inside it) as a path relative to
    /// the workspace, `.` and `..` folded; refused when it climbs out. Symlinks are not
    /// looked at here: the operation resolves them beneath the handle.
    pub fn relative(&self, requested: &str) -> Result<PathBuf, WorkspaceError> {
        if requested.contains('\0') {
            return Err(WorkspaceError::Invalid(requested.to_owned()));
        }
        let requested_path = Path::new(requested.trim());
        let below = if requested_path.is_absolute() {
            requested_path
                .strip_prefix(&self.inner.root)
                .map_err(|_| self.outside(requested))?
        } else {
            requested_path
        };
        let mut out = PathBuf::new();
        for component in below.components() {
            match component {
                Component::Normal(part) => out.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    if !out.pop() {
                        return Err(self.outside(requested));
                    }
                }
                Component::RootDir | Component::Prefix(_) => return Err(self.outside(requested)),
            }
        }
        Ok(out)
    }

    /// `relative` for people and models (`.` for the root).
    pub fn display(&self, relative: &Path) -> String {
        if relative.as_os_str().is_empty() {
            ".".to_owned()
        } else {
            relative.display().to_string()
        }
    }

    /// Maps an error of an operation on `relative` to what the model sees.
    fn fail(&self, relative: &Path, error: io::Error) -> WorkspaceError {
        let shown = self.display(relative);
        if is_escape(&error) || error.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
        {
            return self.outside(&shown);
        }
        WorkspaceError::Io {
            requested: shown,
            error,
        }
    }

    fn outside(&self, requested: &str) -> WorkspaceError {
        WorkspaceError::Outside {
            requested: requested.to_owned(),
            root: self.inner.root.display().to_string(),
        }
    }

    /// The directory `relative` names, opened beneath the workspace (the root for an empty
    /// path), refused when it is or lies in the daemon's home.
    pub fn open_dir(&self, relative: &Path) -> Result<Dir, WorkspaceError> {
        let dir = if relative.as_os_str().is_empty() {
            self.inner.dir.try_clone()
        } else {
            self.inner.dir.open_dir(relative)
        }
        .map_err(|e| self.fail(relative, e))?;
        self.check_ancestry(&dir, relative)?;
        Ok(dir)
    }

    /// Refuses `dir` when it is the daemon's home or lies below it: walks up from the open
    /// handle (never by path) to the workspace's root.
    fn check_ancestry(&self, dir: &Dir, relative: &Path) -> Result<(), WorkspaceError> {
        // Only a workspace that holds the home can reach it.
        let Some(home) = self.home_below() else {
            return Ok(());
        };
        let protected = || WorkspaceError::Protected(self.display(relative));
        let mut current = dir.try_clone().map_err(|e| self.fail(relative, e))?;
        for _ in 0..4096 {
            let meta = current.dir_metadata().map_err(|e| self.fail(relative, e))?;
            let identity = Identity::of(&meta);
            if identity == home {
                return Err(protected());
            }
            if identity == self.inner.identity {
                return Ok(());
            }
            current = current
                .open_parent_dir(cap_std::ambient_authority())
                .map_err(|e| self.fail(relative, e))?;
        }
        Err(protected())
    }

    /// The identity of the daemon's home when it lies below the workspace's root.
    fn home_below(&self) -> Option<Identity> {
        if !self.inner.holds_home {
            return None;
        }
        self.inner.protected.home_identity()
    }

    /// Refuses a file that is one of the daemon's own (a hard link to it).
    fn check_file(
        &self,
        meta: &cap_std::fs::Metadata,
        relative: &Path,
    ) -> Result<(), WorkspaceError> {
        if meta.nlink() > 1
            && self
                .inner
                .protected
                .home_files()
                .contains(&Identity::of(meta))
        {
            return Err(WorkspaceError::Protected(self.display(relative)));
        }
        Ok(())
    }

    /// The real parent directory of `relative` (links inside resolved, opened, checked)
    /// and the real last component, to be used without following a link: a link swapped in
    /// after the resolution makes the operation fail rather than go where it points.
    fn parent_of(&self, relative: &Path) -> Result<(Dir, OsString), WorkspaceError> {
        let real = self.key(relative)?;
        let name = real
            .file_name()
            .ok_or_else(|| WorkspaceError::Invalid(self.display(relative)))?
            .to_owned();
        let parent = real.parent().unwrap_or(Path::new(""));
        Ok((self.open_dir(parent)?, name))
    }

    /// Opens the regular file `relative` for reading (never a FIFO, a device, a socket or a
    /// directory; never the daemon's files). Blocking: call from a blocking thread.
    pub fn open_file(&self, relative: &Path) -> Result<(std::fs::File, Stamp), WorkspaceError> {
        let (parent, name) = self.parent_of(relative)?;
        let file = parent
            .open_with(&name, &nonblocking_read())
            .map_err(|e| self.fail(relative, e))?;
        let meta = file.metadata().map_err(|e| self.fail(relative, e))?;
        if meta.is_dir() {
            return Err(WorkspaceError::Directory(self.display(relative)));
        }
        if !meta.is_file() {
            return Err(WorkspaceError::NotRegular(self.display(relative)));
        }
        self.check_file(&meta, relative)?;
        Ok((file.into_std(), Stamp::of(&meta)))
    }

    /// Reads at most `cap` bytes of the regular file `relative` as UTF-8 (lossy past a cut
    /// character), with its stamp and whether it was cut. Blocking.
    pub fn read_text(
        &self,
        relative: &Path,
        cap: u64,
    ) -> Result<(String, Stamp, bool), WorkspaceError> {
        let (file, stamp) = self.open_file(relative)?;
        let (text, cut) = self.read_open(file, relative, cap)?;
        Ok((text, stamp, cut))
    }

    /// Reads at most `cap` bytes of a file [`Self::open_file`] opened, as UTF-8 text, and
    /// whether it was cut. Blocking.
    pub fn read_open(
        &self,
        file: std::fs::File,
        relative: &Path,
        cap: u64,
    ) -> Result<(String, bool), WorkspaceError> {
        let mut bytes = Vec::new();
        file.take(cap.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| self.fail(relative, e))?;
        let cut = bytes.len() as u64 > cap;
        if cut {
            bytes.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
        }
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            // A cut may split a character: the tail is dropped, not the file refused.
            Err(e) if cut && e.utf8_error().error_len().is_none() => {
                let valid = e.utf8_error().valid_up_to();
                let mut bytes = e.into_bytes();
                bytes.truncate(valid);
                String::from_utf8(bytes).unwrap_or_default()
            }
            Err(_) => {
                return Err(WorkspaceError::Io {
                    requested: self.display(relative),
                    error: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"),
                });
            }
        };
        Ok((text, cut))
    }

    /// A digest of what `paths` (relative to the workspace) are now: each file's stamp, each
    /// directory's entries and their stamps (one level), absence too. It changes when any of
    /// them is written, added, removed or replaced. Blocking.
    pub fn fingerprint(&self, paths: &[&str]) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for path in paths {
            path.hash(&mut hasher);
            let relative = Path::new(path);
            match self.inner.dir.symlink_metadata(relative) {
                Err(_) => 0u8.hash(&mut hasher),
                Ok(meta) => {
                    Stamp::of(&meta).hash(&mut hasher);
                    if meta.is_dir()
                        && let Ok(dir) = self.open_dir(relative)
                        && let Ok(entries) = dir.entries()
                    {
                        let mut seen: Vec<(OsString, Option<Stamp>)> = entries
                            .flatten()
                            .map(|e| (e.file_name(), e.metadata().ok().map(|m| Stamp::of(&m))))
                            .collect();
                        seen.sort_by(|a, b| a.0.cmp(&b.0));
                        seen.hash(&mut hasher);
                    }
                }
            }
        }
        hasher.finish()
    }

    /// The directory `requested` names inside the workspace, as an absolute path for a
    /// command's working directory: it must exist (links inside resolved) and the workspace
    /// must still be in place.
    pub fn command_dir(&self, requested: &str) -> Result<PathBuf, WorkspaceError> {
        let relative = self.relative(requested)?;
        let key = self.key(&relative)?;
        self.open_dir(&key)?;
        self.ensure_in_place()?;
        Ok(self.inner.root.join(key))
    }

    /// The real path of `relative` inside the workspace, relative to it (links inside
    /// resolved), when it exists; else `relative` itself. Files are remembered by it.
    /// A path that leads out through a link is refused here.
    pub fn key(&self, relative: &Path) -> Result<PathBuf, WorkspaceError> {
        if relative.as_os_str().is_empty() {
            return Ok(PathBuf::new());
        }
        match self.inner.dir.canonicalize(relative) {
            Ok(real) => Ok(real),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(relative.to_owned()),
            Err(e) => Err(self.fail(relative, e)),
        }
    }

    /// Writes `content` to `relative` atomically: parents created beneath the handle, a
    /// temporary file with a random name created exclusively (`O_EXCL`: never a link planted
    /// there) in the target's directory, renamed over the target (a link at the target is
    /// replaced, not followed). With `expected`, the target must still be as it was then
    /// (`None`: absent), or nothing is written. Answers the written file's stamp (taken from
    /// the file itself, so a change after the rename is not mistaken for ours). Blocking.
    pub fn write_atomic(
        &self,
        relative: &Path,
        content: &[u8],
        expected: Option<Option<Stamp>>,
    ) -> Result<Stamp, WorkspaceError> {
        // A link inside the workspace is written through (to its real file), as before.
        let real = self.key(relative)?;
        let name = real
            .file_name()
            .ok_or_else(|| WorkspaceError::Invalid(self.display(relative)))?;
        let parent_path = real.parent().unwrap_or(Path::new(""));
        if !parent_path.as_os_str().is_empty() {
            self.inner
                .dir
                .create_dir_all(parent_path)
                .map_err(|e| self.fail(relative, e))?;
        }
        let parent = self.open_dir(parent_path)?;
        let current = match parent.symlink_metadata(name) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.fail(relative, e)),
        };
        if let Some(meta) = &current {
            if meta.is_dir() {
                return Err(WorkspaceError::Io {
                    requested: self.display(relative),
                    error: io::Error::new(io::ErrorKind::IsADirectory, "is a directory"),
                });
            }
            self.check_file(meta, relative)?;
        }
        if let Some(expected) = expected {
            let now = current
                .as_ref()
                .filter(|m| !m.file_type().is_symlink())
                .map(Stamp::of);
            if now != expected {
                return Err(WorkspaceError::Io {
                    requested: self.display(relative),
                    error: io::Error::other(
                        "changed on disk since it was read (while the change waited); nothing \
                         was written: read it again",
                    ),
                });
            }
        }
        let mode = current
            .as_ref()
            .filter(|m| m.is_file())
            .map_or(0o644, |m| m.permissions().mode() & 0o7777);
        let mut options = OpenOptions::new();
        options.write(true).create_new(true).mode(mode);
        let (temp, mut file) = (|| {
            for _ in 0..16 {
                let temp = format!(".opta-write-{:016x}.tmp", rand::random::<u64>());
                match parent.open_with(&temp, &options) {
                    Ok(file) => return Ok((temp, file)),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            Err(io::Error::other("no free temporary name"))
        })()
        .map_err(|e| self.fail(relative, e))?;
        let written = file
            .write_all(content)
            .and_then(|()| file.set_permissions(cap_std::fs::Permissions::from_mode(mode)))
            .and_then(|()| file.metadata())
            .and_then(|meta| {
                parent.rename(&temp, &parent, name)?;
                Ok(Stamp::of(&meta))
            });
        written.map_err(|e| {
            let _ = parent.remove_file(&temp);
            self.fail(relative, e)
        })
    }
}

#[cfg(test)]
mod tests;
