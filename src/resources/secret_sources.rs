//! Which server-side secret sources (`valueFrom`) a namespace may name: the server's
//! operator allows each namespace its own set, and nothing else can be named.
//!
//! - Environment variables `<envPrefix><NAMESPACE>__<NAME>` (default prefix
//!   `HOOKWARDEN_SECRET_`): the namespace upper-cased with `-` as `_`, two underscores,
//!   then a name of `A-Z`, `0-9` and single `_`. The double underscore is what makes the
//!   set of one namespace disjoint from every other's (`a` cannot name a variable of
//!   `a-b`), and from every ordinary variable (`PATH`, `HOOKWARDEN_JWT_SECRET`).
//! - Files under `fileRoot/<namespace>/`, named by a relative path without `..` (none
//!   when `fileRoot` is not set).
//!
//! Pure logic, no I/O: validation uses it to refuse a reference outside the set at apply,
//! and the catalog (`crate::catalog::secrets`) checks again before it reads anything, for
//! references stored before the set was narrowed. Invariant: a refusal says what the
//! namespace may name, never the reference itself (it may be a secret pasted in the wrong
//! field) nor anything learnt about it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default `secrets.envPrefix`.
pub const DEFAULT_ENV_PREFIX: &str = "HOOKWARDEN_SECRET_";

/// The longest name a reference may give (a variable's part after the namespace, a path).
const MAX_REFERENCE_LEN: usize = 200;

/// The `secrets` settings: where the server reads `valueFrom` sources from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SecretsConfig {
    /// Variables a namespace may name start with this, then the namespace.
    pub env_prefix: String,
    /// The directory holding one subdirectory per namespace; `None`: no file sources.
    pub file_root: Option<PathBuf>,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self { env_prefix: DEFAULT_ENV_PREFIX.to_owned(), file_root: None }
    }
}

