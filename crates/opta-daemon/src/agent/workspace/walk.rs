//! The search tools' walk: regular files under a directory of the workspace, in path order,
//! skipping hidden entries and what `.gitignore` / `.ignore` files (and `.git/info/exclude`)
//! leave out, as ripgrep does.
//!
//! Every directory is opened from its parent's handle without following a link, so a
//! directory swapped for a link mid-walk is skipped, not entered, and nothing outside the
//! workspace is listed or read. The daemon's home is never entered.

use std::ffi::OsString;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use cap_fs_ext::DirExt as _;
use cap_std::fs::Dir;
use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use super::{Identity, Workspace, WorkspaceError};

/// Deepest directory the walk enters.
const MAX_DEPTH: usize = 64;
/// Largest ignore file read.
const IGNORE_FILE_CAP: u64 = 1024 * 1024;

/// One regular file found: its directory's handle and its name there (open it through them,
/// never by path), and its path relative to the workspace.
pub struct WalkEntry<'a> {
    /// The directory that holds it.
    pub dir: &'a Dir,
    /// Its name in that directory.
    pub name: &'a std::ffi::OsStr,
    /// Its path relative to the workspace.
    pub relative: &'a Path,
    /// Its path relative to where the walk started.
    pub below: &'a Path,
}

/// A walk over the workspace.
pub struct Walk<'w> {
    workspace: &'w Workspace,
    home: Option<Identity>,
}

struct Frame {
    dir: Dir,
    relative: PathBuf,
}

impl<'w> Walk<'w> {
    /// A walk of `workspace`.
    pub fn new(workspace: &'w Workspace) -> Self {
        Self {
            workspace,
            home: workspace.home_below(),
        }
    }

    /// Calls `visit` with every regular file under `start` (relative to the workspace) that
    /// the ignore rules let through, in path order, until it answers `false`.
    pub fn files(
        &self,
        start: &Path,
        mut visit: impl FnMut(WalkEntry<'_>) -> bool,
    ) -> Result<(), WorkspaceError> {
        let dir = self.workspace.open_dir(start)?;
        // The ignore files of every directory from the workspace's root down to `start`.
        let mut rules = Vec::new();
        let mut at = PathBuf::new();
        let root_dir = self.workspace.open_dir(Path::new(""))?;
        if let Some(exclude) = read_small(&root_dir, Path::new(".git/info/exclude")) {
            rules.extend(build(self.workspace.root(), &[exclude]));
        }
        rules.extend(self.rules_of(&root_dir, &at));
        for part in start.components() {
            at.push(part);
            if let Ok(d) = self.workspace.open_dir(&at) {
                rules.extend(self.rules_of(&d, &at));
            }
        }
        let frame = Frame {
            dir,
            relative: start.to_owned(),
        };
        self.descend(frame, start, &mut rules, 0, &mut visit);
        Ok(())
    }

    /// Walks one directory; `false` when the visitor asked to stop.
    fn descend(
        &self,
        frame: Frame,
        start: &Path,
        rules: &mut Vec<Gitignore>,
        depth: usize,
        visit: &mut impl FnMut(WalkEntry<'_>) -> bool,
    ) -> bool {
        let Ok(entries) = frame.dir.entries() else {
            return true;
        };
        let mut names: Vec<(OsString, bool)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let kind = e.file_type().ok()?;
                // Links are never followed; other kinds (FIFOs, sockets) are never read.
                (kind.is_dir() || kind.is_file()).then(|| (e.file_name(), kind.is_dir()))
            })
            .filter(|(name, _)| !name.to_string_lossy().starts_with('.'))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, is_dir) in names {
            let relative = frame.relative.join(&name);
            let absolute = self.workspace.root().join(&relative);
            if ignored(rules, &absolute, is_dir) {
                continue;
            }
            if !is_dir {
                let entry = WalkEntry {
                    dir: &frame.dir,
                    name: &name,
                    relative: &relative,
                    below: relative.strip_prefix(start).unwrap_or(&relative),
                };
                if !visit(entry) {
                    return false;
                }
                continue;
            }
            if depth >= MAX_DEPTH {
                continue;
            }
            // A link swapped in since the listing fails to open (never followed); the
            // daemon's home is not entered.
            let Ok(child) = frame.dir.open_dir_nofollow(&name) else {
                continue;
            };
            let Ok(meta) = child.dir_metadata() else {
                continue;
            };
            if Some(Identity::of(&meta)) == self.home {
                continue;
            }
            let added = self.rules_of(&child, &relative);
            let pushed = added.len();
            rules.extend(added);
            let go_on = self.descend(
                Frame {
                    dir: child,
                    relative,
                },
                start,
                rules,
                depth + 1,
                visit,
            );
            rules.truncate(rules.len() - pushed);
            if !go_on {
                return false;
            }
        }
        true
    }

    /// The `.gitignore` and `.ignore` rules of the directory `dir` (at `relative`).
    fn rules_of(&self, dir: &Dir, relative: &Path) -> Vec<Gitignore> {
        let texts: Vec<String> = [".gitignore", ".ignore"]
            .iter()
            .filter_map(|name| read_small(dir, Path::new(name)))
            .collect();
        build(&self.workspace.root().join(relative), &texts)
    }
}

/// One matcher for the ignore files of a directory (none when they hold no rule).
fn build(root: &Path, texts: &[String]) -> Vec<Gitignore> {
    if texts.is_empty() {
        return Vec::new();
    }
    let mut builder = GitignoreBuilder::new(root);
    for text in texts {
        for line in text.lines() {
            let _ = builder.add_line(None, line);
        }
    }
    builder
        .build()
        .ok()
        .filter(|g| !g.is_empty())
        .into_iter()
        .collect()
}

/// Whether the deepest rule that has an opinion on `path` ignores it.
fn ignored(rules: &[Gitignore], path: &Path, is_dir: bool) -> bool {
    for rules in rules.iter().rev() {
        match rules.matched(path, is_dir) {
            Match::Ignore(_) => return true,
            Match::Whitelist(_) => return false,
            Match::None => {}
        }
    }
    false
}

/// A small regular file under `dir` as text (an ignore file), never following a link.
fn read_small(dir: &Dir, path: &Path) -> Option<String> {
    let file = dir.open_with(path, &super::nonblocking_read()).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(IGNORE_FILE_CAP).read_to_string(&mut text).ok()?;
    Some(text)
}

impl WalkEntry<'_> {
    /// Opens the file for reading through its directory's handle, without following a link;
    /// `None` when it is no longer a regular file.
    pub fn open(&self) -> Option<std::fs::File> {
        let file = self
            .dir
            .open_with(self.name, &super::nonblocking_read())
            .ok()?;
        file.metadata()
            .ok()
            .filter(cap_std::fs::Metadata::is_file)?;
        Some(file.into_std())
    }
}
