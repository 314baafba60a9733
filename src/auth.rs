//! Bearer-token authentication and role/namespace authorization.
//!
//! Tokens are HS256 JWTs with the documented claims `sub`, `roles`, `namespaces` and `exp`,
//! so any standard JWT library can mint one. Every route names the role it needs and the
//! namespace it touches; [`Principal::authorize`] checks both. `admin` holds every role.
//!
//! The HS256 key is configured (`HOOKWARDEN_JWT_SECRET`, or `jwtSecret` in the config
//! file) or generated once into the data directory, by `serve` only: a tool that mints
//! tokens reads an existing key ([`existing_key`]) and never invents one, because a token
//! signed with a key no server holds is refused everywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, Config, Secret};

/// The roles a token can carry. Unknown role names in a token are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Ingest,
    Approver,
    Auditor,
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Ingest => "ingest",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Viewer => "viewer",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        [Role::Admin, Role::Operator, Role::Ingest, Role::Approver, Role::Auditor, Role::Viewer]
            .into_iter()
            .find(|r| r.as_str() == name)
    }
}

/// The JWT claims Hookwarden reads and writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Namespaces the token may touch; `"*"` means all of them.
    #[serde(default)]
    pub namespaces: Vec<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub subject: String,
    roles: Vec<Role>,
    namespaces: Vec<String>,
}

/// Why a request may not go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("invalid bearer token: {0}")]
    Invalid(String),
    #[error("the token has expired")]
    Expired,
    #[error("this action needs role `{}`", .0.as_str())]
    MissingRole(Role),
    #[error("the token is not allowed in namespace `{0}`")]
    NamespaceNotAllowed(String),
    #[error("the subject that submitted the event cannot approve or deny it")]
    SelfApproval,
    /// A cluster-scoped resource (a Namespace) needs `admin` over every namespace.
    #[error(
        "a Namespace is cluster-scoped: applying or deleting one needs role `admin` with every namespace (`\"*\"`)"
    )]
    ClusterScope,
}

impl Principal {
    /// Checks that the caller has `role` in `namespace`. `admin` holds every role and
    /// `operator` also holds `viewer` (whoever may change resources may read them).
    pub fn authorize(&self, role: Role, namespace: &str) -> Result<(), AuthError> {
        self.require_role(role)?;
        if !self.may_access(namespace) {
            return Err(AuthError::NamespaceNotAllowed(namespace.to_owned()));
        }
        Ok(())
    }

    /// Checks that the caller may change cluster-scoped resources (a Namespace: a tenant's
    /// limits): role `admin` over every namespace (`"*"`). A token limited to some
    /// namespaces never may, whatever its roles, so no tenant raises its own limits.
    pub fn authorize_cluster(&self) -> Result<(), AuthError> {
        self.require_role(Role::Admin)?;
        if self.namespace_scope().is_some() {
            return Err(AuthError::ClusterScope);
        }
        Ok(())
    }

    /// Checks that the caller has `role` somewhere (for listings filtered per namespace).
    pub fn require_role(&self, role: Role) -> Result<(), AuthError> {
        let holds = |r: Role| r == role || r == Role::Admin || (role == Role::Viewer && r == Role::Operator);
        if self.roles.iter().any(|r| holds(*r)) {
            Ok(())
        } else {
            Err(AuthError::MissingRole(role))
        }
    }

    /// The namespaces the token may touch, for listings across namespaces: `None` when it
    /// may touch every one (`"*"`).
    pub fn namespace_scope(&self) -> Option<&[String]> {
        if self.namespaces.iter().any(|n| n == "*") {
            None
        } else {
            Some(&self.namespaces)
        }
    }

    /// Whether the token's namespaces include `namespace`.
    pub fn may_access(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| n == "*" || n == namespace)
    }
}

/// Verifies and mints tokens with one HS256 key.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenKeys {
    /// Keys for `secret`, accepting tokens up to the default `auth.jwtLeeway` past `exp`.
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = AuthConfig::default().jwt_leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        }
    }

    /// Accepts tokens up to `leeway` (whole seconds) past their `exp`, for clock drift.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.validation.leeway = leeway.as_secs();
        self
    }

    /// Reads `Authorization: Bearer …` and verifies the token.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| AuthError::Invalid("the Authorization header must use the Bearer scheme".into()))?
            .trim();
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("signature does not match".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm must be HS256".into()),
                ErrorKind::MissingRequiredClaim(c) => AuthError::Invalid(format!("missing claim `{c}`")),
                ErrorKind::Json(_) => AuthError::Invalid("claims do not have the documented shape".into()),
                _ => AuthError::Invalid("malformed token".into()),
            }
        })?;
        let claims = data.claims;
        // The subject is stored (who ingested, voted, applied) and the namespaces are
        // compared in queries: a NUL no database text can hold makes the token malformed.
        let nul = |text: &String| text.contains('\0');
        if let Some(claim) = [
            ("sub", nul(&claims.sub)),
            ("roles", claims.roles.iter().any(nul)),
            ("namespaces", claims.namespaces.iter().any(nul)),
        ]
        .into_iter()
        .find_map(|(claim, bad)| bad.then_some(claim))
        {
            return Err(AuthError::Invalid(format!("claim `{claim}` must not contain NUL characters")));
        }
        Ok(Principal {
            subject: claims.sub,
            roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
            namespaces: claims.namespaces,
        })
    }

    /// Mints a token valid for `ttl`.
    pub fn mint(&self, subject: &str, roles: &[Role], namespaces: &[String], ttl: Duration) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: subject.to_owned(),
            roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
            namespaces: namespaces.to_vec(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of serializable claims cannot fail")
    }
}

