//! File tools: read, write, edit (one or several replacements), list a directory.
//!
//! Writes and edits are prepared first (the new content and a unified diff, for the
//! permission prompt) and written only once approved, and only if the file is still as it
//! was then. Every path goes through the workspace's handle (`agent/workspace`), at the
//! moment of the operation.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Change, FileMemory, Prepared};
use crate::agent::Workspace;
use crate::agent::workspace::{Stamp, WorkspaceError};

/// Most text one `read_file` returns (less when the tool result cap is lower); beyond it, a
/// note says how to read on.
const READ_CAP_BYTES: usize = 64 * 1024;
/// Room kept below the tool result cap for the line numbers and notes.
const NOTE_ROOM: usize = 1024;
/// Lines `read_file` returns when no limit is given.
const DEFAULT_LINES: usize = 2000;

/// `read_file` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct ReadFileArgs {
    /// File path, relative to the workspace.
    pub path: String,
    /// First line to return, counting from 1.
    #[serde(default)]
    pub offset: Option<usize>,
    /// How many lines to return.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Read raw text from this byte instead (to go on inside a line too long to show whole;
    /// the cut line's note gives the offset).
    #[serde(default, rename = "byteOffset", alias = "byte_offset")]
    pub byte_offset: Option<u64>,
}

/// `write_file` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct WriteFileArgs {
    /// File path, relative to the workspace.
    pub path: String,
    /// The whole new content.
    pub content: String,
}

/// One replacement.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Edit {
    /// Exact text to replace (whitespace included).
    #[serde(alias = "old_string")]
    pub old_string: String,
    /// Text to put in its place.
    #[serde(alias = "new_string")]
    pub new_string: String,
    /// Replace every occurrence instead of requiring exactly one.
    #[serde(
        default,
        alias = "replace_all",
        deserialize_with = "opta_protocol::serde_util::null_as_default"
    )]
    pub replace_all: bool,
}

/// `edit_file` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EditFileArgs {
    /// File path, relative to the workspace.
    pub path: String,
    /// The replacement.
    #[serde(flatten)]
    pub edit: Edit,
}

/// `multi_edit` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct MultiEditArgs {
    /// File path, relative to the workspace.
    pub path: String,
    /// Replacements, applied in order to the result of the previous one.
    pub edits: Vec<Edit>,
}

/// `list_dir` arguments.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct ListDirArgs {
    /// Directory, relative to the workspace (default: the workspace itself).
    #[serde(default)]
    pub path: Option<String>,
}

/// Largest file read at all; what lies beyond is not read.
const READ_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Runs `f` on a blocking thread with a handle of the workspace (file I/O never blocks the
/// runtime).
async fn blocking<T: Send + 'static>(
    workspace: &Workspace,
    f: impl FnOnce(&Workspace) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let ws = workspace.clone();
    tokio::task::spawn_blocking(move || f(&ws))
        .await
        .map_err(|e| format!("file task failed: {e}"))?
}

