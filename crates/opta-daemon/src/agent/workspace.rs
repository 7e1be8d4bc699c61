//! A session's workspace: the directory its file tools may read and change, and nothing
//! outside it. Every path a model names goes through [`Workspace::resolve`], which refuses
//! `..` that climbs out, absolute paths elsewhere, and symlinks that lead out (for a file that
//! does not exist yet, through its nearest existing ancestor).
//!
//! The check resolves symlinks as the path is at that moment; a tool that opens the path right
//! after opens what was checked unless something else races to replace a directory with a
//! symlink in between (the file tools, still to come, should open without following a final
//! symlink to narrow that further).

use std::io;
use std::path::{Component, Path, PathBuf};

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
    /// The path could not be examined.
    #[error("{requested:?}: {error}")]
    Io {
        /// What was asked for.
        requested: String,
        /// What failed.
        error: io::Error,
    },
}

/// A directory tools are confined to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    /// Canonical: absolute, no symlinks.
    root: PathBuf,
}

impl Workspace {
    /// The workspace at `root`, which must be an existing directory given as an absolute path.
    pub fn new(root: &Path) -> Result<Self, WorkspaceError> {
        let unusable = |reason: &str| WorkspaceError::Unusable {
            path: root.to_owned(),
            reason: reason.to_owned(),
        };
        if !root.is_absolute() {
            return Err(unusable("must be an absolute path"));
        }
        let canonical = root
            .canonicalize()
            .map_err(|e| unusable(&format!("cannot be opened: {e}")))?;
        if !canonical.is_dir() {
            return Err(unusable("is not a directory"));
        }
        Ok(Self { root: canonical })
    }

