use super::*;

const T0: i64 = 1_700_000_000;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn an_absent_file_is_created_with_its_parents_mode_and_mtime() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("a/b/worker.log");
    let r = put_back(&path, 0o100640, T0, b"line 1\n", at(5)).unwrap();
    assert_eq!(r.action, Action::Created);
    assert_eq!(std::fs::read(&path).unwrap(), b"line 1\n");
    assert_eq!(mode_of(&path), 0o640);
    assert_eq!(std::fs::metadata(&path).unwrap().mtime(), T0);
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1,
        "a partial file was left"
    );
}

#[test]
fn an_identical_file_is_kept_untouched() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("worker.log");
    std::fs::write(&path, b"same").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let inode = std::fs::metadata(&path).unwrap().ino();
    let r = put_back(&path, 0o600, T0, b"same", at(5)).unwrap();
    assert_eq!((r.action, r.moved_aside_to), (Action::Kept, None));
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
}

#[test]
fn a_different_file_is_moved_aside_under_a_name_that_says_so_never_overwritten() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("worker.log");
    std::fs::write(&path, b"grown after the checkpoint\n").unwrap();
    let r = put_back(&path, 0o644, T0, b"captured\n", at(1234)).unwrap();
    let aside = format!("{}.snapreg-moved-aside-1234", path.display());
    assert_eq!(r.action, Action::MovedAside);
    assert_eq!(r.moved_aside_to.as_deref(), Some(aside.as_str()));
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        b"grown after the checkpoint\n"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"captured\n");
    // Again in the same second: the first moved-aside file is not overwritten either.
    std::fs::write(&path, b"third\n").unwrap();
    let r = put_back(&path, 0o644, T0, b"captured\n", at(1234)).unwrap();
    assert_eq!(r.moved_aside_to.unwrap(), format!("{aside}-2"));
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        b"grown after the checkpoint\n"
    );
    assert_eq!(std::fs::read(format!("{aside}-2")).unwrap(), b"third\n");
}

#[test]
fn same_bytes_with_another_mode_is_moved_aside_too() {
    // CRIU checks the mode of a file it reopens.
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("scratch");
    std::fs::write(&path, b"x").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = put_back(&path, 0o600, T0, b"x", at(9)).unwrap();
    assert_eq!(r.action, Action::MovedAside);
    assert_eq!(mode_of(&path), 0o600);
}

#[test]
fn a_directory_in_the_way_or_a_kernel_path_is_refused_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("dir");
    std::fs::create_dir(&path).unwrap();
    let e = put_back(&path, 0o600, T0, b"x", at(9))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("directory is in the way") && e.contains(&*path.to_string_lossy()),
        "{e}"
    );
    let e = put_back(Path::new("/proc/sys/kernel/x"), 0o600, T0, b"x", at(9)).unwrap_err();
    assert!(matches!(e, ClientError::PutBack { .. }), "{e}");
}

/// A full filesystem (a 64 KiB tmpfs): the error says so and what to do, the file in
/// the way is untouched, and no partial or moved-aside file is left.
#[test]
fn a_full_disk_fails_clearly_and_leaves_nothing_half_written() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("full");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "snapreg-test-putback"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let path = mnt.join("worker.log");
    std::fs::write(&path, b"in the way\n").unwrap();
    let big = vec![7u8; 256 << 10];
    let e = put_back(&path, 0o644, T0, &big, at(9)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("No space left") && msg.contains("free space"),
        "{msg}"
    );
    assert!(msg.contains("nothing half-written"), "{msg}");
    let names: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["worker.log".to_string()]);
    assert_eq!(std::fs::read(&path).unwrap(), b"in the way\n");
}
