//! Endpoint signing secrets: inline values, or sources on the server (`valueFrom: {env}`
//! or `{file}`), resolved in this one place.
//!
//! Validation checks only the form of a reference; whether it can be read is learnt here,
//! when the catalog is built and again while it cannot be (a file that appears later, a
//! restart with the variable set). Invariants:
//! - a file is read only when it is a regular file, without blocking (a FIFO or a device is
//!   refused, never waited on), and at most [`MAX_SECRET_FILE_BYTES`] of it;
//! - errors name the reference and what is wrong with it, never the value.

use std::io::Read as _;

use crate::resources::kinds::SecretSource;
use crate::resources::validate::check_whsec;

/// The most a secret file may hold: a `whsec_` secret is under 100 bytes.
pub const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// The key bytes of one secret source, or why they cannot be had now.
pub fn resolve(source: &SecretSource) -> Result<Vec<u8>, String> {
    match (&source.value, &source.value_from) {
        (Some(value), _) => check_whsec(value),
        (None, Some(from)) => match (&from.env, &from.file) {
            (Some(var), _) => {
                let value = std::env::var(var).map_err(|_| format!("environment variable `{var}` is not set"))?;
                check_whsec(value.trim()).map_err(|e| format!("environment variable `{var}` {e}"))
            }
            (None, Some(path)) => {
                let text = read_secret_file(path).map_err(|e| format!("file `{path}`: {e}"))?;
                check_whsec(text.trim()).map_err(|e| format!("file `{path}` {e}"))
            }
            (None, None) => Err("`valueFrom` names neither `env` nor `file`".to_owned()),
        },
        (None, None) => Err("the secret has neither `value` nor `valueFrom`".to_owned()),
    }
}

/// Reads a small regular file without ever blocking on it.
fn read_secret_file(path: &str) -> Result<String, String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading would wait for a writer; a non-blocking open does not.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "cannot be read (it does not exist)".to_owned(),
        std::io::ErrorKind::PermissionDenied => "cannot be read (permission denied)".to_owned(),
        _ => "cannot be read".to_owned(),
    })?;
    let metadata = file.metadata().map_err(|_| "cannot be read".to_owned())?;
    if !metadata.is_file() {
        return Err("is not a regular file".to_owned());
    }
    if metadata.len() > MAX_SECRET_FILE_BYTES {
        return Err(format!("is larger than {MAX_SECRET_FILE_BYTES} bytes"));
    }
    let mut text = String::new();
    file.take(MAX_SECRET_FILE_BYTES).read_to_string(&mut text).map_err(|_| "is not UTF-8 text".to_owned())?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::kinds::ValueFrom;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn from_file(path: &std::path::Path) -> SecretSource {
        SecretSource { value: None, value_from: Some(ValueFrom { env: None, file: Some(path.display().to_string()) }) }
    }

    #[test]
    fn a_secret_file_is_read_once_it_exists_and_errors_never_show_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let source = from_file(&path);
        assert!(resolve(&source).unwrap_err().contains("does not exist"));
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        assert_eq!(resolve(&source).unwrap().len(), 24);
        std::fs::write(&path, "whsec_not-base64!").unwrap();
        let error = resolve(&source).unwrap_err();
        assert!(!error.contains("not-base64"), "{error}");
    }

    #[test]
    fn fifos_directories_and_large_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        assert!(resolve(&from_file(dir.path())).unwrap_err().contains("not a regular file"));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 10_000]).unwrap();
        assert!(resolve(&from_file(&big)).unwrap_err().contains("larger than"));
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(resolve(&from_file(&fifo)).unwrap_err().contains("not a regular file"));
    }
}
