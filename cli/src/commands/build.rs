//! `kiln build`: Dockerfile + context → an image in the store, and
//! `kiln graph`: the build graph in DOT.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Args;
use kiln_solver::context::{BuildContext, CacheDb, StatCache};
use kiln_solver::event::Progress;
use kiln_solver::export::{ExportOptions, export_image};
use kiln_solver::key::{KeyHistory, compute_keys};
use kiln_solver::plan::{BuildOptions, EmptyImages, plan};
use kiln_solver::runner::{DefaultNetwork, RunnerOptions, SecretSource, StoreRunner};
use kiln_solver::solve::{SolveError, SolveOptions, solve};

use super::{Global, build_memo};
use crate::progress::{ProgressMode, Renderer};

/// `--pull`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Pull {
    /// Only the local store.
    Never,
    /// Pull from the registry when not in the store.
    #[value(alias = "false")]
    Missing,
    /// Always pull from the registry (docker's bare `--pull`).
    #[value(alias = "true")]
    Always,
}

/// `--network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum NetworkArg {
    /// No network.
    None,
    /// The host's network.
    Host,
    /// The default: the host's network (no bridge yet).
    Default,
}

/// `kiln build` flags.
#[derive(Debug, Args)]
pub(crate) struct BuildArgs {
    /// The Dockerfile (default: `CONTEXT/Dockerfile`).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Name the result (repeatable).
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    tags: Vec<String>,
    /// A build argument `K=V` (or `K` to take it from the environment).
    #[arg(long = "build-arg", value_name = "K=V")]
    build_args: Vec<String>,
    /// Build this stage.
    #[arg(long)]
    target: Option<String>,
    /// The platform of the result (`os/arch[/variant]`; default: this
    /// machine's). One at a time.
    #[arg(long, value_name = "PLATFORM", value_parser = parse_platform)]
    platform: Option<kiln_solver::graph::Platform>,
    /// Run every step.
    #[arg(long)]
    no_cache: bool,
    /// Where base images come from (`--pull` alone: always, as docker).
    #[arg(
        long,
        value_enum,
        default_value = "missing",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "always"
    )]
    pull: Pull,
    /// Progress output.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
    /// No progress output: only the image ID (on stdout), warnings and
    /// errors (`--progress=quiet`).
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Accepted and ignored, as docker's BuildKit builder does: the legacy
    /// builder's removal of intermediate containers (kiln leaves none).
    #[arg(long, hide = true, value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    rm: Option<bool>,
    /// Accepted and ignored (see `--rm`).
    #[arg(long = "force-rm", hide = true, value_name = "BOOL", num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    force_rm: Option<bool>,
    /// The network of RUN steps.
    #[arg(long, value_enum, default_value = "default")]
    network: NetworkArg,
    /// A line for the RUNs' `/etc/hosts`: `HOST:IP` (or `HOST=IP`).
    #[arg(long = "add-host", value_name = "HOST:IP", value_parser = parse_add_host)]
    add_host: Vec<String>,
    /// An SSH agent for `RUN --mount=type=ssh`: `default` (the agent at
    /// `$SSH_AUTH_SOCK`), `ID` or `ID=SOCKET`.
    #[arg(long, value_name = "ID[=SOCKET]")]
    ssh: Vec<String>,
    /// A secret: `id=ID,src=FILE` or `id=ID,env=VAR`.
    #[arg(long, value_name = "SPEC")]
    secret: Vec<String>,
    /// An image label `K=V` (repeatable).
    #[arg(long, value_name = "K=V")]
    label: Vec<String>,
    /// Also write the result: `type=oci|docker,dest=FILE`, `type=local,dest=DIR`
    /// or just `DIR` (local).
    #[arg(short = 'o', long, value_name = "SPEC")]
    output: Vec<String>,
    /// Write the image id to this file.
    #[arg(long, value_name = "FILE")]
    iidfile: Option<PathBuf>,
    /// Write build metadata (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    metadata_file: Option<PathBuf>,
    /// Steps at once (default: the number of cores).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Print the build graph in DOT and exit.
    #[arg(long)]
    print_graph: bool,
    /// Export the build cache: `type=local,dest=DIR[,mode=min|max][,tag=T]`
    /// or `type=registry,ref=R[,mode=min|max]` (BuildKit's format).
    #[arg(long = "cache-to", value_name = "SPEC")]
    cache_to: Vec<String>,
    /// Use a build cache: `type=local,src=DIR[,tag=T]` or
    /// `type=registry,ref=R` (repeatable; a missing one is a warning).
    #[arg(long = "cache-from", value_name = "SPEC")]
    cache_from: Vec<String>,
    /// Push every `-t` name to its registry after the build.
    #[arg(long)]
    push: bool,
    /// The build context directory, or `-` for a tar (or a Dockerfile) on stdin.
    context: PathBuf,
}

