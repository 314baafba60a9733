//! The `hookwarden` command line.
#![forbid(unsafe_code)]

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hookwarden::auth::{Role, TokenKeys};
use hookwarden::config::{Config, LogFormat, Overrides};
use hookwarden::server::Server;
use hookwarden::{errln, outln};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "hookwarden", version, about = "Declarative webhook control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (embedded SQLite unless DATABASE_URL is set).
    Serve(ServeArgs),
    /// Mint a bearer token with the configured key, or the one `serve` generated; prints
    /// only the token (the key's source goes to standard error).
    Token(TokenArgs),
    /// Apply resource files: created, configured, unchanged or pruned per resource.
    Apply(cli::ApplyArgs),
    /// Show what an apply would change. Exit 0: nothing; 1: differences; 2: error.
    Diff(cli::DiffArgs),
    /// Check resource files offline (no server): schema, CEL, references within the files.
    Validate(cli::FilesArgs),
    /// Show resources.
    Get(cli::GetArgs),
    /// Delete a resource.
    Delete(cli::DeleteArgs),
    /// Print the JSON Schema of resource files.
    Schema,
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Transform tools.
    #[command(subcommand)]
    Transform(cli::TransformCommand),
    /// Approval requests of held agent actions.
    #[command(subcommand)]
    Approvals(cli::ApprovalsCommand),
    /// Deliveries and their attempts.
    #[command(subcommand)]
    Deliveries(cli::DeliveriesCommand),
    /// Endpoints' health, and enabling a disabled one.
    #[command(subcommand)]
    Endpoints(cli::EndpointsCommand),
    /// Ingested events.
    #[command(subcommand)]
    Events(cli::EventsCommand),
    /// The audit chain: export and verify.
    #[command(subcommand)]
    Audit(cli::AuditCommand),
    /// Measure the service: see docs/PERFORMANCE.md.
    #[command(subcommand)]
    Bench(hookwarden::bench::BenchCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run the test cases (tests.yaml) of every policy folder under DIR.
    Test { dir: PathBuf },
}

/// Settings shared by every command that reads the service's configuration.
#[derive(Args)]
struct ConfigArgs {
    /// YAML config file; environment and flags override it.
    #[arg(long, env = "HOOKWARDEN_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the embedded database and the generated token key.
    #[arg(long, env = "HOOKWARDEN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// postgres://… or sqlite:…; unset means the embedded SQLite file.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// Address to listen on.
    #[arg(long, env = "HOOKWARDEN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "HOOKWARDEN_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Largest accepted request body in bytes.
    #[arg(long, env = "HOOKWARDEN_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// A directory of resource files to keep applied (watched; the leader applies it).
    #[arg(long, env = "HOOKWARDEN_RESOURCES")]
    resources: Option<PathBuf>,
    /// The apply set of the resources directory.
    #[arg(long, env = "HOOKWARDEN_APPLYSET")]
    applyset: Option<String>,
    /// Accept endpoint URLs on loopback and private addresses.
    #[arg(long, env = "HOOKWARDEN_ALLOW_PRIVATE_URLS")]
    allow_private_urls: Option<bool>,
    /// How long after `exp` a token is still accepted (whole seconds, at most 5m).
    #[arg(long, env = "HOOKWARDEN_JWT_LEEWAY", value_parser = hookwarden::duration::parse)]
    jwt_leeway: Option<Duration>,
    /// Directory of one subdirectory per namespace holding its `valueFrom: {file}` secrets.
    #[arg(long, env = "HOOKWARDEN_SECRETS_FILE_ROOT")]
    secrets_file_root: Option<PathBuf>,
    /// Start of the variables a namespace may name in `valueFrom: {env}` (then NAMESPACE__).
    #[arg(long, env = "HOOKWARDEN_SECRETS_ENV_PREFIX")]
    secrets_env_prefix: Option<String>,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    common: ConfigArgs,
    /// The token's subject (who it is for).
    #[arg(long)]
    sub: String,
    /// Roles; repeat for several.
    #[arg(long = "role", value_enum, required = true)]
    roles: Vec<Role>,
    /// Namespaces the token may touch; repeat for several; default all ("*").
    #[arg(long = "namespace", short = 'n')]
    namespaces: Vec<String>,
    /// How long the token is valid, e.g. 30m, 12h, 30d.
    #[arg(long, default_value = "1h", value_parser = hookwarden::duration::parse)]
    ttl: Duration,
}

