//! Registry commands: `pull`, `push`, `login`, `logout`; and the resolver
//! that lets `kiln build --pull` fetch missing base images.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use clap::Args;
use kiln_cache::registry::{
    self, ClientOptions, Credentials, DockerConfig, ImageRef, Platform, PullEvent, PullOptions,
    PushEvent, PushOptions, RegistryClient,
};
use kiln_cache::{Reference, Store, StoreError};

use super::Global;

/// `kiln pull`.
#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// Pick this platform from a multi-platform image (`os/arch[/variant]`;
    /// default: this machine's).
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<String>,
    /// Verify the registry's TLS certificate (`false`: also allow plain http).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    tls_verify: bool,
    /// Print only the image name.
    #[arg(short, long)]
    quiet: bool,
    /// The image: `[host[:port]/]name[:tag|@digest]`.
    #[arg(value_name = "NAME[:TAG|@DIGEST]")]
    image: String,
}

/// `kiln push`.
#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    /// Verify the registry's TLS certificate (`false`: also allow plain http).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    tls_verify: bool,
    /// Print only the manifest digest.
    #[arg(short, long)]
    quiet: bool,
    /// The image, named as it should be in the registry (`kiln tag` it first).
    #[arg(value_name = "NAME[:TAG]")]
    image: String,
}

/// `kiln login`.
#[derive(Debug, Args)]
pub(crate) struct LoginArgs {
    /// User name.
    #[arg(short, long)]
    username: Option<String>,
    /// Password (prefer `--password-stdin`).
    #[arg(short, long, conflicts_with = "password_stdin")]
    password: Option<String>,
    /// Read the password from standard input.
    #[arg(long)]
    password_stdin: bool,
    /// Verify the registry's TLS certificate (`false`: also allow plain http).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    tls_verify: bool,
    /// The registry (default: Docker Hub).
    #[arg(value_name = "SERVER")]
    server: Option<String>,
}

/// `kiln logout`.
#[derive(Debug, Args)]
pub(crate) struct LogoutArgs {
    /// The registry (default: Docker Hub).
    #[arg(value_name = "SERVER")]
    server: Option<String>,
}

fn client_options(tls_verify: bool) -> ClientOptions {
    ClientOptions {
        insecure: !tls_verify,
        ..ClientOptions::default()
    }
}

/// Pulls `image` into `store`, printing docker-style progress lines on
/// stdout unless `quiet`.
pub(crate) fn pull_image(
    store: &Store,
    image: &ImageRef,
    platform: Option<Platform>,
    tls_verify: bool,
    quiet: bool,
) -> anyhow::Result<registry::PulledImage> {
    let client = RegistryClient::new(image, client_options(tls_verify))?;
    if !quiet {
        println!(
            "{}: Pulling from {}",
            image.reference().trim_start_matches("sha256:"),
            image.repository()
        );
    }
    let out = Mutex::new(std::io::stdout());
    let progress = |e: PullEvent| {
        if quiet {
            return;
        }
        let line = match &e {
            PullEvent::LayerExists { digest } => format!("{}: Already exists", digest.short()),
            PullEvent::LayerStarted { .. } | PullEvent::Resolved { .. } => return,
            PullEvent::LayerDone { digest } => format!("{}: Pull complete", digest.short()),
        };
        if let Ok(mut o) = out.lock() {
            let _ = writeln!(o, "{line}");
        }
    };
    let opts = PullOptions {
        platform,
        ..PullOptions::default()
    };
    let pulled = registry::pull(store, &client, image, &opts, &progress)?;
    if !quiet {
        println!("Digest: {}", pulled.digest);
        let shown = pulled
            .name
            .as_ref()
            .map_or_else(|| image.to_string(), Reference::short);
        if pulled.up_to_date {
            println!("Status: Image is up to date for {shown}");
        } else {
            println!("Status: Downloaded newer image for {shown}");
        }
    }
    Ok(pulled)
}

