//! Files the agent keeps under its state directory (the CA's root, tokens, pods' saved
//! settings): written whole or not at all, with exactly the mode asked, whatever was
//! there before. What they hold and how they are read is their owners' business.

use std::{
    fs::{self, Permissions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
};

/// Replaces `path` with `bytes`, mode `mode`.
///
/// The bytes go to a new file beside it, created exclusively (so nobody holds it open from
/// before, as they could a leftover temporary file), given `mode` before the first byte
/// (a creation mode only applies to a new file and the umask may change it), flushed,
/// and renamed over `path`: a crash leaves the old file or the new one, never half of one.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // Created with mode 0600: never readable by others, even before `set_permissions`.
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.as_file()
        .set_permissions(Permissions::from_mode(mode))?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

/// Creates `dir` and its missing parents with mode 0700, or takes an existing `dir` back
/// to 0700: only the agent may list or replace what it keeps there.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replaced_file_gets_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write(&path, b"secret", 0o600).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn mode_is_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        write(&path, b"public", 0o644).unwrap();
        assert_eq!(mode(&path), 0o644);
    }

    #[test]
    fn nothing_but_the_file_is_left_in_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a"), b"1", 0o600).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn existing_directory_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("ca");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, Permissions::from_mode(0o755)).unwrap();
        private_dir(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        private_dir(&dir.path().join("new/nested")).unwrap();
        assert_eq!(mode(&dir.path().join("new/nested")), 0o700);
    }
}
