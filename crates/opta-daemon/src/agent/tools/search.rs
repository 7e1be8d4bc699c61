//! Search tools: files by glob, contents by regex. Both walk the workspace through its
//! handle (`agent/workspace/walk.rs`: `.gitignore`, `.ignore` and hidden files respected,
//! symlinks never followed, every file opened beneath its directory's handle), so nothing
//! outside the workspace is reached.

use std::fmt::Write as _;

use grep_regex::RegexMatcherBuilder;
use grep_searcher::{BinaryDetection, SearcherBuilder, sinks::UTF8};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::Workspace;
use crate::agent::workspace::{Walk, WalkEntry, WorkspaceError};

/// Paths `find_files` lists at most.
const MAX_FILES: usize = 200;
/// Matching lines `search_files` returns at most.
const MAX_MATCHES: usize = 100;
/// A matching line longer than this is cut.
const MAX_LINE: usize = 300;

/// `find_files` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct FindFilesArgs {
    /// Glob over paths relative to the search directory, e.g. `**/*.rs` or `src/*.toml`.
    pub pattern: String,
    /// Directory to search, relative to the workspace (default: all of it).
    #[serde(default)]
    pub path: Option<String>,
}

/// `search_files` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchFilesArgs {
    /// Regular expression (Rust syntax) to look for.
    pub pattern: String,
    /// File or directory to search, relative to the workspace (default: all of it).
    #[serde(default)]
    pub path: Option<String>,
    /// Only files whose path matches this glob, e.g. `*.rs`.
    #[serde(default)]
    pub glob: Option<String>,
    /// Match regardless of case.
    #[serde(
        default,
        alias = "case_insensitive",
        deserialize_with = "opta_protocol::serde_util::null_as_default"
    )]
    pub case_insensitive: bool,
}

fn glob(pattern: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(false)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("invalid glob {pattern:?}: {e}"))
}

/// Whether `glob` matches the entry's path below the search's start or, with `by_name`, its
/// name alone (`*.rs` finds files at any depth).
fn hits(glob: &globset::GlobMatcher, entry: &WalkEntry<'_>, by_name: bool) -> bool {
    glob.is_match(entry.below) || (by_name && glob.is_match(entry.name))
}

/// The walk's start: the path given (default the whole workspace), relative to it.
fn start_of(ws: &Workspace, path: Option<&str>) -> Result<std::path::PathBuf, String> {
    ws.relative(path.unwrap_or(".")).map_err(|e| e.to_string())
}

/// `find_files`: workspace-relative paths matching the glob, sorted.
pub async fn find_files(workspace: &Workspace, args: FindFilesArgs) -> Result<String, String> {
    let matcher = glob(&args.pattern)?;
    let ws = workspace.clone();
    tokio::task::spawn_blocking(move || {
        let start = start_of(&ws, args.path.as_deref())?;
        let name_only = !args.pattern.contains('/');
        let mut found = Vec::new();
        let mut more = false;
        Walk::new(&ws)
            .files(&start, |entry| {
                if hits(&matcher, &entry, name_only) {
                    if found.len() == MAX_FILES {
                        more = true;
                        return false;
                    }
                    found.push(ws.display(entry.relative));
                }
                true
            })
            .map_err(|e| e.to_string())?;
        if found.is_empty() {
            return Ok(format!("no file matches {:?}", args.pattern));
        }
        let mut out = found.join("\n");
        if more {
            let _ = write!(
                out,
                "\n[… more than {MAX_FILES} files; narrow the pattern …]"
            );
        }
        Ok(out)
    })
    .await
    .map_err(|e| format!("find_files failed: {e}"))?
}

/// Appends the matching lines of `file` (shown as `shown`) to `out`; false once the cap is
/// reached.
fn search_one(
    searcher: &mut grep_searcher::Searcher,
    matcher: &grep_regex::RegexMatcher,
    file: &std::fs::File,
    shown: &str,
    out: &mut String,
    count: &mut usize,
) -> bool {
    let mut lines = Vec::new();
    let already = *count;
    let _ = searcher.search_file(
        matcher,
        file,
        UTF8(|number, line| {
            lines.push((number, line.trim_end().to_owned()));
            Ok(lines.len() + already < MAX_MATCHES + 1)
        }),
    );
    for (number, mut line) in lines {
        if *count == MAX_MATCHES {
            let _ = writeln!(
                out,
                "[… more than {MAX_MATCHES} matches; narrow the search …]"
            );
            return false;
        }
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        let _ = writeln!(out, "{shown}:{number}: {line}");
        *count += 1;
    }
    true
}