impl SecretsConfig {
    /// Refuses settings that would let namespaces name what is not theirs.
    pub fn validate(&self) -> Result<(), String> {
        let prefix = &self.env_prefix;
        let valid = prefix.len() <= 64
            && prefix.starts_with(|c: char| c.is_ascii_uppercase())
            && prefix.ends_with('_')
            && prefix.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err("secrets.envPrefix (HOOKWARDEN_SECRETS_ENV_PREFIX) must be at most 64 characters of A-Z, 0-9 and '_', starting with a letter and ending with '_'".into());
        }
        if let Some(root) = &self.file_root {
            if !root.is_absolute() || !root.is_dir() {
                return Err(format!(
                    "secrets.fileRoot (HOOKWARDEN_SECRETS_FILE_ROOT) must be an absolute path of a directory: {} is not",
                    root.display()
                ));
            }
        }
        Ok(())
    }

    /// What every variable `namespace` may name starts with.
    pub fn env_prefix_of(&self, namespace: &str) -> String {
        format!("{}{}__", self.env_prefix, namespace.to_ascii_uppercase().replace('-', "_"))
    }

    /// Whether `namespace` may name the variable `var`.
    pub fn check_env(&self, namespace: &str, var: &str) -> Result<(), String> {
        let prefix = self.env_prefix_of(namespace);
        let name_ok = |name: &str| {
            !name.is_empty()
                && name.len() <= MAX_REFERENCE_LEN
                && !name.starts_with('_')
                && !name.ends_with('_')
                && !name.contains("__")
                && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        };
        if var.strip_prefix(&prefix).is_some_and(name_ok) {
            return Ok(());
        }
        Err(format!(
            "must name a variable namespace `{namespace}` may use: `{prefix}` followed by A-Z, 0-9 and single '_' (e.g. `{prefix}WAREHOUSE`)"
        ))
    }

    /// Whether `namespace` may name the file `file`.
    pub fn check_file(&self, namespace: &str, file: &str) -> Result<(), String> {
        if self.file_root.is_none() {
            return Err(format!(
                "this server reads no secret files (its secrets.fileRoot is not set): use `valueFrom.env` with a variable `{}…`, or `value`",
                self.env_prefix_of(namespace)
            ));
        }
        let component_ok = |c: &str| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        // A secret pasted as a file name is refused without being named in a status.
        let looks_like_a_secret = file.starts_with("whsec_");
        if file.len() <= MAX_REFERENCE_LEN && !looks_like_a_secret && file.split('/').all(component_ok) {
            return Ok(());
        }
        Err(format!(
            "must be a path relative to namespace `{namespace}`'s secret directory (the server reads secrets.fileRoot/{namespace}/PATH): names of A-Z, a-z, 0-9, '.', '_' and '-' joined by '/', without `.` or `..`"
        ))
    }

    /// The namespace's secret directory and the file `file` in it, once `file` passed
    /// [`SecretsConfig::check_file`].
    pub fn file_path(&self, namespace: &str, file: &str) -> Result<(PathBuf, PathBuf), String> {
        self.check_file(namespace, file)?;
        let directory = self.file_root.as_deref().map(|root| root.join(namespace)).unwrap_or_default();
        let path = directory.join(Path::new(file));
        Ok((directory, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_files() -> SecretsConfig {
        SecretsConfig { file_root: Some(PathBuf::from("/srv/secrets")), ..SecretsConfig::default() }
    }

    #[test]
    fn a_namespace_names_only_its_own_variables() {
        let config = SecretsConfig::default();
        assert!(config.check_env("payments", "HOOKWARDEN_SECRET_PAYMENTS__WAREHOUSE").is_ok());
        assert!(config.check_env("team-a", "HOOKWARDEN_SECRET_TEAM_A__OLD_KEY_2").is_ok());
        for refused in [
            "PATH",
            "HOOKWARDEN_JWT_SECRET",
            "HOOKWARDEN_SECRET_PAYMENTS__",
            "HOOKWARDEN_SECRET_PAYMENTS__lower",
            "HOOKWARDEN_SECRET_PAYMENTS__A__B",
            "HOOKWARDEN_SECRET_PAYMENTS___A",
            "HOOKWARDEN_SECRET_PAYMENTS__A_",
            "HOOKWARDEN_SECRET_BILLING__WAREHOUSE",
            "whsec_Ck9AklJSG5QVLLuQdjzCqGP9EFGUiEHP",
        ] {
            // One message, which names what is allowed, never the reference.
            let error = config.check_env("payments", refused).unwrap_err();
            assert_eq!(error, config.check_env("payments", "PATH").unwrap_err(), "{refused}");
            assert!(error.contains("`HOOKWARDEN_SECRET_PAYMENTS__`") && !error.contains("PATH"), "{error}");
        }
    }

    #[test]
    fn no_namespace_names_a_variable_of_another() {
        // `a` and `a-b`, `a--b`: the double underscore keeps their sets apart.
        let config = SecretsConfig::default();
        let namespaces = ["a", "a-b", "a--b", "b"];
        for var in ["HOOKWARDEN_SECRET_A__B__X", "HOOKWARDEN_SECRET_A_B__X", "HOOKWARDEN_SECRET_A__B_X"] {
            let owners: Vec<&str> = namespaces.iter().copied().filter(|ns| config.check_env(ns, var).is_ok()).collect();
            assert!(owners.len() <= 1, "{var} is named by {owners:?}");
        }
        assert!(config.check_env("a--b", "HOOKWARDEN_SECRET_A__B__X").is_ok());
        assert!(config.check_env("a", "HOOKWARDEN_SECRET_A__B__X").is_err());
    }

    #[test]
    fn a_namespace_names_only_files_of_its_own_directory() {
        let config = with_files();
        let (directory, path) = config.file_path("payments", "team/warehouse.key").unwrap();
        assert_eq!(directory, Path::new("/srv/secrets/payments"));
        assert_eq!(path, Path::new("/srv/secrets/payments/team/warehouse.key"));
        assert!(config.check_file("payments", "..data").is_ok(), "Kubernetes secret volumes name files so");
        for refused in [
            "/etc/passwd",
            "../billing/key",
            "a/../../b",
            "./key",
            "a//b",
            "",
            "key/",
            "a b",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            let error = config.check_file("payments", refused).unwrap_err();
            assert_eq!(error, config.check_file("payments", "/").unwrap_err(), "{refused}");
            assert!(error.contains("relative"), "{error}");
        }
        let error = SecretsConfig::default().check_file("payments", "key").unwrap_err();
        assert!(
            error.contains("secrets.fileRoot is not set") && error.contains("HOOKWARDEN_SECRET_PAYMENTS__"),
            "{error}"
        );
    }

    #[test]
    fn the_settings_are_read_from_the_config_file_s_mapping() {
        let config: SecretsConfig = yaml_serde::from_str("fileRoot: /srv/secrets\n").unwrap();
        assert_eq!(config, with_files(), "the prefix keeps its default");
        let error = yaml_serde::from_str::<SecretsConfig>("fileroot: /srv\n").unwrap_err().to_string();
        assert!(error.contains("fileroot"), "{error}");
    }

    #[test]
    fn settings_that_would_widen_the_sets_are_refused() {
        assert!(SecretsConfig::default().validate().is_ok());
        for prefix in ["", "hookwarden_", "HOOKWARDEN", "_X_", "X-Y_"] {
            let config = SecretsConfig { env_prefix: prefix.into(), ..SecretsConfig::default() };
            assert!(config.validate().unwrap_err().contains("secrets.envPrefix"), "{prefix}");
        }
        let relative = SecretsConfig { file_root: Some(PathBuf::from("secrets")), ..SecretsConfig::default() };
        assert!(relative.validate().unwrap_err().contains("secrets.fileRoot"));
    }
}