impl BuildArgs {
    /// `--progress`, or `quiet` with `-q`.
    fn progress_mode(&self) -> ProgressMode {
        if self.quiet {
            ProgressMode::Quiet
        } else {
            self.progress
        }
    }

    /// Whether only the image ID, warnings and errors are printed.
    fn is_quiet(&self) -> bool {
        self.progress_mode() == ProgressMode::Quiet
    }
}

/// `kiln graph` flags.
#[derive(Debug, Args)]
pub(crate) struct GraphArgs {
    /// The Dockerfile (default: `CONTEXT/Dockerfile`).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// A build argument `K=V`.
    #[arg(long = "build-arg", value_name = "K=V")]
    build_args: Vec<String>,
    /// Build this stage.
    #[arg(long)]
    target: Option<String>,
    /// The build context directory.
    context: PathBuf,
}

fn build_options(
    args: &[String],
    target: Option<String>,
    network: Option<NetworkArg>,
) -> BuildOptions {
    let mut build_args = BTreeMap::new();
    for a in args {
        match a.split_once('=') {
            Some((k, v)) => {
                build_args.insert(k.to_owned(), v.to_owned());
            }
            None => {
                if let Ok(v) = std::env::var(a) {
                    build_args.insert(a.clone(), v);
                }
            }
        }
    }
    BuildOptions {
        build_args,
        target,
        network: network.map(|n| match n {
            NetworkArg::None => kiln_parser::Network::None,
            NetworkArg::Host => kiln_parser::Network::Host,
            NetworkArg::Default => kiln_parser::Network::Default,
        }),
        ..BuildOptions::default()
    }
}

fn read_dockerfile(
    file: Option<&Path>,
    context: &Path,
) -> anyhow::Result<(PathBuf, kiln_parser::Dockerfile)> {
    let path = file.map_or_else(|| context.join("Dockerfile"), Path::to_owned);
    match kiln_parser::parse_file(&path) {
        Ok(d) => Ok((path, d)),
        Err(kiln_parser::FileError::Parse(e)) => bail!("{}: {e}", path.display()),
        Err(e) => Err(e.into()),
    }
}