    /// The directory, canonical.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The real location of `requested` (relative to the workspace, or absolute inside it),
    /// if it is inside the workspace. The path need not exist: then its nearest existing
    /// ancestor must be inside, and the part below that may not climb with `..`.
    pub fn resolve(&self, requested: &str) -> Result<PathBuf, WorkspaceError> {
        if requested.contains('\0') {
            return Err(WorkspaceError::Invalid(requested.to_owned()));
        }
        let requested_path = Path::new(requested.trim());
        let joined = if requested_path.is_absolute() {
            requested_path.to_owned()
        } else {
            self.root.join(requested_path)
        };
        // Resolve the longest existing part (symlinks and `..` included, as the OS would),
        // then append the rest, which does not exist and so holds no symlink.
        let mut existing = joined.as_path();
        let mut missing: Vec<&std::ffi::OsStr> = Vec::new();
        let real_existing = loop {
            match existing.canonicalize() {
                Ok(real) => break real,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // A symlink that points nowhere exists but does not resolve: where it
                    // leads cannot be checked, so it is refused.
                    if existing.symlink_metadata().is_ok() {
                        return Err(self.outside(requested));
                    }
                    let (Some(parent), Some(name)) = (existing.parent(), existing.file_name())
                    else {
                        return Err(self.outside(requested));
                    };
                    missing.push(name);
                    existing = parent;
                }
                Err(error) => {
                    return Err(WorkspaceError::Io {
                        requested: requested.to_owned(),
                        error,
                    });
                }
            }
        };
        if !real_existing.starts_with(&self.root) {
            return Err(self.outside(requested));
        }
        let mut resolved = real_existing;
        for name in missing.into_iter().rev() {
            match Path::new(name).components().next() {
                Some(Component::Normal(part)) => resolved.push(part),
                Some(Component::CurDir) => {}
                // `..` below a directory that does not exist: refused rather than guessed.
                _ => return Err(self.outside(requested)),
            }
        }
        Ok(resolved)
    }

    /// `path` relative to the workspace, for people and models (`.` for the root).
    pub fn display(&self, path: &Path) -> String {
        match path.strip_prefix(&self.root) {
            Ok(relative) if relative.as_os_str().is_empty() => ".".to_owned(),
            Ok(relative) => relative.display().to_string(),
            Err(_) => path.display().to_string(),
        }
    }

    fn outside(&self, requested: &str) -> WorkspaceError {
        WorkspaceError::Outside {
            requested: requested.to_owned(),
            root: self.root.display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        ws: Workspace,
        outside: PathBuf,
    }

    /// `base/ws` (the workspace, with `src/main.rs`) and `base/outside/secret`.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("ws/src")).unwrap();
        std::fs::write(base.join("ws/src/main.rs"), "fn main() {}").unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), "no").unwrap();
        let ws = Workspace::new(&base.join("ws")).unwrap();
        Fixture {
            _dir: dir,
            ws,
            outside: base.join("outside"),
        }
    }

    fn refused(ws: &Workspace, path: &str) {
        match ws.resolve(path) {
            Err(WorkspaceError::Outside { .. }) => {}
            other => panic!("{path:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn paths_inside_resolve_existing_or_not() {
        let f = fixture();
        let root = f.ws.root().to_owned();
        assert_eq!(
            f.ws.resolve("src/main.rs").unwrap(),
            root.join("src/main.rs")
        );
        assert_eq!(
            f.ws.resolve("./src/../src/main.rs").unwrap(),
            root.join("src/main.rs")
        );
        assert_eq!(
            f.ws.resolve("new/dir/file.txt").unwrap(),
            root.join("new/dir/file.txt")
        );
        assert_eq!(f.ws.resolve(".").unwrap(), root);
        assert_eq!(f.ws.resolve("").unwrap(), root);
        let absolute = root.join("src/main.rs");
        assert_eq!(f.ws.resolve(absolute.to_str().unwrap()).unwrap(), absolute);
        assert_eq!(f.ws.display(&root.join("src/main.rs")), "src/main.rs");
        assert_eq!(f.ws.display(&root), ".");
    }

    #[test]
    fn climbing_out_and_absolute_paths_elsewhere_are_refused() {
        let f = fixture();
        refused(&f.ws, "../outside/secret");
        refused(&f.ws, "src/../../outside/secret");
        refused(&f.ws, "..");
        refused(&f.ws, f.outside.join("secret").to_str().unwrap());
        refused(&f.ws, "/etc/passwd");
        refused(&f.ws, "/");
        // Below a directory that does not exist, `..` is not guessed at.
        refused(&f.ws, "new/../../outside/x");
        refused(&f.ws, "new/../x");
        assert!(matches!(
            f.ws.resolve("a\0b"),
            Err(WorkspaceError::Invalid(_))
        ));
    }

    #[test]
    fn symlinks_that_lead_out_are_refused_and_inside_ones_followed() {
        let f = fixture();
        let root = f.ws.root().to_owned();
        symlink(&f.outside, root.join("door")).unwrap();
        symlink(f.outside.join("secret"), root.join("peek")).unwrap();
        symlink(root.join("src"), root.join("code")).unwrap();
        symlink(f.outside.join("not-yet"), root.join("dangling")).unwrap();
        refused(&f.ws, "door/secret");
        refused(&f.ws, "door/new-file");
        refused(&f.ws, "door");
        refused(&f.ws, "peek");
        refused(&f.ws, "dangling");
        refused(&f.ws, "dangling/below");
        assert_eq!(
            f.ws.resolve("code/main.rs").unwrap(),
            root.join("src/main.rs")
        );
        assert_eq!(
            f.ws.resolve("code/new.rs").unwrap(),
            root.join("src/new.rs")
        );
    }

    #[test]
    fn the_workspace_must_be_an_existing_absolute_directory() {
        let f = fixture();
        assert!(Workspace::new(Path::new("relative/dir")).is_err());
        assert!(Workspace::new(&f.ws.root().join("src/main.rs")).is_err());
        assert!(Workspace::new(&f.ws.root().join("missing")).is_err());
        // A workspace reached through a symlink is the directory it names.
        let link = f.outside.join("ws-link");
        symlink(f.ws.root(), &link).unwrap();
        assert_eq!(Workspace::new(&link).unwrap().root(), f.ws.root());
    }
}