/// Name of the generated key file inside the data directory.
pub const KEY_FILE: &str = "jwt-secret";

/// The shortest key accepted, from any source.
const MIN_KEY_BYTES: usize = 32;

/// Where the key that signs tokens came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `HOOKWARDEN_JWT_SECRET`.
    Environment,
    /// `jwtSecret` in this config file.
    ConfigFile(PathBuf),
    /// The key file `serve` generated in the data directory.
    KeyFile(PathBuf),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Environment => f.write_str("the environment (HOOKWARDEN_JWT_SECRET)"),
            KeySource::ConfigFile(path) => write!(f, "the config file {} (jwtSecret)", path.display()),
            KeySource::KeyFile(path) => write!(f, "the key file {}", path.display()),
        }
    }
}

/// Why no usable key was found or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no token key: HOOKWARDEN_JWT_SECRET is not set, {config}, and there is no key file at {}. \
         `hookwarden serve` generates that file when it first starts on this data directory; \
         or pass the server's --data-dir, or set HOOKWARDEN_JWT_SECRET to the server's key",
        path.display()
    )]
    NotFound { path: PathBuf, config: String },
    #[error("cannot read the token key file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the token key file {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token key file {} holds fewer than {MIN_KEY_BYTES} bytes; remove it to have `serve` generate a new key, or fix it", path.display())]
    TooShort { path: PathBuf },
}

/// Reads the key file at `path`; `Ok(None)` when there is none.
fn read_key_file(path: &Path) -> Result<Option<Secret>, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().len() < MIN_KEY_BYTES => Err(KeyError::TooShort { path: path.to_owned() }),
        Ok(text) => Ok(Some(Secret::new(text.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::Read { path: path.to_owned(), source }),
    }
}

/// The key to mint tokens with, and its source: the configured secret (from the
/// environment when `from_environment`, else from `config_file`), or the key file in the
/// data directory. **Never creates a key**; only `serve` does ([`load_or_create_key`]).
pub fn existing_key(
    config: &Config,
    from_environment: bool,
    config_file: Option<&Path>,
) -> Result<(Secret, KeySource), KeyError> {
    if let Some(secret) = &config.jwt_secret {
        let source = match config_file {
            Some(file) if !from_environment => KeySource::ConfigFile(file.to_owned()),
            _ => KeySource::Environment,
        };
        return Ok((secret.clone(), source));
    }
    let path = absolute(&config.data_dir.join(KEY_FILE));
    match read_key_file(&path)? {
        Some(secret) => Ok((secret, KeySource::KeyFile(path))),
        None => {
            let config = match config_file {
                Some(file) => format!("the config file {} sets no jwtSecret", file.display()),
                None => "no config file was given (--config)".to_owned(),
            };
            Err(KeyError::NotFound { path, config })
        }
    }
}