fn load_config(common: ConfigArgs, extra: Overrides) -> anyhow::Result<Config> {
    let overrides = Overrides { data_dir: common.data_dir, database_url: common.database_url, ..extra };
    Ok(Config::load(common.config.as_deref(), overrides)?)
}

fn jwt_secret_from_env() -> Option<String> {
    std::env::var("HOOKWARDEN_JWT_SECRET").ok()
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(
        args.common,
        Overrides {
            listen: args.listen,
            log_format: args.log_format,
            max_body_bytes: args.max_body_bytes,
            resources_dir: args.resources,
            applyset: args.applyset,
            allow_private_urls: args.allow_private_urls,
            audit_key: std::env::var("HOOKWARDEN_AUDIT_KEY").ok(),
            jwt_secret: jwt_secret_from_env(),
            jwt_leeway: args.jwt_leeway,
            secrets_file_root: args.secrets_file_root,
            secrets_env_prefix: args.secrets_env_prefix,
            ..Overrides::default()
        },
    )?;
    hookwarden::telemetry::init(config.log_format);
    let server = Server::start(&config).await?;
    if config.jwt_secret.is_none() {
        tracing::info!(
            "mint an admin token with: hookwarden token --sub you --role admin --data-dir {}",
            config.data_dir.display()
        );
    }
    let shutdown = CancellationToken::new();
    // The handlers are installed before the server announces that it listens: a SIGTERM
    // sent right after that line must already mean a graceful stop.
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => {
            tokio::spawn(wait_for_signal(term, int, shutdown.clone()));
        }
        _ => tracing::error!("cannot install signal handlers; stop the server with SIGKILL"),
    }
    server.run(shutdown).await
}

async fn wait_for_signal(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let from_env = jwt_secret_from_env().filter(|v| !v.is_empty());
    let from_environment = from_env.is_some();
    let config_file = args.common.config.clone();
    let config = load_config(args.common, Overrides { jwt_secret: from_env, ..Overrides::default() })?;
    let (secret, source) = hookwarden::auth::existing_key(&config, from_environment, config_file.as_deref())?;
    errln!("signed with the key from {source}");
    let keys = TokenKeys::new(&secret);
    let namespaces = if args.namespaces.is_empty() { vec!["*".to_owned()] } else { args.namespaces };
    outln!("{}", keys.mint(&args.sub, &args.roles, &namespaces, args.ttl))?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help, the version and usage errors; a closed pipe must not make them panic.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            errln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Serve(args) => done(runtime.block_on(serve(args))),
        Command::Token(args) => done(token(args)),
        Command::Apply(args) => runtime.block_on(cli::apply(args)),
        Command::Diff(args) => runtime.block_on(cli::diff(args)),
        Command::Validate(args) => cli::validate_files(args),
        Command::Get(args) => runtime.block_on(cli::get(args)),
        Command::Delete(args) => runtime.block_on(cli::delete(args)),
        Command::Schema => cli::schema(),
        Command::Policy(PolicyCommand::Test { dir }) => cli::policy_test(&dir),
        Command::Transform(command) => cli::transform(command),
        Command::Approvals(command) => runtime.block_on(cli::approvals(command)),
        Command::Deliveries(command) => runtime.block_on(cli::deliveries(command)),
        Command::Endpoints(command) => runtime.block_on(cli::endpoints(command)),
        Command::Events(command) => runtime.block_on(cli::events(command)),
        Command::Audit(command) => runtime.block_on(cli::audit(command)),
        Command::Bench(command) => done(runtime.block_on(hookwarden::bench::run(command))),
    };
    match result {
        Ok(code) => code,
        // The reader went away (`| head`): the command ends quietly, as `cat` would.
        Err(e) if e.chain().any(|c| matches!(c.downcast_ref(), Some(hookwarden::output::OutputError::Closed))) => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
