//! `regproxy cache …`: prints what [`crate::cache::ops`] finds and does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cache::{ops, Store};
use crate::config::Config;

/// One `cache` subcommand.
pub enum Action {
    /// `cache stats`
    Stats,
    /// `cache ls`
    Ls,
    /// `cache rm TARGET`
    Rm(String),
    /// `cache gc`
    Gc,
    /// `cache verify`
    Verify,
    /// `cache prefetch IMAGE…`
    Prefetch {
        /// Which platforms of multi-platform images.
        platforms: crate::prefetch::Platforms,
        /// The images.
        images: Vec<String>,
    },
}

/// Runs `action` on the cache in `config.cache_dir`, which must exist: a command run in the
/// wrong directory (or without the proxy's `--cache-dir`) says so instead of creating a new,
/// empty cache there. `prefetch` may fill an empty directory; the others need a cache in it.
pub fn run(config: &Config, action: Action) -> anyhow::Result<()> {
    let dir = &config.cache_dir;
    if let Action::Prefetch { platforms, images } = action {
        anyhow::ensure!(
            dir.is_dir(),
            "{}; create the directory to start one",
            no_cache(dir)
        );
        return prefetch(config, &platforms, &images);
    }
    anyhow::ensure!(Store::exists(dir), "{}", no_cache(dir));
    let store = Store::open(dir, Arc::default())
        .with_context(|| format!("cannot open the cache in {}", dir.display()))?;
    match action {
        Action::Stats => stats(&store, config.admin_listen),
        Action::Ls => {
            println!(
                "{:<71} {:>12} {:>9} {:<48} TAGS",
                "DIGEST", "SIZE", "ACCESSED", "MEDIA TYPE"
            );
            for l in ops::list(&store) {
                let refs: Vec<&str> = l.refs.iter().map(String::as_str).collect();
                println!(
                    "{:<71} {:>12} {:>8}s {:<48} {}",
                    l.object.digest.to_string(),
                    l.object.size,
                    ops::age(l.object.accessed),
                    l.media_type.as_deref().unwrap_or("-"),
                    if refs.is_empty() {
                        "-".to_string()
                    } else {
                        refs.join(",")
                    }
                );
            }
            Ok(())
        }
        Action::Rm(target) => {
            let removed = ops::remove(&store, &target)?;
            for d in &removed {
                println!("removed {d}");
            }
            println!("{} object(s) removed", removed.len());
            Ok(())
        }
        Action::Gc => {
            let gc = ops::gc(&store, &config.cache_bounds())?;
            println!(
                "evicted {} object(s), {} bytes; removed {} orphaned file(s); index compacted",
                gc.evicted.removed, gc.evicted.freed, gc.orphans
            );
            Ok(())
        }
        Action::Prefetch { .. } => unreachable!("handled above"),
        Action::Verify => {
            let (checked, corrupt) = ops::verify(&store)?;
            for d in &corrupt {
                println!("corrupt, removed: {d}");
            }
            println!("{checked} object(s) checked, {} corrupt", corrupt.len());
            if !corrupt.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn stats(store: &Store, admin: SocketAddr) -> anyhow::Result<()> {
    let objects = store.objects_on_disk();
    let bytes: u64 = objects.iter().map(|o| o.size).sum();
    println!("entries: {}", objects.len());
    println!("bytes:   {bytes}");
    match scrape(admin) {
        Some(metrics) => {
            let count = |outcome: &str| -> u64 {
                metrics
                    .lines()
                    .filter(|l| l.starts_with("regproxy_requests_total{"))
                    .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum()
            };
            let served = count("HIT") + count("REVALIDATED") + count("STALE");
            let fetched = count("MISS") + count("JOINED");
            let ratio = if served + fetched == 0 {
                "n/a (no cacheable requests yet)".to_string()
            } else {
                format!("{:.1}%", 100.0 * served as f64 / (served + fetched) as f64)
            };
            println!(
                "hit ratio since start: {ratio} ({served} from cache, {fetched} from upstream)"
            );
        }
        None => println!("hit ratio: proxy not reachable on {admin} (admin endpoint)"),
    }
    Ok(())
}

/// The running proxy's `/metrics`, if its admin endpoint answers within a few seconds.
fn scrape(admin: SocketAddr) -> Option<String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<Empty<bytes::Bytes>>();
        let uri = format!("http://{admin}/metrics").parse().ok()?;
        let get = async {
            let resp = client.get(uri).await.ok()?;
            if resp.status() != http::StatusCode::OK {
                return None;
            }
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            String::from_utf8(body.to_vec()).ok()
        };
        tokio::time::timeout(Duration::from_secs(3), get)
            .await
            .ok()
            .flatten()
    })
}

