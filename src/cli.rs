//! The command line: `run` (the default), `ca init|show|install|uninstall`, `config check`,
//! `cache stats|ls|rm|gc|verify|prefetch`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, LogFormat, Settings};
use crate::log_writer::LogWriter;

/// A caching, intercepting HTTPS proxy for every container registry.
#[derive(Debug, Parser)]
#[command(name = "regproxy", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

/// Options every command takes: the config file and every setting as a flag.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// TOML config file (keys as in config/regproxy.toml)
    #[arg(global = true, long, env = "REGPROXY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy (the default)
    Run,
    /// Manage the CA that signs intercepted hosts' certificates
    #[command(subcommand)]
    Ca(CaCommand),
    /// Inspect the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show a registry's pull rate limit (a manifest HEAD, not counted by Docker Hub); exit 0, 1
    /// (warn), 2 (critical) or 3 (unknown), for monitoring checks
    Ratelimit {
        /// Registry host
        #[arg(value_name = "REGISTRY", default_value = "docker.io")]
        registry: String,
        /// Image to ask about, REPO:TAG [default: ratelimitpreview/test:latest on Docker Hub]
        #[arg(long, value_name = "REPO:TAG")]
        image: Option<String>,
        /// Exit 1 when remaining pulls are at or below this
        #[arg(long, value_name = "N")]
        warn: Option<u64>,
        /// Exit 2 when remaining pulls are at or below this
        #[arg(long, value_name = "N")]
        critical: Option<u64>,
    },
    /// Print (or write) containerd hosts.toml files that use regproxy as a mirror
    ContainerdConfig {
        /// The mirror's URL as containerd reaches it [default: from --mirror-listen or --listen]
        #[arg(long, value_name = "URL")]
        mirror_url: Option<String>,
        /// Write DIR/HOST/hosts.toml for each registry (DIR is containerd's config_path, e.g.
        /// /etc/containerd/certs.d) instead of printing them
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
        /// Registries to write files for [default: docker.io and those in the cache]
        #[arg(value_name = "REGISTRY")]
        registries: Vec<String>,
    },
    /// Inspect and maintain the cache (safe while the proxy runs)
    #[command(subcommand)]
    Cache(CacheCommand),
    /// The object store a fleet shares (--shared-store)
    #[command(subcommand)]
    SharedStore(SharedStoreCommand),
}

#[derive(Debug, Subcommand)]
enum SharedStoreCommand {
    /// Print the bucket lifecycle rules to apply: objects expire by age, abandoned multipart
    /// uploads after a day (JSON for `aws s3api put-bucket-lifecycle-configuration`)
    Lifecycle {
        /// Days after which an object expires (nodes upload again what they still pull)
        #[arg(long, value_name = "DAYS", default_value_t = 30)]
        expire_days: u32,
        /// S3's XML instead of the AWS CLI's JSON (for tools that send it as it is)
        #[arg(long)]
        xml: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Entries, bytes, and the hit ratio since start when the proxy is running
    Stats,
    /// Every object: digest, size, media type, last access, and the tags that reference it
    Ls,
    /// Remove an object by digest, or an image (HOST/REPO:TAG) with what only it references
    Rm {
        /// sha256:… or HOST/REPO:TAG as `cache ls` shows it
        target: String,
    },
    /// Evict to the configured bounds, drop orphaned files, compact the index
    Gc,
    /// Re-hash every object; remove and report corrupt ones (exit status 1 if any)
    Verify,
    /// Pull images into the cache (through the same code that serves clients)
    Prefetch {
        /// Platform to fetch from a multi-platform image, os/arch[/variant] [default: this machine's]
        #[arg(long, value_name = "PLATFORM", conflicts_with = "all_platforms")]
        platform: Option<String>,
        /// Fetch every platform of a multi-platform image
        #[arg(long)]
        all_platforms: bool,
        /// Images: [HOST[:PORT]/]REPO[:TAG|@DIGEST]
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Generate the CA in --ca-dir unless one is there
    Init,
    /// Print the CA's path, subject, SHA-256 fingerprint and expiry
    Show,
    /// Add the CA to the system trust store (Debian/Ubuntu, RHEL/Fedora, Alpine)
    Install(TrustArgs),
    /// Remove the CA from the system trust store
    Uninstall(TrustArgs),
}

#[derive(Debug, Args)]
struct TrustArgs {
    /// Treat DIR as the file system root (for tests and image builds)
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    root: PathBuf,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config and print the effective settings (secrets masked)
    Check,
}

impl Common {
    /// Loads the file (if any) and layers flags and environment over it.
    pub fn config(&self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        Ok(self.settings.clone().resolve(file)?)
    }
}

/// Parses the command line, runs the chosen command and reports its failure the way that
/// command's users read it.
pub fn main() -> ExitCode {
    let cli = parse();
    let command = cli.command.unwrap_or(Command::Run);
    let failure = Failure::of(&command);
    match dispatch(command, &cli.common) {
        Ok(code) => code,
        Err(e) => failure.report(&e),
    }
}

/// Clap's parse, except that a monitoring check (`ratelimit`) whose arguments are wrong exits 3
/// (UNKNOWN), not clap's 2 (CRITICAL to a monitoring system).
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && std::env::args().any(|a| a == "ratelimit") => {
            let _ = e.print();
            std::process::exit(i32::from(UNKNOWN));
        }
        Err(e) => e.exit(),
    }
}