/// Runs `kiln graph`.
pub(crate) fn graph(args: &GraphArgs) -> anyhow::Result<ExitCode> {
    let (_, df) = read_dockerfile(args.file.as_deref(), &args.context)?;
    let g = plan(
        &df,
        &build_options(&args.build_args, args.target.clone(), None),
        &EmptyImages,
    )?;
    std::io::stdout().lock().write_all(g.to_dot().as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn parse_kv_list(spec: &str) -> BTreeMap<String, String> {
    spec.split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn secrets(specs: &[String]) -> anyhow::Result<BTreeMap<String, SecretSource>> {
    let mut out = BTreeMap::new();
    for s in specs {
        let kv = parse_kv_list(s);
        let Some(id) = kv.get("id") else {
            bail!("`--secret {s}` has no `id=`\nhint: `--secret id=NAME,src=FILE`");
        };
        let src = if let Some(f) = kv.get("src").or_else(|| kv.get("source")) {
            SecretSource::File(PathBuf::from(f))
        } else if let Some(v) = kv.get("env") {
            SecretSource::Env(v.clone())
        } else {
            // BuildKit: a bare id is an env var of that name.
            SecretSource::Env(id.clone())
        };
        out.insert(id.clone(), src);
    }
    Ok(out)
}

/// `--ssh default|ID[=SOCKET]`: the agent sockets by id (`default` alone:
/// `$SSH_AUTH_SOCK`, as docker). BuildKit also takes private key files;
/// kiln forwards agents only.
fn ssh_agents(specs: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut out = BTreeMap::new();
    for s in specs {
        let (id, path) = match s.split_once('=') {
            Some((id, path)) => (id.to_owned(), PathBuf::from(path)),
            None => match std::env::var_os("SSH_AUTH_SOCK").filter(|v| !v.is_empty()) {
                Some(sock) => (s.clone(), PathBuf::from(sock)),
                None => bail!(
                    "`--ssh {s}`: SSH_AUTH_SOCK is not set\nhint: start an agent, or give its socket: `--ssh {s}=SOCKET`"
                ),
            },
        };
        if id.is_empty() || path.as_os_str().is_empty() || s.contains(',') {
            bail!("`--ssh {s}`: expected `default`, `ID` or `ID=SOCKET` (one agent socket)");
        }
        let meta = fs_err::metadata(&path).with_context(|| format!("`--ssh {s}`"))?;
        if !meta.file_type().is_socket() {
            bail!(
                "`--ssh {s}`: `{}` is no agent socket (kiln forwards an SSH agent, not key files)",
                path.display()
            );
        }
        out.insert(id, path);
    }
    Ok(out)
}

fn source_date_epoch() -> anyhow::Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => {
            Ok(Some(v.parse::<i64>().with_context(|| {
                format!("SOURCE_DATE_EPOCH=`{v}` is not a number")
            })?))
        }
        _ => Ok(None),
    }
}

/// Where the context and the Dockerfile are, when one of them came on
/// stdin (`kiln build -`, `kiln build -f - DIR`): a scratch directory of
/// the store that goes away with this value.
struct Input {
    context: PathBuf,
    dockerfile: Option<PathBuf>,
    /// The history scope for a context that has no stable path.
    scope: Option<String>,
    scratch: Option<tempfile::TempDir>,
}

impl Input {
    /// The Dockerfile as messages name it: `-` for one read from stdin.
    fn name_of(&self, path: &Path) -> String {
        match &self.scratch {
            Some(s) if path.starts_with(s.path().join("stdin")) => "-".to_owned(),
            Some(s) => path
                .strip_prefix(s.path().join("context"))
                .map_or_else(|_| path.display().to_string(), |p| p.display().to_string()),
            None => path.display().to_string(),
        }
    }

    /// `e` with the scratch paths replaced by what the user gave.
    fn rename(&self, e: anyhow::Error) -> anyhow::Error {
        match &self.scratch {
            Some(s) => {
                let text = format!("{e:#}")
                    .replace(&s.path().join("stdin").display().to_string(), "-")
                    .replace(&format!("{}/", s.path().join("context").display()), "");
                anyhow::anyhow!(text)
            }
            None => e,
        }
    }
}

/// The first bytes of a tar: `ustar` at offset 257 (POSIX and GNU).
fn is_tar(head: &[u8]) -> bool {
    head.get(257..262) == Some(b"ustar".as_slice())
}

/// Read stdin into `dir/stdin`; returns its path.
fn save_stdin(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("stdin");
    let mut f = fs_err::File::create(&path)?;
    std::io::copy(&mut std::io::stdin().lock(), &mut f).context("reading stdin")?;
    Ok(path)
}

/// The input of a build that reads nothing from stdin: the paths as given.
fn path_input(args: &BuildArgs) -> Input {
    Input {
        context: args.context.clone(),
        dockerfile: args.file.clone(),
        scope: None,
        scratch: None,
    }
}

fn stdin_input(args: &BuildArgs, store: &kiln_cache::Store) -> anyhow::Result<Input> {
    if !reads_stdin(args) {
        return Ok(path_input(args));
    }
    let ctx_stdin = args.context.as_os_str() == "-";
    let df_stdin = args.file.as_deref().is_some_and(|f| f.as_os_str() == "-");
    if ctx_stdin && df_stdin {
        bail!("the context and the Dockerfile cannot both come from stdin (`-f -` with `-`)");
    }
    let tmp = store.scratch_parent();
    fs_err::create_dir_all(tmp)?;
    let scratch = tempfile::Builder::new()
        .prefix("stdin-")
        .tempdir_in(tmp)
        .with_context(|| format!("creating a scratch directory under `{}`", tmp.display()))?;
    // Whose it is, so that a killed build's leftovers are swept.
    fs_err::write(
        scratch.path().join(kiln_solver::runner::OWNER_FILE),
        std::process::id().to_string(),
    )?;
    let raw = save_stdin(scratch.path())?;
    if df_stdin {
        return Ok(Input {
            context: args.context.clone(),
            dockerfile: Some(raw),
            scope: Some(format!("-|{}", args.context.display())),
            scratch: Some(scratch),
        });
    }
    let ctx = scratch.path().join("context");
    fs_err::create_dir(&ctx)?;
    let mut head = Vec::with_capacity(512);
    {
        use std::io::Read as _;
        kiln_cache::decompress(fs_err::File::open(&raw)?)
            .context("reading the context from stdin")?
            .take(512)
            .read_to_end(&mut head)
            .context("reading the context from stdin")?;
    }
    let dockerfile = if is_tar(&head) {
        let tar = kiln_cache::decompress(fs_err::File::open(&raw)?)
            .context("reading the context tar from stdin")?;
        kiln_cache::apply_layer(
            tar,
            &ctx,
            &kiln_cache::ApplyOptions::default()
                .with_whiteouts(kiln_cache::layer::WhiteoutMode::Remove),
        )
        .context("unpacking the context tar from stdin")?;
        // `-f` names a file inside the tar.
        args.file
            .as_ref()
            .map(|f| ctx.join(f.strip_prefix("/").unwrap_or(f)))
    } else {
        // A Dockerfile on stdin: the context is empty.
        Some(raw)
    };
    Ok(Input {
        context: ctx,
        dockerfile,
        scope: Some("stdin".to_owned()),
        scratch: Some(scratch),
    })
}

/// Whether the context or the Dockerfile comes on stdin.
fn reads_stdin(args: &BuildArgs) -> bool {
    args.context.as_os_str() == "-" || args.file.as_deref().is_some_and(|f| f.as_os_str() == "-")
}

/// `--add-host HOST:IP` (or `HOST=IP`, as docker splits it): the
/// `/etc/hosts` line `IP\tHOST`.
fn parse_add_host(s: &str) -> Result<String, String> {
    let (host, ip) = s
        .split_once('=')
        .or_else(|| s.split_once(':'))
        .ok_or_else(|| format!("`{s}`: expected HOST:IP"))?;
    if ip == "host-gateway" {
        return Err(format!(
            "`{s}`: host-gateway names the docker daemon's bridge, which kiln's RUNs \
             (on the host's network or none) do not have: give the address"
        ));
    }
    let ip: std::net::IpAddr = ip
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| format!("`{s}`: `{ip}` is no IP address"))?;
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if host.is_empty() || !host.chars().all(name_char) {
        return Err(format!("`{s}`: `{host}` is no host name"));
    }
    Ok(format!("{ip}\t{host}"))
}

