//! Endpoint signing secrets: inline values, or sources on the server (`valueFrom: {env}`
//! or `{file}`), resolved in this one place.
//!
//! Validation checks only the form of a reference; whether it can be read is learnt here,
//! when the catalog is built and again while it cannot be (a file that appears later, a
//! restart with the variable set). Invariants:
//! - a source is read only when it lies in its namespace's allowed set
//!   ([`SecretsConfig`]), checked again here for references stored before the set was
//!   narrowed: nothing outside it is looked at, so no answer depends on it;
//! - a file is read only when its real path (links followed) is inside the namespace's
//!   directory, is a regular file, without blocking (a FIFO or a device is refused, never
//!   waited on), and at most [`MAX_SECRET_FILE_BYTES`] of it;
//! - errors name the reference and what is wrong with it, never the value; a reference
//!   outside the set is not named either (it may be a secret in the wrong field).

use std::io::Read as _;
use std::path::Path;

use crate::resources::kinds::SecretSource;
use crate::resources::secret_sources::SecretsConfig;
use crate::resources::validate::check_whsec;

/// The most a secret file may hold: a `whsec_` secret is under 100 bytes.
pub const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// The key bytes of one secret source of an endpoint in `namespace`, or why they cannot
/// be had now. Reads files: call it off the async workers.
pub fn resolve(config: &SecretsConfig, namespace: &str, source: &SecretSource) -> Result<Vec<u8>, String> {
    match (&source.value, &source.value_from) {
        (Some(value), _) => check_whsec(value),
        (None, Some(from)) => match (&from.env, &from.file) {
            (Some(var), _) => {
                config.check_env(namespace, var).map_err(|e| format!("`valueFrom.env` {e}"))?;
                let value = std::env::var(var).map_err(|_| format!("environment variable `{var}` is not set"))?;
                check_whsec(value.trim()).map_err(|e| format!("environment variable `{var}` {e}"))
            }
            (None, Some(file)) => {
                let (directory, path) =
                    config.file_path(namespace, file).map_err(|e| format!("`valueFrom.file` {e}"))?;
                let text = read_secret_file(&directory, &path).map_err(|e| format!("file `{file}` {e}"))?;
                check_whsec(text.trim()).map_err(|e| format!("file `{file}` {e}"))
            }
            (None, None) => Err("`valueFrom` names neither `env` nor `file`".to_owned()),
        },
        (None, None) => Err("the secret has neither `value` nor `valueFrom`".to_owned()),
    }
}

/// Reads a small regular file inside `directory` without ever blocking on it.
fn read_secret_file(directory: &Path, path: &Path) -> Result<String, String> {
    // Links are followed, but only to somewhere inside the namespace's directory; a link
    // that leads out, or nowhere, reads like a missing file.
    let missing = || "cannot be read (it does not exist in the namespace's secret directory)".to_owned();
    let directory = std::fs::canonicalize(directory).map_err(|_| missing())?;
    let real = std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => "cannot be read (permission denied)".to_owned(),
        _ => missing(),
    })?;
    if !real.starts_with(&directory) {
        return Err(missing());
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading would wait for a writer; a non-blocking open does not.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK | libc::O_NOFOLLOW);
    let file = options.open(&real).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing(),
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

    /// A file root with the namespace `ns`'s directory in it.
    fn root() -> (tempfile::TempDir, SecretsConfig) {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("ns")).unwrap();
        let config = SecretsConfig { file_root: Some(root.path().to_owned()), ..SecretsConfig::default() };
        (root, config)
    }

    fn from_file(file: &str) -> SecretSource {
        SecretSource { value: None, value_from: Some(ValueFrom { env: None, file: Some(file.to_owned()) }) }
    }

    fn from_env(var: &str) -> SecretSource {
        SecretSource { value: None, value_from: Some(ValueFrom { env: Some(var.to_owned()), file: None }) }
    }

    #[test]
    fn a_secret_file_is_read_once_it_exists_and_errors_never_show_the_value() {
        let (root, config) = root();
        let source = from_file("secret");
        let error = resolve(&config, "ns", &source).unwrap_err();
        assert_eq!(error, "file `secret` cannot be read (it does not exist in the namespace's secret directory)");
        std::fs::write(root.path().join("ns/secret"), format!("{SECRET}\n")).unwrap();
        assert_eq!(resolve(&config, "ns", &source).unwrap().len(), 24);
        std::fs::write(root.path().join("ns/secret"), "whsec_not-base64!").unwrap();
        let error = resolve(&config, "ns", &source).unwrap_err();
        assert!(!error.contains("not-base64"), "{error}");
    }

    #[test]
    fn fifos_directories_and_large_files_are_refused_without_blocking() {
        let (root, config) = root();
        let dir = root.path().join("ns");
        std::fs::create_dir(dir.join("sub")).unwrap();
        assert!(resolve(&config, "ns", &from_file("sub")).unwrap_err().contains("not a regular file"));
        std::fs::write(dir.join("big"), vec![b'a'; 10_000]).unwrap();
        assert!(resolve(&config, "ns", &from_file("big")).unwrap_err().contains("larger than"));
        assert!(std::process::Command::new("mkfifo").arg(dir.join("fifo")).status().unwrap().success());
        assert!(resolve(&config, "ns", &from_file("fifo")).unwrap_err().contains("not a regular file"));
    }

    #[test]
    fn links_are_followed_only_inside_the_namespace_s_directory() {
        let (root, config) = root();
        let dir = root.path().join("ns");
        // A Kubernetes secret volume: `key -> ..data/key`, `..data -> ..2024_01_01`.
        std::fs::create_dir(dir.join("..2024_01_01")).unwrap();
        std::fs::write(dir.join("..2024_01_01/key"), SECRET).unwrap();
        std::os::unix::fs::symlink("..2024_01_01", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", dir.join("key")).unwrap();
        assert_eq!(resolve(&config, "ns", &from_file("key")).unwrap().len(), 24);
        // Out of it, existing or not, reads like a missing file.
        std::fs::create_dir(root.path().join("other")).unwrap();
        std::fs::write(root.path().join("other/key"), SECRET).unwrap();
        std::os::unix::fs::symlink("../other/key", dir.join("out")).unwrap();
        std::os::unix::fs::symlink("../other/none", dir.join("dangling")).unwrap();
        let out = resolve(&config, "ns", &from_file("out")).unwrap_err();
        let dangling = resolve(&config, "ns", &from_file("dangling")).unwrap_err();
        assert_eq!(out.replace("`out`", "`dangling`"), dangling);
    }

    #[test]
    fn a_source_outside_the_namespace_s_set_is_never_read_nor_named() {
        let (_root, config) = root();
        // As if stored before the set was narrowed.
        for source in [
            from_env("PATH"),
            from_env("HOOKWARDEN_SECRET_OTHER__KEY"),
            from_file("/etc/hostname"),
            from_file("../ns/x"),
        ] {
            let error = resolve(&config, "ns", &source).unwrap_err();
            assert!(error.starts_with("`valueFrom."), "{error}");
            assert!(!error.contains("PATH`") && !error.contains("OTHER") && !error.contains("/etc"), "{error}");
        }
    }
}