/// The exit status of `ratelimit` when it cannot tell.
const UNKNOWN: u8 = 3;

/// How a command's failure is shown.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// `run`: a start-up refusal.
    Start,
    /// `config check`: what `run` would refuse, with the same cause.
    Check,
    /// `ratelimit`: a monitoring check, UNKNOWN on any error.
    Monitoring,
    /// Everything else.
    Plain,
}

impl Failure {
    fn of(command: &Command) -> Failure {
        match command {
            Command::Run => Failure::Start,
            Command::Config(ConfigCommand::Check) => Failure::Check,
            Command::Ratelimit { .. } => Failure::Monitoring,
            _ => Failure::Plain,
        }
    }

    /// Prints `e` with its causes on one line, and the exit status to return.
    fn report(self, e: &anyhow::Error) -> ExitCode {
        // `a: b: c`, leaving out causes that a message already names.
        let e = crate::upstream::error_chain(e.as_ref());
        match self {
            Failure::Start => eprintln!("regproxy could not start: {e}"),
            Failure::Check => eprintln!("regproxy would not start: {e}"),
            Failure::Monitoring => {
                println!("UNKNOWN: {e}");
                return ExitCode::from(UNKNOWN);
            }
            Failure::Plain => eprintln!("error: {e}"),
        }
        ExitCode::FAILURE
    }
}

fn dispatch(command: Command, common: &Common) -> anyhow::Result<ExitCode> {
    let config = common.config()?;
    match command {
        Command::Run => run(config),
        Command::Ca(CaCommand::Init) => ca_init(&config),
        Command::Ca(CaCommand::Show) => ca_show(&config),
        Command::Ca(CaCommand::Install(t)) => ca_trust(&config, &t.root, true),
        Command::Ca(CaCommand::Uninstall(t)) => ca_trust(&config, &t.root, false),
        Command::Cache(c) => crate::cli_cache::run(&config, c.into()),
        Command::Ratelimit {
            registry,
            image,
            warn,
            critical,
        } => return ratelimit(config, &registry, image, warn, critical),
        Command::ContainerdConfig {
            mirror_url,
            write,
            registries,
        } => {
            let files = crate::cli_cache::containerd_config(&config, mirror_url, registries)?;
            match write {
                Some(dir) => crate::cli_cache::write_hosts(&dir, &files),
                None => crate::cli_cache::print_hosts(&files),
            }
        }
        Command::SharedStore(SharedStoreCommand::Lifecycle { expire_days, xml }) => {
            let url = config
                .shared_store
                .as_ref()
                .context("no shared store is configured (--shared-store s3://BUCKET[/PREFIX])")?;
            print!("{}", crate::cache::shared::lifecycle(url, expire_days, xml));
            Ok(())
        }
        Command::Config(ConfigCommand::Check) => {
            print!("{}", config.to_toml());
            Ok(crate::check(&config)?)
        }
    }?;
    Ok(ExitCode::SUCCESS)
}