/// `kiln pull`.
pub(crate) fn pull(args: &PullArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let image = ImageRef::parse(&args.image)?;
    let platform = args.platform.as_deref().map(Platform::parse).transpose()?;
    if !args.quiet && image.digest().is_none() && !typed_tag(&args.image) {
        println!("Using default tag: latest");
    }
    let pulled = pull_image(&store, &image, platform, args.tls_verify, args.quiet)?;
    match &pulled.name {
        Some(n) => println!("{n}"),
        None => println!("{image}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn typed_tag(text: &str) -> bool {
    let name = text.split('@').next().unwrap_or(text);
    let last = name.rsplit('/').next().unwrap_or(name);
    last.contains(':')
}

/// Pushes the store image named `name` to the registry its name says.
pub(crate) fn push_image(
    store: &Store,
    name: &str,
    tls_verify: bool,
    quiet: bool,
) -> anyhow::Result<registry::PushedImage> {
    let target = ImageRef::parse(name)?;
    if target.digest().is_some() {
        bail!("cannot push a digest reference `{name}`: push a tag");
    }
    let store_name = target
        .store_reference()
        .with_context(|| format!("`{name}` has no tag"))?;
    let image = store
        .resolve(&store_name.to_string())
        .map_err(|e| match e {
            StoreError::NoSuchImage { .. } => anyhow::anyhow!(
                "An image does not exist locally with the tag: {}",
                store_name.short_repository()
            ),
            other => other.into(),
        })?;
    let client = RegistryClient::new(&target, client_options(tls_verify))?;
    if !quiet {
        println!(
            "The push refers to repository [{}/{}]",
            target.registry(),
            target.repository()
        );
    }
    let out = Mutex::new(std::io::stdout());
    let progress = |e: PushEvent| {
        if quiet {
            return;
        }
        let line = match &e {
            PushEvent::LayerExists { digest } => {
                format!("{}: Layer already exists", digest.short())
            }
            PushEvent::LayerMounted { digest, from } => {
                format!("{}: Mounted from {from}", digest.short())
            }
            PushEvent::LayerStarted { .. } => return,
            PushEvent::LayerDone { digest } => format!("{}: Pushed", digest.short()),
        };
        if let Ok(mut o) = out.lock() {
            let _ = writeln!(o, "{line}");
        }
    };
    let opts = PushOptions {
        mount_from: mount_candidates(store, &image, &target),
        ..PushOptions::default()
    };
    let pushed = registry::push(store, &client, &image, &target, &opts, &progress)?;
    if !quiet {
        println!(
            "{}: digest: {} size: {}",
            target.reference(),
            pushed.digest,
            pushed.size
        );
    }
    Ok(pushed)
}

/// Repositories of the same registry that other images sharing a layer
/// with `image` are named in: the registry probably has those layers
/// there, and mounting is cheaper than uploading (docker does the same
/// from what it remembers of earlier pushes and pulls).
fn mount_candidates(store: &Store, image: &kiln_cache::Image, target: &ImageRef) -> Vec<String> {
    let layers: std::collections::HashSet<_> = image.layers.iter().map(|l| &l.diff_id).collect();
    let mut repos = Vec::new();
    let Ok(all) = store.list_images() else {
        return repos;
    };
    for summary in all {
        let names: Vec<ImageRef> = summary
            .names
            .iter()
            .map(ImageRef::from_store_reference)
            .filter(|r| r.registry() == target.registry() && r.repository() != target.repository())
            .collect();
        if names.is_empty() {
            continue;
        }
        let Ok(other) = store.resolve(&summary.id.to_string()) else {
            continue;
        };
        if !other.layers.iter().any(|l| layers.contains(&l.diff_id)) {
            continue;
        }
        for n in names {
            if !repos.iter().any(|r| r == n.repository()) {
                repos.push(n.repository().to_owned());
            }
        }
        if repos.len() >= 3 {
            break;
        }
    }
    repos.truncate(3);
    repos
}

/// `kiln push`.
pub(crate) fn push(args: &PushArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let pushed = push_image(&store, &args.image, args.tls_verify, args.quiet)?;
    if args.quiet {
        println!("{}", pushed.digest);
    }
    Ok(ExitCode::SUCCESS)
}

fn server_name(server: Option<&str>) -> String {
    server.map_or_else(
        || registry::DOCKER_HUB.to_owned(),
        registry::normalize_registry,
    )
}

/// `kiln login`.
pub(crate) fn login(args: &LoginArgs) -> anyhow::Result<ExitCode> {
    let server = server_name(args.server.as_deref());
    let mut config = DockerConfig::load_default()?;
    let username = match &args.username {
        Some(u) => u.clone(),
        None if args.password_stdin => bail!("Must provide --username with --password-stdin"),
        None => match config.credentials(&server)? {
            Some(c) if args.password.is_none() => {
                // docker reuses saved credentials when none are given.
                check(&server, &c, args.tls_verify)?;
                println!("Login Succeeded");
                return Ok(ExitCode::SUCCESS);
            }
            _ => prompt("Username: ", true)?,
        },
    };
    let password = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    } else if let Some(p) = &args.password {
        eprintln!("WARNING! Using --password via the CLI is insecure. Use --password-stdin.");
        p.clone()
    } else {
        prompt("Password: ", false)?
    };
    if username.is_empty() {
        bail!("Error: Non-null Username Required");
    }
    if password.is_empty() {
        bail!("Error: Password Required");
    }
    let creds = Credentials { username, password };
    check(&server, &creds, args.tls_verify)?;
    config.set_credentials(&server, &creds);
    config.save()?;
    println!("Login Succeeded");
    Ok(ExitCode::SUCCESS)
}

fn check(server: &str, creds: &Credentials, tls_verify: bool) -> anyhow::Result<()> {
    // Any repository will do: the client only pings the registry and, for
    // a token registry, asks for a token with no scope.
    let image = ImageRef::parse(&format!("{server}/library/kiln-login"))?;
    let client = RegistryClient::new(
        &image,
        ClientOptions {
            credentials: Some(creds.clone()),
            ..client_options(tls_verify)
        },
    )?;
    client
        .check_login()
        .with_context(|| format!("login to `{server}` failed"))?;
    Ok(())
}

fn prompt(label: &str, echo: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("Cannot perform an interactive login from a non TTY device");
    }
    eprint!("{label}");
    let _ = std::io::stderr().flush();
    let saved = if echo {
        None
    } else {
        nix::sys::termios::tcgetattr(&stdin).ok().inspect(|t| {
            let mut quiet = t.clone();
            quiet
                .local_flags
                .remove(nix::sys::termios::LocalFlags::ECHO);
            let _ =
                nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &quiet);
        })
    };
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &t);
        eprintln!();
    }
    r.context("reading from the terminal")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// `kiln logout`.