/// `search_files`: `path:line: text` for each matching line, in path order.
pub async fn search_files(workspace: &Workspace, args: SearchFilesArgs) -> Result<String, String> {
    let matcher = RegexMatcherBuilder::new()
        .case_insensitive(args.case_insensitive)
        .build(&args.pattern)
        .map_err(|e| format!("invalid regular expression {:?}: {e}", args.pattern))?;
    let filter = args.glob.as_deref().map(glob).transpose()?;
    let ws = workspace.clone();
    tokio::task::spawn_blocking(move || {
        let start = start_of(&ws, args.path.as_deref())?;
        let mut searcher = SearcherBuilder::new()
            .binary_detection(BinaryDetection::quit(0))
            .line_number(true)
            .build();
        let mut out = String::new();
        let mut count = 0usize;
        // A file is searched alone; a directory (the root too) is walked.
        let single = match ws.open_file(&start) {
            Ok((file, _)) => Some(file),
            Err(WorkspaceError::Directory(_)) => None,
            Err(_) if start.as_os_str().is_empty() => None,
            Err(e) => return Err(e.to_string()),
        };
        if let Some(file) = single {
            let shown = ws.display(&start);
            search_one(&mut searcher, &matcher, &file, &shown, &mut out, &mut count);
        } else {
            Walk::new(&ws)
                .files(&start, |entry| {
                    if filter.as_ref().is_some_and(|f| !hits(f, &entry, true)) {
                        return true;
                    }
                    let Some(file) = entry.open() else {
                        return true;
                    };
                    let shown = ws.display(entry.relative);
                    search_one(&mut searcher, &matcher, &file, &shown, &mut out, &mut count)
                })
                .map_err(|e| e.to_string())?;
        }
        if count == 0 {
            return Ok(format!("no match for {:?}", args.pattern));
        }
        Ok(out)
    })
    .await
    .map_err(|e| format!("search_files failed: {e}"))?
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[tokio::test]
    async fn search_respects_gitignore_and_never_follows_symlinks_out() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("ws/src")).unwrap();
        std::fs::create_dir_all(base.join("ws/target")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret.rs"), "needle outside\n").unwrap();
        std::fs::write(base.join("ws/.gitignore"), "target/\n").unwrap();
        std::fs::write(base.join("ws/src/a.rs"), "fn a() {}\n// needle here\n").unwrap();
        std::fs::write(base.join("ws/target/b.rs"), "needle ignored\n").unwrap();
        symlink(base.join("outside"), base.join("ws/link")).unwrap();
        symlink(base.join("outside/secret.rs"), base.join("ws/src/s.rs")).unwrap();
        let ws = Workspace::new(&base.join("ws")).unwrap();

        let found = search_files(
            &ws,
            SearchFilesArgs {
                pattern: "needle".into(),
                path: None,
                glob: None,
                case_insensitive: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(found, "src/a.rs:2: // needle here\n");

        let files = find_files(
            &ws,
            FindFilesArgs {
                pattern: "*.rs".into(),
                path: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(files, "src/a.rs");

        for path in ["../outside", "link", "/etc"] {
            let e = search_files(
                &ws,
                SearchFilesArgs {
                    pattern: "needle".into(),
                    path: Some(path.into()),
                    glob: None,
                    case_insensitive: false,
                },
            )
            .await
            .unwrap_err();
            assert!(e.contains("outside the workspace"), "{path}: {e}");
            let e = find_files(
                &ws,
                FindFilesArgs {
                    pattern: "*".into(),
                    path: Some(path.into()),
                },
            )
            .await
            .unwrap_err();
            assert!(e.contains("outside the workspace"), "{path}: {e}");
        }
    }
}