/// `path` from the root, so that messages name it wherever the reader stands.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Reads the generated HS256 key from `data_dir`, creating it (mode 0600, the directory
/// 0700) on first use; an existing key file others may read is tightened to 0600.
/// For `serve` only: see [`existing_key`].
pub fn load_or_create_key(data_dir: &Path) -> Result<(Secret, PathBuf), KeyError> {
    use rand::RngCore;
    use std::io::Write;

    let path = data_dir.join(KEY_FILE);
    let create = |source| KeyError::Create { path: path.clone(), source };
    if let Some(secret) = read_key_file(&path)? {
        crate::private_files::tighten(&path).map_err(create)?;
        return Ok((secret, path));
    }
    crate::private_files::create_dir(data_dir).map_err(create)?;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = hex::encode(bytes);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            file.write_all(secret.as_bytes()).map_err(create)?;
            file.sync_all().map_err(create)?;
            Ok((Secret::new(secret), path))
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_key_file(&path)? {
            Some(secret) => Ok((secret, path)),
            None => Err(create(e)),
        },
        Err(e) => Err(create(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(&Secret::new("k".repeat(32)))
    }

    #[test]
    fn a_minted_token_authenticates_with_its_roles_and_namespaces() {
        let keys = keys();
        let token = keys.mint("alice", &[Role::Ingest], &["payments".into()], Duration::from_secs(60));
        let p = keys.authenticate(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(p.subject, "alice");
        assert!(p.authorize(Role::Ingest, "payments").is_ok());
        assert_eq!(p.authorize(Role::Ingest, "other"), Err(AuthError::NamespaceNotAllowed("other".into())));
        assert_eq!(p.authorize(Role::Operator, "payments"), Err(AuthError::MissingRole(Role::Operator)));
    }

    #[test]
    fn admin_holds_every_role_and_star_every_namespace() {
        let keys = keys();
        let token = keys.mint("root", &[Role::Admin], &["*".into()], Duration::from_secs(60));
        let p = keys.authenticate(Some(&format!("Bearer {token}"))).unwrap();
        assert!(p.authorize(Role::Approver, "anything").is_ok());
    }

    #[test]
    fn tokens_signed_with_another_key_or_expired_are_refused() {
        let other = TokenKeys::new(&Secret::new("o".repeat(32)));
        let token = other.mint("mallory", &[Role::Admin], &["*".into()], Duration::from_secs(60));
        assert!(matches!(keys().authenticate(Some(&format!("Bearer {token}"))), Err(AuthError::Invalid(_))));

        let keys = keys();
        let claims = Claims { sub: "old".into(), roles: vec![], namespaces: vec![], exp: 1_000, iat: None };
        let expired = jsonwebtoken::encode(&Header::default(), &claims, &keys.encoding).unwrap();
        assert_eq!(keys.authenticate(Some(&format!("Bearer {expired}"))).unwrap_err(), AuthError::Expired);
        assert_eq!(keys.authenticate(None).unwrap_err(), AuthError::Missing);
    }

    #[test]
    fn a_claim_holding_a_nul_character_makes_the_token_invalid() {
        let keys = keys();
        for (sub, namespaces) in [("a\0b", vec!["payments".to_owned()]), ("alice", vec!["pay\0ments".to_owned()])] {
            let token = keys.mint(sub, &[Role::Admin], &namespaces, Duration::from_secs(60));
            let err = keys.authenticate(Some(&format!("Bearer {token}"))).unwrap_err();
            assert!(matches!(&err, AuthError::Invalid(m) if m.contains("must not contain NUL")), "{err:?}");
        }
    }

    #[test]
    fn the_leeway_decides_how_long_after_exp_a_token_still_works() {
        let secret = Secret::new("k".repeat(32));
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims { sub: "late".into(), roles: vec![], namespaces: vec![], exp: now - 60, iat: None };
        let late = format!("Bearer {}", jsonwebtoken::encode(&Header::default(), &claims, &keys().encoding).unwrap());
        assert_eq!(TokenKeys::new(&secret).authenticate(Some(&late)).unwrap_err(), AuthError::Expired);
        let lenient = TokenKeys::new(&secret).with_leeway(Duration::from_secs(120));
        assert_eq!(lenient.authenticate(Some(&late)).unwrap().subject, "late");
    }

    #[test]
    fn existing_key_never_creates_one_and_names_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().join("data"), ..Config::default() };
        let err = existing_key(&config, false, None).unwrap_err();
        assert!(err.to_string().contains(&dir.path().join("data").join(KEY_FILE).display().to_string()), "{err}");
        assert!(!dir.path().join("data").exists(), "nothing was created");

        let (generated, path) = load_or_create_key(&config.data_dir).unwrap();
        let (found, source) = existing_key(&config, false, None).unwrap();
        assert_eq!((found, source), (generated, KeySource::KeyFile(path)));

        let configured = Config { jwt_secret: Some(Secret::new("c".repeat(32))), ..config };
        let file = dir.path().join("hookwarden.yaml");
        assert_eq!(existing_key(&configured, false, Some(&file)).unwrap().1, KeySource::ConfigFile(file.clone()));
        assert_eq!(existing_key(&configured, true, Some(&file)).unwrap().1, KeySource::Environment);
    }

    #[test]
    fn a_key_file_too_short_to_be_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "short\n").unwrap();
        assert!(matches!(load_or_create_key(dir.path()), Err(KeyError::TooShort { .. })));
    }

    #[test]
    fn the_generated_key_is_created_once_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, path) = load_or_create_key(dir.path()).unwrap();
        let (second, _) = load_or_create_key(dir.path()).unwrap();
        assert_eq!(first, second);
        assert!(path.exists());
    }
}