pub(crate) fn logout(args: &LogoutArgs) -> anyhow::Result<ExitCode> {
    let server = server_name(args.server.as_deref());
    let mut config = DockerConfig::load_default()?;
    if config.remove_credentials(&server) {
        println!("Removing login credentials for {server}");
        config.save()?;
    } else {
        println!("Not logged in to {server}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln build --pull`: where base images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PullPolicy {
    /// Only the store.
    Never,
    /// The store, else the registry.
    Missing,
    /// The registry, every time.
    Always,
}

/// A planner resolver that pulls base images (per the policy) before
/// looking them up in the store, so the build finds them there.
#[derive(Debug)]
pub(crate) struct PullingResolver {
    store: Arc<Store>,
    inner: kiln_solver::runner::StoreResolver,
    policy: PullPolicy,
    pulled: Mutex<Vec<String>>,
    /// What each reference resolved to (stages often share a base).
    found: Mutex<std::collections::HashMap<String, kiln_solver::plan::ImageInfo>>,
}

impl PullingResolver {
    pub(crate) fn new(store: Arc<Store>, policy: PullPolicy) -> Self {
        PullingResolver {
            inner: kiln_solver::runner::StoreResolver::new(Arc::clone(&store)),
            store,
            policy,
            pulled: Mutex::new(Vec::new()),
            found: Mutex::default(),
        }
    }
}

impl kiln_solver::plan::ImageResolver for PullingResolver {
    fn resolve(
        &self,
        reference: &str,
        platform: &kiln_solver::graph::Platform,
    ) -> Result<kiln_solver::plan::ImageInfo, kiln_solver::plan::ResolveError> {
        let key = format!("{reference}\0{platform:?}");
        if let Ok(found) = self.found.lock()
            && let Some(info) = found.get(&key)
        {
            return Ok(info.clone());
        }
        let info = self.resolve_once(reference, platform)?;
        if let Ok(mut found) = self.found.lock() {
            found.insert(key, info.clone());
        }
        Ok(info)
    }
}

impl PullingResolver {
    fn resolve_once(
        &self,
        reference: &str,
        platform: &kiln_solver::graph::Platform,
    ) -> Result<kiln_solver::plan::ImageInfo, kiln_solver::plan::ResolveError> {
        use kiln_solver::plan::ImageResolver as _;
        let local = || self.inner.resolve(reference, platform);
        // The platform of the image of that name in the store, when it is
        // not the one asked for.
        let mut other = None;
        let want_pull = match self.policy {
            PullPolicy::Never => false,
            PullPolicy::Always => true,
            PullPolicy::Missing => match self.store.resolve(reference) {
                Ok(image) => match kiln_solver::runner::other_platform(&image, platform) {
                    // Here, for that platform: this is the image (one
                    // lookup, not two).
                    None => return Ok(kiln_solver::runner::StoreResolver::info(&image)),
                    // Here for another platform: pulled for this one, as
                    // BuildKit resolves a base image by platform.
                    Some(o) => {
                        other = Some(o);
                        true
                    }
                },
                Err(StoreError::NoSuchImage { .. }) => true,
                Err(e) => return Err(Box::new(e)),
            },
        };
        // An image id (`sha256:...` or a hex prefix) is never pulled.
        let is_id = reference.starts_with("sha256:");
        let done = self
            .pulled
            .lock()
            .map(|p| p.iter().any(|r| r == reference))
            .unwrap_or(false);
        if want_pull && !is_id && !done {
            let image = ImageRef::parse(reference)?;
            let p = Platform {
                os: platform.os.clone(),
                architecture: platform.architecture.clone(),
                variant: (!platform.variant.is_empty()).then(|| platform.variant.clone()),
            };
            eprintln!("pulling base image {image}");
            let why = other.map_or_else(String::new, |o| {
                format!(" for {platform} (the store's is for {o})")
            });
            pull_image(&self.store, &image, Some(p), true, true)
                .map_err(|e| format!("pulling base image `{reference}`{why}: {e:#}"))?;
            if let Ok(mut pulled) = self.pulled.lock() {
                pulled.push(reference.to_owned());
            }
        }
        local()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::Cli;

    #[test]
    fn parses_docker_style_flags() {
        let ok = |args: &[&str]| {
            let mut all = vec!["kiln"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).is_ok()
        };
        assert!(ok(&["pull", "--platform", "linux/arm64", "busybox"]));
        assert!(ok(&[
            "pull",
            "--platform=linux/arm/v7",
            "-q",
            "localhost:5000/x@sha256:00"
        ]));
        assert!(ok(&["pull", "--tls-verify=false", "h:1/x"]));
        assert!(ok(&["push", "--tls-verify=false", "h:1/x:1"]));
        assert!(ok(&["push", "-q", "h:1/x:1"]));
        assert!(ok(&["login", "-u", "me", "--password-stdin", "h:1"]));
        assert!(ok(&["login", "-u", "me", "-p", "pw", "h:1"]));
        assert!(ok(&["login"]));
        assert!(ok(&["logout", "h:1"]));
        assert!(ok(&["logout"]));
        assert!(
            !ok(&["login", "-p", "pw", "--password-stdin", "h:1"]),
            "conflicting"
        );
        assert!(!ok(&["pull"]), "pull needs an image");
        assert!(!ok(&["push", "--tls-verify=maybe", "x"]));
    }
}
