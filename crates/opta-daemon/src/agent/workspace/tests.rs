use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

fn rel(ws: &Workspace, path: &str) -> PathBuf {
    ws.relative(path).unwrap()
}

fn read(ws: &Workspace, path: &str) -> Result<String, WorkspaceError> {
    let relative = ws.relative(path)?;
    ws.read_text(&relative, 1 << 20).map(|(text, _, _)| text)
}

fn stamp(ws: &Workspace, path: &str) -> Stamp {
    ws.open_file(Path::new(path)).unwrap().1
}

fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, WorkspaceError>) {
    match result {
        Err(WorkspaceError::Outside { .. }) => {}
        other => panic!("{what} was not refused as outside: {other:?}"),
    }
}

#[test]
fn paths_fold_inside_and_climbing_out_is_refused() {
    let f = fixture();
    let root = f.ws.root().to_owned();
    assert_eq!(rel(&f.ws, "src/main.rs"), Path::new("src/main.rs"));
    assert_eq!(rel(&f.ws, "./src/../src/main.rs"), Path::new("src/main.rs"));
    assert_eq!(rel(&f.ws, "."), Path::new(""));
    assert_eq!(rel(&f.ws, ""), Path::new(""));
    assert_eq!(
        rel(&f.ws, root.join("src/main.rs").to_str().unwrap()),
        Path::new("src/main.rs")
    );
    assert_eq!(f.ws.display(Path::new("")), ".");
    for path in [
        "../outside/secret",
        "src/../../outside/secret",
        "..",
        "/etc/passwd",
        "/",
    ] {
        refused(path, f.ws.relative(path));
    }
    refused(
        "outside",
        f.ws.relative(f.outside.join("secret").to_str().unwrap()),
    );
    assert!(matches!(
        f.ws.relative("a\0b"),
        Err(WorkspaceError::Invalid(_))
    ));
}

#[test]
fn symlinks_that_lead_out_are_refused_at_the_operation_and_inside_ones_followed() {
    let f = fixture();
    let root = f.ws.root().to_owned();
    symlink(&f.outside, root.join("door")).unwrap();
    symlink(f.outside.join("secret"), root.join("peek")).unwrap();
    symlink("src", root.join("code")).unwrap();
    symlink(f.outside.join("not-yet"), root.join("dangling")).unwrap();
    refused("door/secret", read(&f.ws, "door/secret"));
    refused("peek", read(&f.ws, "peek"));
    refused("door (dir)", f.ws.open_dir(Path::new("door")));
    assert!(read(&f.ws, "dangling").is_err());
    refused(
        "write through door",
        f.ws.write_atomic(Path::new("door/new-file"), b"x", None),
    );
    assert!(!f.outside.join("new-file").exists());
    // Writing to a link that leads out is refused, never written where it points.
    refused(
        "write to peek",
        f.ws.write_atomic(Path::new("peek"), b"mine", None),
    );
    assert_eq!(
        std::fs::read_to_string(f.outside.join("secret")).unwrap(),
        "no"
    );
    assert_eq!(read(&f.ws, "code/main.rs").unwrap(), "fn main() {}");
    assert_eq!(
        f.ws.key(Path::new("code/main.rs")).unwrap(),
        Path::new("src/main.rs")
    );
    f.ws.write_atomic(Path::new("code/new.rs"), b"new", None)
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("src/new.rs")).unwrap(),
        "new"
    );
}