/// Pulls each image into the cache, with progress bars on a terminal and plain lines otherwise.
fn prefetch(
    config: &Config,
    platforms: &crate::prefetch::Platforms,
    images: &[String],
) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use parking_lot::Mutex;
    use std::collections::HashMap;

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let shared = crate::Shared::new(config.clone(), config.listen)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{msg:20} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bars: Mutex<HashMap<String, ProgressBar>> = Mutex::default();
    let short = |d: &str| {
        d.trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect::<String>()
    };
    let events = |event: crate::prefetch::Event| {
        use crate::prefetch::Event;
        let mut bars = bars.lock();
        match event {
            Event::Start { digest, size } if tty => {
                let bar = multi.add(ProgressBar::new(size.unwrap_or(0)).with_style(style.clone()));
                bar.set_message(short(&digest));
                bars.insert(digest, bar);
            }
            Event::Bytes { digest, n } => {
                if let Some(bar) = bars.get(&digest) {
                    bar.inc(n);
                }
            }
            Event::Done { digest, outcome } => match bars.remove(&digest) {
                Some(bar) => bar.finish_with_message(format!("{} {outcome}", short(&digest))),
                None => eprintln!("{digest} {outcome}"),
            },
            Event::Start { .. } => {}
        }
    };
    let mut failed = 0;
    for image in images {
        let fetched = runtime.block_on(async {
            let fetched = crate::prefetch::prefetch(&shared, image, platforms, &events).await;
            // Readers finish before the last file is flushed and committed; wait for that.
            shared.cache.flights.settled().await;
            let objects = fetched?;
            let mut missing = 0;
            for object in &objects {
                let stored = match crate::cache::Digest::parse(object) {
                    Ok(d) => shared.cache.hit(&d).await.is_some(),
                    Err(_) => false,
                };
                missing += usize::from(!stored);
            }
            Ok::<_, crate::prefetch::PrefetchError>((objects.len(), missing))
        });
        match fetched {
            Ok((n, 0)) => println!("{image}: {n} object(s) cached"),
            Ok((n, missing)) => {
                eprintln!("{image}: {missing} of {n} object(s) fetched but not stored in the cache (see the log)");
                failed += 1;
            }
            Err(e) => {
                eprintln!("{image}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} image(s) could not be prefetched",
            images.len()
        );
    }
    Ok(())
}

/// "no cache at PATH", with the path as the user can find it and where the setting comes from.
fn no_cache(dir: &Path) -> String {
    let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    format!(
        "no cache at {} (give the proxy's --cache-dir, REGPROXY_CACHE_DIR or --config)",
        shown.display()
    )
}

/// One registry's `hosts.toml` for containerd: its directory name under containerd's
/// `config_path` and the file's text.
pub struct HostsFile {
    /// The registry as containerd names it (`docker.io`, `registry.example:5000`).
    pub registry: String,
    /// The file's text.
    pub text: String,
}

/// `hosts.toml` files sending pulls of each registry to the mirror: those named, else docker.io
/// and the registries in the cache (if there is one).
pub fn containerd_config(
    config: &Config,
    mirror_url: Option<String>,
    mut registries: Vec<String>,
) -> anyhow::Result<Vec<HostsFile>> {
    let url = mirror_url.unwrap_or_else(|| {
        let scheme = if config.mirror_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!(
            "{scheme}://{}",
            config.mirror_listen.unwrap_or(config.listen)
        )
    });
    if registries.is_empty() {
        registries.push(crate::dockerhub::NAME.into());
        if Store::exists(&config.cache_dir) {
            let store = Store::open(&config.cache_dir, Arc::default())?;
            registries.extend(ops::registries(&store));
        }
    }
    let mut files = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for registry in registries {
        // containerd names Docker Hub docker.io; its API host is registry-1.docker.io.
        let (dir, server) = match crate::dockerhub::is_hub(&registry) {
            true => (
                crate::dockerhub::NAME.to_string(),
                crate::dockerhub::API_HOST.to_string(),
            ),
            false => (registry.clone(), registry.clone()),
        };
        anyhow::ensure!(
            !dir.is_empty() && !dir.contains(['/', '\\']) && dir != "." && dir != "..",
            "{registry:?} is not a registry host"
        );
        if !seen.insert(dir.clone()) {
            continue;
        }
        files.push(HostsFile {
            text: format!(
                "server = \"https://{server}\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
            registry: dir,
        });
    }
    Ok(files)
}

/// Prints the files, each after a `# /etc/containerd/certs.d/HOST/hosts.toml` line.
pub fn print_hosts(files: &[HostsFile]) -> anyhow::Result<()> {
    for f in files {
        println!(
            "# /etc/containerd/certs.d/{}/hosts.toml\n{}",
            f.registry, f.text
        );
    }
    Ok(())
}

/// Writes `DIR/HOST/hosts.toml` for each file (replacing what is there) and says which.
pub fn write_hosts(dir: &Path, files: &[HostsFile]) -> anyhow::Result<()> {
    for f in files {
        let host_dir = dir.join(&f.registry);
        std::fs::create_dir_all(&host_dir)
            .with_context(|| format!("cannot create {}", host_dir.display()))?;
        let path = host_dir.join("hosts.toml");
        std::fs::write(&path, &f.text)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