/// `--platform`: one `os/arch[/variant]`.
fn parse_platform(s: &str) -> Result<kiln_solver::graph::Platform, String> {
    if s.contains(',') {
        return Err(format!(
            "`{s}`: kiln builds one platform at a time (a build per platform)"
        ));
    }
    kiln_solver::graph::Platform::parse(s)
        .ok_or_else(|| format!("`{s}` is no platform (`os/arch[/variant]`, as `linux/arm64`)"))
}

/// Runs `kiln build`.
pub(crate) fn build(args: &BuildArgs, global: &Global) -> anyhow::Result<ExitCode> {
    // The build memo's key needs no store (none is memoized with stdin): a
    // rebuild the quick memo answers ends before the store is opened.
    let mut opts = build_options(&args.build_args, args.target.clone(), Some(args.network));
    if let Some(p) = &args.platform {
        opts.target_platform = p.clone();
    }
    opts.extra_hosts.clone_from(&args.add_host);
    let epoch = source_date_epoch()?;
    let early_memo = if reads_stdin(args) {
        None
    } else {
        memo_key(args, &path_input(args), &opts, epoch)
    };
    if let Some((key, ctx)) = &early_memo {
        let root = global.root.clone().unwrap_or_else(kiln_cache::default_root);
        if let Some(hit) = std::path::absolute(&root)
            .ok()
            .and_then(|root| build_memo::lookup_quick(&root, key, ctx))
        {
            kiln_cache::timing::mark("quick memo hit");
            return memo_hit(args, None, &hit);
        }
    }
    let store = Arc::new(global.store()?);
    // The build holds the store lock shared from here to its end: GC
    // (`kiln prune`) waits for it rather than removing its scratch trees
    // and the layers it has committed but not yet recorded.
    let in_use = store.lock_shared()?;
    kiln_cache::timing::mark("store open");
    // Scratch directories (and mounts) of builds that were killed.
    kiln_solver::runner::sweep_stale(&store);
    kiln_cache::timing::mark("swept");
    let input = stdin_input(args, &store)?;
    // The same inputs as a fully cached build before: its image.
    let memo = early_memo;
    if let Some((key, ctx)) = &memo
        && let Some(hit) = build_memo::lookup(&store, key, ctx)
    {
        kiln_cache::timing::mark("memo hit");
        let code = memo_hit(args, Some(&store), &hit)?;
        build_memo::record_quick(&store, key, &hit);
        return Ok(code);
    }
    // A build that runs steps needs scratch directories: the first is
    // made meanwhile.
    let ahead = kiln_solver::runner::ScratchAhead::start(Arc::clone(&store));
    let (df_path, df) = read_dockerfile(input.dockerfile.as_deref(), &input.context)
        .map_err(|e| input.rename(e))?;
    // How messages name the Dockerfile (`-` when it came on stdin).
    let df_name = input.name_of(&df_path);
    if args.push && args.tags.is_empty() {
        bail!("--push needs at least one `-t NAME` to push to");
    }
    let policy = match args.pull {
        Pull::Never => super::registry::PullPolicy::Never,
        Pull::Missing => super::registry::PullPolicy::Missing,
        Pull::Always => super::registry::PullPolicy::Always,
    };
    let resolver = super::registry::PullingResolver::new(Arc::clone(&store), policy);
    let graph = plan(&df, &opts, &resolver).with_context(|| format!("planning `{df_name}`"))?;
    kiln_cache::timing::mark("planned");
    // As docker: a build arg no stage declares is probably a typo.
    let warning = (!graph.unused_build_args.is_empty()).then(|| {
        format!(
            "warning: one or more build-args [{}] were not consumed",
            graph.unused_build_args.join(" ")
        )
    });
    if let Some(w) = &warning {
        eprintln!("{w}");
    }
    if args.print_graph {
        std::io::stdout()
            .lock()
            .write_all(graph.to_dot().as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    let context_dir = match &memo {
        Some((_, canonical)) => canonical.clone(),
        None => fs_err::canonicalize(&input.context)
            .with_context(|| format!("the build context `{}`", input.context.display()))?,
    };
    // One connection to statcache.db for the stat cache, the key history
    // and the content memo.
    let cache_db = CacheDb::open(store.root()).map_err(|(path, e)| {
        anyhow::Error::new(e).context(format!("opening `{}`", path.display()))
    })?;
    let stat_cache = StatCache::with_db(cache_db.clone())?;
    let mut ctx = BuildContext::open(&context_dir, &df_path)?.with_stat_cache(stat_cache)?;
    // A COPY starting from a clone takes the keys' `lstat`s of its files:
    // kept only when some clone waits (never on a cold build).
    if kiln_solver::runner::has_prepared_copies(&store) {
        ctx = ctx.with_seen_files();
    }
    kiln_cache::timing::mark("ctx open");
    let keys = compute_keys(&graph, Some(&mut ctx)).map_err(|e| {
        // Name the Dockerfile line of the step whose context files failed.
        let line = match &e {
            kiln_solver::key::KeyError::Context { step, .. } => graph
                .graph
                .node_weights()
                .find(|v| &v.name == step)
                .and_then(|v| v.span),
            _ => None,
        };
        let err = anyhow::Error::new(e);
        match line {
            Some(sp) => {
                let l = sp.start.line;
                let text = format!(
                    "{:#}{}",
                    err.context(format!("{df_name}: line {l}")),
                    excerpt(&df_path, &df_name, l, sp.end.line)
                );
                anyhow::anyhow!(text)
            }
            None => err,
        }
    })?;
    kiln_cache::timing::mark("keys");
    let ignore = kiln_parser::read_dockerignore(&context_dir, &df_path)?.map(|f| f.matcher);
    let scope = match &input.scope {
        Some(s) => s.clone(),
        None => format!(
            "{}|{}",
            fs_err::canonicalize(&df_path)?.display(),
            context_dir.display()
        ),
    };
    let seen_files = Arc::new(ctx.take_seen_files());
    let mut history = KeyHistory::with_db(cache_db.clone(), &scope)?;
    kiln_cache::timing::mark("history open");
    let graph = Arc::new(graph);
    let cache_to = super::build_cache::parse_cache_to(&args.cache_to)?;
    let imported = super::build_cache::import(&args.cache_from)?;
    let (progress, mut rx) = Progress::channel();
    let mut runner = StoreRunner::new(
        Arc::clone(&store),
        Arc::clone(&graph),
        RunnerOptions {
            context: context_dir.clone(),
            ignore,
            secrets: secrets(&args.secret)?,
            ssh: ssh_agents(&args.ssh)?,
            network: match args.network {
                NetworkArg::None => DefaultNetwork::None,
                NetworkArg::Host | NetworkArg::Default => DefaultNetwork::Host,
            },
            source_date_epoch: epoch,
            context_files: Arc::clone(&seen_files),
        },
    )
    .with_cache_db(cache_db)
    .with_scratch_ahead(ahead);
    if let Some(cache) = imported {
        runner = runner.with_imported(cache, progress.clone());
    }
    let runner = Arc::new(runner);
    let mut solve_opts = SolveOptions {
        no_cache: args.no_cache,
        ..SolveOptions::default()
    };
    if let Some(j) = args.jobs {
        solve_opts.jobs = j.max(1);
    }
    // The steps' work runs on the blocking pool (in parallel, up to
    // `--jobs`); the scheduler and the progress renderer are light enough
    // for one thread, which saves starting a worker per core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut renderer = Renderer::new(args.progress_mode());
    // The events shown are kept for the build memo.
    let keep_events = memo.is_some();
    let render = rt.spawn(async move {
        let mut shown = Vec::new();
        while let Some(e) = rx.recv().await {
            renderer.render(&e);
            if keep_events {
                shown.push(e);
            }
        }
        shown
    });
    let outcome = rt.block_on(async {
        tokio::select! {
            r = solve(&graph, &keys, Arc::clone(&runner), progress, Some(&history), &solve_opts) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    // The progress sender is gone with the solve future: drain the renderer.
    kiln_cache::timing::mark("solved");
    runner.close_progress();
    // (Driving the runtime also drops the steps a failure or Ctrl-C
    // aborted, which kills their sandboxes: a RUN still running may hold
    // the upper a layer commit waits for, see `StoreRunner::finish`.)
    let shown = rt.block_on(render).unwrap_or_default();
    let Some(result) = outcome else {
        // Cancelled: the dropped steps killed their sandboxes and unmount
        // on drop; let blocking tasks finish their cleanup.
        rt.shutdown_timeout(std::time::Duration::from_secs(10));
        runner.finish();
        eprintln!("error: build cancelled");
        return Ok(ExitCode::from(130));
    };
    // A failed build waits for the work started beside its steps (the
    // clean-ups of its scratch directories) before it reports: the last
    // copy of the runner may be on one of those threads, whose drop does
    // not wait for itself. (A build that goes on waits after its export.)
    if result.is_err() {
        runner.finish_background();
    }
    let mut solved = match result {
        Ok(s) => s,
        Err(SolveError::Step { name, source, id }) => {
            let excerpt = graph.graph[id]
                .span
                .map(|sp| excerpt(&df_path, &df_name, sp.start.line, sp.end.line))
                .unwrap_or_default();
            bail!("{name} failed:\n{}{excerpt}", chain_text(&*source));
        }
        Err(e) => return Err(e.into()),
    };
    // Layers committed beside the steps after them (all done once
    // `finish` returned): their chains.
    if let Err(e) = runner.settle_outputs(&mut solved.outputs) {
        runner.finish_background();
        bail!("{}", chain_text(&e));
    }
    // The key history (statcache.db) is written while the image is stored
    // (meta.db).
    let (recorded, exported) = std::thread::scope(|scope| {
        let recording = scope.spawn(|| history.record(keys.iter().map(|k| &k.inputs)));
        let exported = (|| -> anyhow::Result<_> {
            // The image's layers, fetched from an imported cache if only there.
            super::build_cache::materialize_target(&runner, &graph, &mut solved.outputs)?;
            Ok(export_image(
                &store,
                &graph,
                &solved.outputs,
                &ExportOptions {
                    names: args.tags.clone(),
                    labels: args
                        .label
                        .iter()
                        .filter_map(|l| l.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect(),
                    source_date_epoch: epoch,
                },
            )?)
        })();
        kiln_cache::timing::mark("exported");
        let recorded = recording
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        kiln_cache::timing::mark("history recorded");
        (recorded, exported)
    });
    // The rest of the work started beside the steps: the copy memos being
    // written for the next build, the clean-ups, the layers committed
    // beside later steps that the image does not hold (`settle_outputs`
    // waited for those it holds). It ran beside the export. (The RUNs'
    // helpers, still unmounting their sandboxes, are waited for when the
    // runner is dropped.)
    runner.finish_background();
    recorded?;
    let image = exported?;
    for o in &args.output {
        write_output(&store, &image, o)?;
    }
    super::build_cache::export(&runner, &graph, &solved, &cache_to)?;
    if let Some(f) = &args.iidfile {
        fs_err::write(f, image.id.to_string())?;
    }
    if let Some(f) = &args.metadata_file {
        let meta = serde_json::json!({
            "containerimage.digest": image.manifest.to_string(),
            "containerimage.config.digest": image.id.to_string(),
            "image.name": args.tags.join(","),
        });
        fs_err::write(f, serde_json::to_vec_pretty(&meta)?)?;
    }
    if !args.is_quiet() {
        eprintln!(
            "{}",
            built_line(&image.id, solved.ran, solved.cached, solved.skipped)
        );
    }
    if args.push {
        for t in &args.tags {
            let pushed = super::registry::push_image(&store, t, true, true)
                .with_context(|| format!("pushing `{t}`"))?;
            if !args.is_quiet() {
                eprintln!("pushed {t} ({})", pushed.digest);
            }
        }
    }
    if let Some((key, ctx)) = &memo {
        if solved.ran == 0 {
            build_memo::record(
                &store,
                key,
                ctx,
                build_memo::Done {
                    graph: &graph,
                    keys: &keys,
                    effective: &solved.keys,
                    image: &image.id,
                    events: shown,
                    cached: solved.cached,
                    skipped: solved.skipped,
                    warning,
                },
            );
        } else {
            build_memo::forget(&store, key);
        }
    }
    // The RUNs' helpers still unmounting their sandboxes (a sandbox whose
    // overlay saw many files takes them milliseconds) finish after this
    // process has exited, recorded so that a later mount of their uppers
    // waits for them (see `kiln_executor::release_detached`). A failed
    // build waits for them instead: it leaves nothing behind.
    kiln_executor::release_detached();
    println!("{}", image.id);
    // A build that made layers may have taken the build cache past its
    // limit: the least recently used goes (see `store::auto_gc`), once this
    // build no longer holds the store.
    drop(in_use);
    if solved.ran > 0 {
        super::store::auto_gc(&store, args.is_quiet());
        kiln_cache::timing::mark("gc checked");
    }
    // The process exits next: the maps of every file the keys and the
    // copies went through are left to it rather than freed one by one
    // (1-1.5 ms for 5,000 context files). Only memory: what has a `Drop`
    // that does work (the runner, the databases) is dropped as usual.
    std::mem::forget((keys, seen_files));
    Ok(ExitCode::SUCCESS)
}

/// The build memo's record key for this build, and the canonical context
/// directory (`None`: the build is not memoized; see [`build_memo`]).
fn memo_key(
    args: &BuildArgs,
    input: &Input,
    opts: &BuildOptions,
    epoch: Option<i64>,
) -> Option<(String, PathBuf)> {
    // Not memoized: what must reach past the store (a registry, outputs,
    // a cache export), `--no-cache`, and a context or Dockerfile on stdin.
    let memoized = !(args.no_cache
        || args.pull == Pull::Always
        || !args.cache_from.is_empty()
        || !args.cache_to.is_empty()
        || !args.output.is_empty()
        || args.iidfile.is_some()
        || args.metadata_file.is_some()
        || args.push
        || args.print_graph
        || input.scratch.is_some());
    if !memoized {
        return None;
    }
    let context = fs_err::canonicalize(&input.context).ok()?;
    let dockerfile = input
        .dockerfile
        .clone()
        .unwrap_or_else(|| input.context.join("Dockerfile"));
    let text = fs_err::read_to_string(&dockerfile).ok()?;
    let key = build_memo::fingerprint(&build_memo::Inputs {
        args,
        options: opts,
        epoch,
        dockerfile: &dockerfile,
        text: &text,
        context: &context,
    })?;
    Some((key, context))
}

/// Finishes a build the memo answered: the same output as the build it
/// remembers, and the tags.
/// (Without a store: a quick memo's hit, whose tags are in place.)
fn memo_hit(
    args: &BuildArgs,
    store: Option<&kiln_cache::Store>,
    hit: &build_memo::Hit,
) -> anyhow::Result<ExitCode> {
    if let Some(w) = &hit.warning {
        eprintln!("{w}");
    }
    Renderer::new(args.progress_mode()).render_all(&hit.events);
    if let Some(store) = store {
        build_memo::tag(store, &hit.image, &args.tags)?;
    }
    if !args.is_quiet() {
        eprintln!("{}", built_line(&hit.image, 0, hit.cached, hit.skipped));
    }
    println!("{}", hit.image);
    Ok(ExitCode::SUCCESS)
}

/// The last line of a build's progress: `built ID (N steps run, M cached[,
/// K not needed])`.
fn built_line(id: &kiln_cache::Digest, ran: usize, cached: usize, skipped: usize) -> String {
    let not_needed = if skipped > 0 {
        format!(", {skipped} not needed")
    } else {
        String::new()
    };
    format!("built {id} ({ran} steps run, {cached} cached{not_needed})")
}

/// The Dockerfile lines `first..=last` (1-based) with two lines before,
/// as docker shows a failed step:
/// ```text
///  Dockerfile:3
///  --------------------
///    2 |     RUN ok
///    3 | >>> RUN make
///  --------------------
/// ```
fn excerpt(path: &Path, name: &str, first: usize, last: usize) -> String {
    let Ok(text) = fs_err::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    if first == 0 || first > lines.len() {
        return String::new();
    }
    let last = last.clamp(first, lines.len()).min(first + 9);
    let rule = " --------------------";
    let mut out = format!("\n {name}:{first}\n{rule}\n");
    for n in first.saturating_sub(2).max(1)..=last {
        let mark = if n >= first { ">>> " } else { "    " };
        out.push_str(&format!(" {n:>3} | {mark}{}\n", lines[n - 1]));
    }
    out.push_str(rule);
    out
}

fn chain_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

fn write_output(
    store: &kiln_cache::Store,
    image: &kiln_cache::Image,
    spec: &str,
) -> anyhow::Result<()> {
    // docker's shorthand: `-o DIR` is `type=local,dest=DIR`.
    let kv = if spec.contains('=') {
        parse_kv_list(spec)
    } else {
        BTreeMap::from([
            ("type".to_owned(), "local".to_owned()),
            ("dest".to_owned(), spec.to_owned()),
        ])
    };
    let dest = kv
        .get("dest")
        .with_context(|| format!("`--output {spec}` has no `dest=`"))?;
    match kv.get("type").map(String::as_str).unwrap_or("local") {
        "local" => {
            let dir = PathBuf::from(dest);
            fs_err::create_dir_all(&dir)?;
            for l in &image.layers {
                let blob = store.open_layer(&l.diff_id)?;
                kiln_cache::apply_layer(
                    blob,
                    &dir,
                    &kiln_cache::ApplyOptions::default()
                        .with_whiteouts(kiln_cache::layer::WhiteoutMode::Remove),
                )
                .with_context(|| format!("unpacking layer `{}` into `{dest}`", l.diff_id))?;
            }
        }
        t @ ("oci" | "docker") => {
            let format = if t == "oci" {
                kiln_cache::archive::ArchiveFormat::Oci
            } else {
                kiln_cache::archive::ArchiveFormat::Docker
            };
            let out = fs_err::File::create(dest)?;
            let item = kiln_cache::archive::SaveItem {
                image: image.clone(),
                names: image.names.clone(),
            };
            kiln_cache::archive::save(
                store,
                &[item],
                std::io::BufWriter::new(out),
                &kiln_cache::archive::SaveOptions {
                    format,
                    ..Default::default()
                },
            )?;
        }
        other => bail!(
            "`--output` type `{other}` is not supported\nhint: use `oci`, `docker` or `local`"
        ),
    }
    Ok(())
}