/// What a path names now: its key (its real path relative to the workspace when it
/// exists; files are remembered by it) and, when a regular file is there, that file opened,
/// with its stamp. Resolved once, on a blocking thread.
async fn find(
    workspace: &Workspace,
    path: &str,
) -> Result<(PathBuf, Option<(std::fs::File, Stamp)>), String> {
    let path = path.to_owned();
    blocking(workspace, move |ws| {
        let relative = ws.relative(&path).map_err(|e| e.to_string())?;
        let key = ws.key(&relative).map_err(|e| e.to_string())?;
        if key.as_os_str().is_empty() {
            return Err(WorkspaceError::Directory(ws.display(&key)).to_string());
        }
        match ws.open_file(&key) {
            Ok(found) => Ok((key, Some(found))),
            Err(WorkspaceError::Io { error, .. }) if error.kind() == ErrorKind::NotFound => {
                Ok((key, None))
            }
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Reads a file [`find`] opened (at most [`READ_MAX_BYTES`]) as text, and whether it was cut.
async fn read_open(
    workspace: &Workspace,
    key: &Path,
    file: std::fs::File,
) -> Result<(String, bool), String> {
    let key = key.to_owned();
    blocking(workspace, move |ws| {
        ws.read_open(file, &key, READ_MAX_BYTES)
            .map_err(|e| e.to_string())
    })
    .await
}

/// What is at `path` now, read: its key and, for an existing file, its text, its stamp and
/// whether the text was cut.
async fn load(
    workspace: &Workspace,
    path: &str,
) -> Result<(PathBuf, Option<(String, Stamp, bool)>), String> {
    let (key, found) = find(workspace, path).await?;
    let Some((file, stamp)) = found else {
        return Ok((key, None));
    };
    let (text, cut) = read_open(workspace, &key, file).await?;
    Ok((key, Some((text, stamp, cut))))
}

/// `read_file`: numbered lines, `offset`/`limit` in lines, capped at [`READ_CAP_BYTES`], read
/// as a stream (`read.rs`); or raw text from `byteOffset`.
pub async fn read_file(
    workspace: &Workspace,
    memory: &mut FileMemory,
    args: ReadFileArgs,
    result_bytes: usize,
) -> Result<String, String> {
    let (key, found) = find(workspace, &args.path).await?;
    let Some((file, stamp)) = found else {
        return Err(format!("{} does not exist", workspace.display(&key)));
    };
    let cache_key = format!(
        "read_file\0{}\0{:?}\0{:?}\0{:?}",
        key.display(),
        args.offset,
        args.limit,
        args.byte_offset
    );
    memory.saw(&key, stamp);
    if let Some(hit) = memory.cached(&cache_key, stamp) {
        return Ok(hit);
    }
    // A line longer than what may be shown is cut with the byte offset to go on from.
    let shown_bytes = READ_CAP_BYTES.min(result_bytes.saturating_sub(NOTE_ROOM).max(NOTE_ROOM));
    let limits = super::read::Limits {
        lines: args.limit.unwrap_or(DEFAULT_LINES).max(1),
        out_bytes: shown_bytes,
        line_bytes: shown_bytes,
        scan_bytes: READ_MAX_BYTES,
    };
    let first = args.offset.unwrap_or(1);
    let byte_offset = args.byte_offset;
    let shown = workspace.display(&key);
    // Streamed on a blocking thread: it stops at the limits, whatever the file's size.
    let out = blocking(workspace, move |_| {
        let read = match byte_offset {
            Some(offset) => super::read::from_byte(file, offset, limits),
            None => super::read::numbered(std::io::BufReader::new(file), first, limits),
        };
        read.map_err(|e| format!("reading {shown}: {e}"))
    })
    .await?;
    memory.remember(cache_key, stamp, &out);
    Ok(out)
}

/// `write_file`, prepared: the new content and its diff against what is there.
pub async fn prepare_write(
    workspace: &Workspace,
    memory: &FileMemory,
    args: WriteFileArgs,
) -> Prepared {
    let (key, found) = match load(workspace, &args.path).await {
        Ok(found) => found,
        Err(e) => return Prepared::Finished(Err(e)),
    };
    let shown = workspace.display(&key);
    let stamp = found.as_ref().map(|(_, stamp, _)| *stamp);
    if let Some(why) = memory.stale(&key, stamp, &shown) {
        return Prepared::Finished(Err(why));
    }
    let old = match found {
        None => String::new(),
        Some((old, _, false)) => old,
        Some((_, _, true)) => return Prepared::Finished(Err(too_large(&shown))),
    };
    Prepared::Change {
        summary: format!("write {} bytes to {shown}", args.content.len()),
        diff: Some(unified_diff(&shown, &old, &args.content)),
        grant_scope: None,
        change: Change::Write {
            path: key,
            content: args.content,
            expected: stamp,
        },
    }
}

/// Why a file too large to read whole cannot be changed by the file tools.
fn too_large(shown: &str) -> String {
    format!(
        "{shown} is larger than {} MiB; it cannot be written or edited with the file tools",
        READ_MAX_BYTES >> 20
    )
}

/// `edit_file` / `multi_edit`, prepared: every edit applied in memory (all must apply), the
/// diff of the result.
pub async fn prepare_edits(
    workspace: &Workspace,
    memory: &FileMemory,
    path: &str,
    edits: Vec<Edit>,
    max_growth: usize,
) -> Prepared {
    let (key, found) = match load(workspace, path).await {
        Ok(found) => found,
        Err(e) => return Prepared::Finished(Err(e)),
    };
    let shown = workspace.display(&key);
    let Some((old, stamp, cut)) = found else {
        return Prepared::Finished(Err(format!(
            "{shown} does not exist; create it with write_file"
        )));
    };
    if let Some(why) = memory.stale(&key, Some(stamp), &shown) {
        return Prepared::Finished(Err(why));
    }
    if cut {
        return Prepared::Finished(Err(too_large(&shown)));
    }
    if edits.is_empty() {
        return Prepared::Finished(Err("no edits given".to_owned()));
    }
    let mut new = old.clone();
    for (i, edit) in edits.iter().enumerate() {
        let which = if edits.len() > 1 {
            format!("edit {} of {}: ", i + 1, edits.len())
        } else {
            String::new()
        };
        // What the edit would add is known before it is made: never build a result
        // that large (20,000 occurrences times a long new_string).
        if let Some(why) = too_much_growth(&old, &new, edit, max_growth) {
            return Prepared::Finished(Err(format!(
                "{which}{why} in {shown}; nothing was changed"
            )));
        }
        match apply_edit(&new, edit) {
            Ok(next) => new = next,
            Err(e) => {
                return Prepared::Finished(Err(format!(
                    "{which}{e} in {shown}; nothing was changed"
                )));
            }
        }
    }
    let count = edits.len();
    Prepared::Change {
        summary: format!(
            "edit {shown} ({count} change{})",
            if count == 1 { "" } else { "s" }
        ),
        diff: Some(unified_diff(&shown, &old, &new)),
        grant_scope: None,
        change: Change::Write {
            path: key,
            content: new,
            expected: Some(stamp),
        },
    }
}

/// Why applying `edit` to `current` (the original `old` with the edits before) would add
/// more than `max` bytes to the file, if it would.
fn too_much_growth(old: &str, current: &str, edit: &Edit, max: usize) -> Option<String> {
    if edit.new_string.len() <= edit.old_string.len() || edit.old_string.is_empty() {
        return None;
    }
    let times = if edit.replace_all {
        current.matches(edit.old_string.as_str()).count()
    } else {
        1
    };
    let after = current
        .len()
        .saturating_add(times.saturating_mul(edit.new_string.len() - edit.old_string.len()));
    let added = after.saturating_sub(old.len());
    (added > max).then(|| {
        format!(
            "the edit would add {} KiB ({times} replacement{}), more than the {} KiB an edit may \
             add (--max-edit-kib); make smaller edits or write the file with write_file",
            added / 1024,
            if times == 1 { "" } else { "s" },
            max / 1024
        )
    })
}

/// Applies one replacement to `text`, or says why it cannot.
pub fn apply_edit(text: &str, edit: &Edit) -> Result<String, String> {
    if edit.old_string.is_empty() {
        return Err("old_string is empty".to_owned());
    }
    if edit.old_string == edit.new_string {
        return Err("old_string and new_string are the same".to_owned());
    }
    let starts: Vec<usize> = text
        .match_indices(edit.old_string.as_str())
        .map(|(i, _)| i)
        .collect();
    match starts.len() {
        0 => Err(format!(
            "old_string was not found{}",
            closest_region(text, &edit.old_string)
        )),
        1 => Ok(text.replacen(&edit.old_string, &edit.new_string, 1)),
        _ if edit.replace_all => Ok(text.replace(&edit.old_string, &edit.new_string)),
        n => {
            let lines: Vec<String> = starts
                .iter()
                .map(|&i| (text[..i].matches('\n').count() + 1).to_string())
                .collect();
            Err(format!(
                "old_string occurs {n} times (at lines {}); give more surrounding text to make \
                 it unique, or set replaceAll",
                lines.join(", ")
            ))
        }
    }
}

/// The lines of `text` most like the first line of `wanted`, numbered, to show the model
/// what is really there.
fn closest_region(text: &str, wanted: &str) -> String {
    let first = wanted
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if first.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = text.lines().collect();
    let best = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (similar::TextDiff::from_chars(l.trim(), first).ratio(), i))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    let Some((score, at)) = best else {
        return " (the file is empty)".to_owned();
    };
    if score < 0.5 {
        return String::new();
    }
    let span = wanted.lines().count().max(1);
    let from = at.saturating_sub(2);
    let to = (at + span + 2).min(lines.len());
    let mut out = format!("; the closest text is at line {}:\n", at + 1);
    for (n, line) in lines.iter().enumerate().take(to).skip(from) {
        let _ = writeln!(out, "{:>6}\t{line}", n + 1);
    }
    out
}

/// A unified diff (3 lines of context) from `old` to `new`, both named `name`.
pub fn unified_diff(name: &str, old: &str, new: &str) -> String {
    if old == new {
        return format!("(no change: {name} already has this content)\n");
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a/{name}"), &format!("b/{name}"))
        .to_string()
}

/// Writes `content` to `key` (relative to the workspace) atomically, if the file is still as
/// it was when the change was prepared (`expected`); answers the written file's stamp.
pub async fn write(
    workspace: &Workspace,
    key: &Path,
    content: &str,
    expected: Option<Stamp>,
) -> Result<Stamp, String> {
    let key = key.to_owned();
    let content = content.to_owned();
    blocking(workspace, move |ws| {
        ws.write_atomic(&key, content.as_bytes(), Some(expected))
            .map_err(|e| e.to_string())
    })
    .await
}

/// `list_dir`: entries sorted, directories with a trailing `/`.
pub async fn list_dir(workspace: &Workspace, args: ListDirArgs) -> Result<String, String> {
    let path = args.path.unwrap_or_else(|| ".".to_owned());
    blocking(workspace, move |ws| {
        let relative = ws.relative(&path).map_err(|e| e.to_string())?;
        let shown = ws.display(&relative);
        let dir = ws.open_dir(&relative).map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        for entry in dir.entries().map_err(|e| format!("{shown}: {e}"))? {
            let entry = entry.map_err(|e| format!("{shown}: {e}"))?;
            let mut name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                name.push('/');
            }
            names.push(name);
        }
        names.sort();
        if names.is_empty() {
            return Ok(format!("{shown} is empty"));
        }
        Ok(names.join("\n"))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(old: &str, new: &str) -> Edit {
        Edit {
            old_string: old.into(),
            new_string: new.into(),
            replace_all: false,
        }
    }

    #[test]
    fn an_edit_must_match_once() {
        assert_eq!(apply_edit("a b c", &edit("b", "B")).unwrap(), "a B c");
        let twice = apply_edit("x\ny\nx\n", &edit("x", "z")).unwrap_err();
        assert!(twice.contains("2 times (at lines 1, 3)"), "{twice}");
        let all = Edit {
            replace_all: true,
            ..edit("x", "z")
        };
        assert_eq!(apply_edit("x\ny\nx\n", &all).unwrap(), "z\ny\nz\n");
    }

    #[test]
    fn a_missed_edit_shows_the_closest_lines() {
        let text = "fn main() {\n    println!(\"hello\");\n}\n";
        let e = apply_edit(text, &edit("println!(\"helo\");", "x")).unwrap_err();
        assert!(e.contains("closest text is at line 2"), "{e}");
        assert!(e.contains("     2\t    println!(\"hello\");"), "{e}");
    }

    #[test]
    fn diffs_are_unified() {
        let d = unified_diff("f.txt", "a\nb\n", "a\nc\n");
        assert!(d.contains("--- a/f.txt"), "{d}");
        assert!(d.contains("-b\n+c\n"), "{d}");
    }

    #[tokio::test]
    async fn reads_are_numbered_and_paged_and_writes_need_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::new(&dir.path().canonicalize().unwrap()).unwrap();
        let body: String = (1..=10).map(|i| format!("line {i}\n")).collect();
        std::fs::write(ws.root().join("f.txt"), &body).unwrap();
        let mut memory = FileMemory::default();
        let write = WriteFileArgs {
            path: "f.txt".into(),
            content: "new".into(),
        };
        let Prepared::Finished(Err(e)) = prepare_write(&ws, &memory, write.clone()).await else {
            panic!("an unread file was writable");
        };
        assert!(e.contains("read it with read_file first"), "{e}");
        let args = ReadFileArgs {
            path: "f.txt".into(),
            offset: Some(3),
            limit: Some(2),
            byte_offset: None,
        };
        let out = read_file(&ws, &mut memory, args, 64 * 1024).await.unwrap();
        assert_eq!(
            out,
            "     3\tline 3\n     4\tline 4\n[… lines 5-10 not shown: read on with offset 5 …]\n"
        );
        let Prepared::Change { diff, .. } = prepare_write(&ws, &memory, write.clone()).await else {
            panic!("a read file was not writable");
        };
        assert!(diff.unwrap().contains("+new"));
        // Changed on disk since the read: refused again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(ws.root().join("f.txt"), "changed elsewhere\n").unwrap();
        let Prepared::Finished(Err(e)) = prepare_write(&ws, &memory, write).await else {
            panic!("a file changed since its read was writable");
        };
        assert!(e.contains("changed on disk"), "{e}");
    }
}