fn run(config: Config) -> anyhow::Result<()> {
    let log = init_logging(config.log_format);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let listener = crate::listener::bind(config.listen)
            .with_context(|| format!("cannot listen on {} (listen)", config.listen))?;
        Ok(crate::run(listener, config, shutdown_signal()).await?)
    });
    log.flush();
    result
}

fn ca_init(config: &Config) -> anyhow::Result<()> {
    let (crt, _) = crate::ca::ca_paths(&config.ca_dir);
    if crt.exists() {
        println!("CA already present; nothing generated");
    } else {
        crate::ca::create(&config.ca_dir)
            .with_context(|| format!("cannot create a CA in {}", config.ca_dir.display()))?;
        println!("generated a new CA");
    }
    ca_show(config)
}

fn ca_show(config: &Config) -> anyhow::Result<()> {
    let (crt, key) = crate::ca::ca_paths(&config.ca_dir);
    let info =
        crate::ca::describe(&crt).context("no usable CA; create one with `regproxy ca init`")?;
    println!("certificate: {}", crt.display());
    println!("key:         {}", key.display());
    println!("subject:     {}", info.subject);
    println!("sha256:      {}", info.sha256);
    println!("expires:     {}", info.not_after);
    Ok(())
}

fn ca_trust(config: &Config, root: &std::path::Path, install: bool) -> anyhow::Result<()> {
    let store = crate::trust::detect(root)?;
    let done = if install {
        let (crt, _) = crate::ca::ca_paths(&config.ca_dir);
        crate::ca::describe(&crt).context("no usable CA; create one with `regproxy ca init`")?;
        store.install(&crt)?
    } else {
        store.uninstall()?
    };
    for line in done {
        println!("{line}");
    }
    Ok(())
}

impl From<CacheCommand> for crate::cli_cache::Action {
    fn from(c: CacheCommand) -> Self {
        use crate::cli_cache::Action;
        match c {
            CacheCommand::Stats => Action::Stats,
            CacheCommand::Ls => Action::Ls,
            CacheCommand::Rm { target } => Action::Rm(target),
            CacheCommand::Gc => Action::Gc,
            CacheCommand::Verify => Action::Verify,
            CacheCommand::Prefetch {
                platform,
                all_platforms,
                images,
            } => Action::Prefetch {
                platforms: match (all_platforms, platform) {
                    (true, _) => crate::prefetch::Platforms::All,
                    (false, Some(p)) => crate::prefetch::Platforms::One(p),
                    (false, None) => crate::prefetch::Platforms::native(),
                },
                images,
            },
        }
    }
}

fn ratelimit(
    config: Config,
    registry: &str,
    image: Option<String>,
    warn: Option<u64>,
    critical: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let host = crate::dockerhub::api_host(registry);
    let image = match image {
        Some(i) => i,
        None if host == crate::dockerhub::API_HOST => crate::ratelimit::DOCKER_HUB_PROBE.to_owned(),
        None => anyhow::bail!("name an image on {registry} with --image REPO:TAG"),
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // The upstream client alone: no CA to create, no cache to open, for one request.
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    let (client, _) = crate::upstream_client(&config, config.listen, metrics)?;
    let report = runtime
        .block_on(crate::ratelimit::check(&client, host, &image))
        .map_err(anyhow::Error::msg)
        .with_context(|| registry.to_owned())?;
    let code = crate::ratelimit::status(&report, warn, critical);
    let word = ["OK", "WARNING", "CRITICAL", "UNKNOWN"][usize::from(code)];
    match report.limit {
        Some(rl) => {
            let window = rl.window.map_or("unknown".into(), |w| format!("{w}s"));
            println!(
                "{word}: {registry}: {} of {} pulls left (window {window})",
                rl.remaining, rl.limit
            );
        }
        None => println!("{word}: {registry} sent no rate-limit headers"),
    }
    if let Some(source) = report.source {
        println!("source: {source}");
    }
    Ok(ExitCode::from(code))
}

/// Installs the log subscriber; the writer it returns holds lines back briefly (see
/// `log_writer`) and must be flushed before the process exits.
fn init_logging(format: LogFormat) -> LogWriter {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REGPROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = LogWriter::start();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => {
            builder.init();
            if !ansi {
                writer.take_access_lines();
            }
        }
    }
    writer
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