#[test]
fn a_symlink_planted_at_every_temporary_name_is_never_followed() {
    let f = fixture();
    let root = f.ws.root().to_owned();
    let target = f.outside.join("target");
    std::fs::write(&target, "untouched").unwrap();
    // The old predictable name (`.NAME.opta-PID`) is planted too.
    symlink(
        &target,
        root.join(format!(".f.txt.opta-{}", std::process::id())),
    )
    .unwrap();
    // A racer turns every temporary file that appears into a link out.
    let stop = Arc::new(AtomicBool::new(false));
    let planted = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let racer = {
        let (stop, planted) = (stop.clone(), planted.clone());
        let (root, target) = (root.clone(), target.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(".opta-write-")
                        && std::fs::remove_file(entry.path()).is_ok()
                        && symlink(&target, entry.path()).is_ok()
                    {
                        planted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    // Until the racer has planted links at several temporary names (it must, or the test
    // proves nothing).
    let mut writes = 0;
    while planted.load(Ordering::Relaxed) < 5 && writes < 20_000 {
        let _ =
            f.ws.write_atomic(Path::new("f.txt"), format!("{writes}").as_bytes(), None);
        // A link the racer got renamed into place is a link out: writes to it are refused,
        // so it is cleared for the next round.
        if root
            .join("f.txt")
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = std::fs::remove_file(root.join("f.txt"));
        }
        writes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    assert!(
        planted.load(Ordering::Relaxed) > 0,
        "the racer planted nothing in {writes} writes"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    assert!(
        std::fs::read_dir(&f.outside).unwrap().count() == 2,
        "nothing new outside"
    );
}

#[test]
fn a_parent_swapped_for_a_link_during_writes_and_reads_never_leads_out() {
    let f = fixture();
    let root = f.ws.root().to_owned();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/secret"), "inside").unwrap();
    std::fs::write(f.outside.join("secret"), "OUTSIDE").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let racer = {
        let (stop, root, outside) = (stop.clone(), root.clone(), f.outside.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::rename(root.join("sub"), root.join("sub-real"));
                let _ = symlink(&outside, root.join("sub"));
                std::thread::yield_now();
                let _ = std::fs::remove_file(root.join("sub"));
                let _ = std::fs::rename(root.join("sub-real"), root.join("sub"));
            }
        })
    };
    let (mut leaked_reads, mut refused) = (0, 0);
    // At least 1,000 rounds, and on until the racer was met at least once (a loaded machine
    // may not schedule it for a while), within a generous deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for i in 0.. {
        if (i >= 1000 && refused > 0) || std::time::Instant::now() > deadline {
            break;
        }
        let written =
            f.ws.write_atomic(Path::new("sub/written"), format!("{i}").as_bytes(), None);
        match read(&f.ws, "sub/secret") {
            Ok(text) if text == "OUTSIDE" => leaked_reads += 1,
            Err(WorkspaceError::Outside { .. }) => refused += 1,
            _ => {}
        }
        if matches!(written, Err(WorkspaceError::Outside { .. })) {
            refused += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    assert_eq!(leaked_reads, 0, "reads that went outside");
    // The race was real: some operations met the link and were refused.
    assert!(refused > 0, "no operation met the swapped directory");
    let outside: Vec<_> = std::fs::read_dir(&f.outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        outside,
        vec![std::ffi::OsString::from("secret")],
        "writes outside"
    );
    assert_eq!(
        std::fs::read_to_string(f.outside.join("secret")).unwrap(),
        "OUTSIDE"
    );
}

#[test]
fn a_write_is_refused_when_the_file_changed_since_it_was_prepared() {
    let f = fixture();
    let key = Path::new("src/main.rs");
    let before = Some(stamp(&f.ws, "src/main.rs"));
    std::fs::write(f.ws.root().join(key), "fn main() { /* the user's line */ }").unwrap();
    let e =
        f.ws.write_atomic(key, b"overwrite", Some(before))
            .unwrap_err();
    assert!(e.to_string().contains("changed on disk"), "{e}");
    assert!(
        std::fs::read_to_string(f.ws.root().join(key))
            .unwrap()
            .contains("the user's line")
    );
    // A file that appeared while a create waited is not overwritten either.
    std::fs::write(f.ws.root().join("late.txt"), "theirs").unwrap();
    assert!(
        f.ws.write_atomic(Path::new("late.txt"), b"mine", Some(None))
            .is_err()
    );
    let now = stamp(&f.ws, "src/main.rs");
    let written = f.ws.write_atomic(key, b"fine", Some(Some(now))).unwrap();
    assert_eq!(
        written,
        stamp(&f.ws, "src/main.rs"),
        "the stamp answered is the file's"
    );
}

#[test]
fn a_workspace_renamed_and_replaced_by_a_link_is_refused_as_moved() {
    let f = fixture();
    let root = f.ws.root().to_owned();
    let pinned = f.ws.identity();
    f.ws.ensure_in_place().unwrap();
    std::fs::rename(&root, root.with_file_name("ws-old")).unwrap();
    symlink(&f.outside, &root).unwrap();
    assert!(matches!(
        f.ws.ensure_in_place(),
        Err(WorkspaceError::Moved(_))
    ));
    assert!(matches!(
        Workspace::reopen(&root, &Protected::default(), pinned),
        Err(WorkspaceError::Moved(_))
    ));
    assert!(f.ws.command_dir(".").is_err());
    // The open handle still names the directory the session took.
    assert_eq!(read(&f.ws, "src/main.rs").unwrap(), "fn main() {}");
}

#[test]
fn the_root_and_a_directory_holding_the_home_are_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().canonicalize().unwrap();
    let home = base.join(".config/opta");
    std::fs::create_dir_all(home.join("daemon")).unwrap();
    std::fs::write(home.join("daemon/token"), "SECRET").unwrap();
    std::fs::write(home.join("config.toml"), "port = 1").unwrap();
    let strict = Protected::new(&home, false);
    for path in [Path::new("/"), base.as_path(), home.as_path()] {
        assert!(
            matches!(
                Workspace::open(path, &strict),
                Err(WorkspaceError::Refused { .. })
            ),
            "{path:?}"
        );
    }
    let any = Protected::new(&home, true);
    let ws = Workspace::open(&base, &any).unwrap();
    symlink(".config/opta/daemon", base.join("way-in")).unwrap();
    std::fs::hard_link(home.join("daemon/token"), base.join("copy")).unwrap();
    for path in [
        ".config/opta/daemon/token",
        "way-in/token",
        "copy",
        ".config/opta/config.toml",
    ] {
        assert!(
            matches!(read(&ws, path), Err(WorkspaceError::Protected(_))),
            "{path} was read"
        );
    }
    for path in [
        ".config/opta/daemon/token",
        "way-in/token",
        ".config/opta/new",
    ] {
        assert!(
            matches!(
                ws.write_atomic(&ws.relative(path).unwrap(), b"x", None),
                Err(WorkspaceError::Protected(_))
            ),
            "{path} was written"
        );
    }
    assert!(ws.open_dir(Path::new(".config/opta")).is_err());
    assert_eq!(
        std::fs::read_to_string(home.join("daemon/token")).unwrap(),
        "SECRET"
    );
    assert!(!home.join("new").exists());
    // The walk never enters it.
    std::fs::write(base.join("visible.txt"), "x").unwrap();
    let mut seen = Vec::new();
    Walk::new(&ws)
        .files(Path::new(".config"), |e| {
            seen.push(e.relative.to_owned());
            true
        })
        .unwrap();
    assert!(seen.is_empty(), "{seen:?}");
}

#[test]
fn a_fifo_is_refused_at_once_not_waited_on() {
    let f = fixture();
    let fifo = f.ws.root().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let started = std::time::Instant::now();
    assert!(matches!(
        read(&f.ws, "pipe"),
        Err(WorkspaceError::NotRegular(_))
    ));
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn the_walk_respects_ignore_files_and_never_follows_links() {
    let f = fixture();
    let root = f.ws.root().to_owned();
    std::fs::create_dir_all(root.join("target")).unwrap();
    std::fs::create_dir_all(root.join("src/gen")).unwrap();
    std::fs::write(root.join(".gitignore"), "target/\n*.log\n").unwrap();
    std::fs::write(root.join("src/.gitignore"), "gen/\n!keep.log\n").unwrap();
    std::fs::write(root.join("target/b.rs"), "").unwrap();
    std::fs::write(root.join("src/gen/c.rs"), "").unwrap();
    std::fs::write(root.join("src/a.log"), "").unwrap();
    std::fs::write(root.join("src/keep.log"), "").unwrap();
    std::fs::write(root.join(".hidden"), "").unwrap();
    symlink(&f.outside, root.join("door")).unwrap();
    symlink("src/main.rs", root.join("alias.rs")).unwrap();
    let mut seen = Vec::new();
    Walk::new(&f.ws)
        .files(Path::new(""), |e| {
            seen.push(e.relative.display().to_string());
            assert!(e.open().is_some());
            true
        })
        .unwrap();
    assert_eq!(seen, ["src/keep.log", "src/main.rs"]);
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

#[test]
fn a_file_below_missing_directories_is_created_with_them() {
    let f = fixture();
    let missing = f.ws.open_file(Path::new("new/dir/file.txt")).unwrap_err();
    assert!(
        matches!(&missing, WorkspaceError::Io { error, .. } if error.kind() == io::ErrorKind::NotFound),
        "{missing:?}"
    );
    f.ws.write_atomic(Path::new("new/dir/file.txt"), b"x", Some(None))
        .unwrap();
    assert_eq!(read(&f.ws, "new/dir/file.txt").unwrap(), "x");
}

#[test]
fn a_child_started_in_the_handle_runs_in_the_opened_directory_whatever_the_path_names() {
    let f = fixture();
    let root = f.ws.root().to_owned();
    std::fs::rename(&root, root.with_file_name("ws-old")).unwrap();
    symlink(&f.outside, &root).unwrap();
    let out = std::process::Command::new("pwd")
        .arg("-P")
        .current_dir(f.ws.handle_path())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        root.with_file_name("ws-old").display().to_string()
    );
}
