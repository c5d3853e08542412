//! Image commands: load, save, images, image inspect, tag, rmi, history, import.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln_cache::archive::{self, ArchiveFormat, ImportOptions, SaveItem, SaveOptions};
use kiln_cache::compress::Compression;
use kiln_cache::{Image, Reference};
use serde_json::{Map, Value, json};

use super::Global;
use super::format::{human_age, human_size, table};

/// `kiln load`.
#[derive(Debug, Args)]
pub(crate) struct LoadArgs {
    /// The archive (docker-archive or OCI, tar or directory).
    #[arg(short = 'i', long = "input", value_name = "FILE")]
    input: PathBuf,
    /// Print nothing.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Docker,
    Oci,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressArg {
    None,
    Gzip,
    Zstd,
}

/// `kiln save`.
#[derive(Debug, Args)]
pub(crate) struct SaveArgs {
    /// Archive format.
    #[arg(long, value_enum, default_value = "docker")]
    format: FormatArg,
    /// Layer compression.
    #[arg(long, value_enum, default_value = "none")]
    compress: CompressArg,
    /// Write to this file (default: standard output, if it is not a terminal).
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Images (names or ids).
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
}

/// `kiln images`.
#[derive(Debug, Args)]
pub(crate) struct ImagesArgs {
    /// Only show image ids.
    #[arg(short, long)]
    quiet: bool,
    /// Don't truncate ids.
    #[arg(long)]
    no_trunc: bool,
}

/// `kiln image ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Show images' config and metadata as JSON.
    Inspect {
        /// Images (names or ids).
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// List images.
    #[command(alias = "list")]
    Ls(ImagesArgs),
    /// Remove images.
    Rm(RmiArgs),
    /// Show the history of an image.
    History(HistoryArgs),
    /// Give an image another name.
    Tag(TagArgs),
}

/// `kiln tag`.
#[derive(Debug, Args)]
pub(crate) struct TagArgs {
    /// The image (name or id).
    source: String,
    /// The new name.
    target: String,
}

/// `kiln rmi`.
#[derive(Debug, Args)]
pub(crate) struct RmiArgs {
    /// Remove an image by id even if it has several names.
    #[arg(short, long)]
    force: bool,
    /// Images (names or ids).
    #[arg(required = true)]
    images: Vec<String>,
}

/// `kiln history`.
#[derive(Debug, Args)]
pub(crate) struct HistoryArgs {
    /// Don't truncate output.
    #[arg(long)]
    no_trunc: bool,
    /// Only show layer ids.
    #[arg(short, long)]
    quiet: bool,
    /// The image.
    image: String,
}

/// `kiln import`.
#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// Apply a Dockerfile instruction to the image config (ENV, CMD,
    /// ENTRYPOINT, WORKDIR, USER, LABEL, EXPOSE, VOLUME, STOPSIGNAL).
    #[arg(short, long = "change", value_name = "INSTRUCTION")]
    changes: Vec<String>,
    /// Commit message for the history.
    #[arg(short, long)]
    message: Option<String>,
    /// A rootfs directory or a tarball (plain, gzip or zstd).
    source: PathBuf,
    /// Name for the image.
    name: Option<String>,
}

pub(crate) fn load(args: &LoadArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let loaded = archive::load(&store, &args.input)
        .with_context(|| format!("loading `{}`", args.input.display()))?;
    if !args.quiet {
        for img in loaded {
            if img.names.is_empty() {
                println!("Loaded image ID: {}", img.id);
            }
            for n in img.names {
                println!("Loaded image: {}", n.short());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn save(args: &SaveArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let mut items = Vec::new();
    for name in &args.images {
        let image = store.resolve(name)?;
        // Saved by name: record that name; by id: all of its names.
        let names = match Reference::parse(name) {
            Ok(r) if image.names.contains(&r) => vec![r],
            _ => image.names.clone(),
        };
        items.push(SaveItem { image, names });
    }
    let opts = SaveOptions {
        format: match args.format {
            FormatArg::Docker => ArchiveFormat::Docker,
            FormatArg::Oci => ArchiveFormat::Oci,
        },
        compression: match args.compress {
            CompressArg::None => Compression::None,
            CompressArg::Gzip => Compression::Gzip,
            CompressArg::Zstd => Compression::Zstd,
        },
        threads: 0,
    };
    match &args.output {
        Some(path) => {
            let file = fs_err::File::create(path)?;
            let out = std::io::BufWriter::with_capacity(1 << 20, file);
            let result = archive::save(&store, &items, out, &opts);
            if let Err(e) = result {
                // Never leave a truncated archive behind.
                let _ = fs_err::remove_file(path);
                return Err(e).with_context(|| format!("saving to `{}`", path.display()));
            }
        }
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                bail!(
                    "refusing to write an archive to a terminal\n\nhint: use `-o FILE` or redirect the output"
                );
            }
            let out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            archive::save(&store, &items, out, &opts)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn trunc_id(id: &kiln_cache::Digest, no_trunc: bool) -> String {
    if no_trunc {
        id.to_string()
    } else {
        id.short().to_owned()
    }
}

pub(crate) fn images(args: &ImagesArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let list = store.list_images()?;
    let now = unix_now();
    let mut rows = vec![];
    if args.quiet {
        let mut out = std::io::stdout().lock();
        let mut seen = std::collections::HashSet::new();
        for img in &list {
            if seen.insert(img.id.clone()) {
                writeln!(out, "{}", trunc_id(&img.id, args.no_trunc))?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    rows.push(
        ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]
            .map(str::to_owned)
            .to_vec(),
    );
    for img in &list {
        let created = img
            .config_created
            .as_deref()
            .and_then(kiln_cache::parse_rfc3339)
            .map_or_else(|| "N/A".to_owned(), |t| human_age(now - t));
        let id = trunc_id(&img.id, args.no_trunc);
        if img.names.is_empty() {
            rows.push(vec![
                "<none>".into(),
                "<none>".into(),
                id.clone(),
                created.clone(),
                human_size(img.size),
            ]);
        }
        for n in &img.names {
            rows.push(vec![
                n.short_repository().to_owned(),
                n.tag().to_owned(),
                id.clone(),
                created.clone(),
                human_size(img.size),
            ]);
        }
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

pub(crate) fn inspect_json(image: &Image) -> anyhow::Result<Value> {
    let config: Value = serde_json::from_slice(&image.config_bytes)?;
    Ok(json!({
        "Id": image.id.to_string(),
        "RepoTags": image.names.iter().map(Reference::short).collect::<Vec<_>>(),
        "RepoDigests": image
            .repo_digests
            .iter()
            .map(|d| kiln_cache::short_name(d))
            .collect::<Vec<_>>(),
        "Created": config.get("created").cloned().unwrap_or(Value::Null),
        "Author": config.get("author").cloned().unwrap_or(Value::Null),
        "Architecture": config.get("architecture").cloned().unwrap_or(Value::Null),
        "Os": config.get("os").cloned().unwrap_or(Value::Null),
        "Config": config.get("config").cloned().unwrap_or(Value::Null),
        "Size": image.size,
        "RootFS": {
            "Type": "layers",
            "Layers": image.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        },
        "Metadata": {
            "Manifest": image.manifest.to_string(),
            "LoadedAt": kiln_cache::format_rfc3339(image.created),
        },
    }))
}

pub(crate) fn image(command: ImageCommand, global: &Global) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Inspect { images } => {
            let store = global.store()?;
            let mut out = Vec::new();
            let mut failed = None;
            for name in &images {
                match store.resolve(name) {
                    Ok(img) => out.push(inspect_json(&img)?),
                    Err(e) => failed = Some(e),
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            match failed {
                Some(e) => Err(e.into()),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        ImageCommand::Ls(a) => images(&a, global),
        ImageCommand::Rm(a) => rmi(&a, global),
        ImageCommand::History(a) => history(&a, global),
        ImageCommand::Tag(a) => tag(&a, global),
    }
}

pub(crate) fn tag(args: &TagArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let target = Reference::parse(&args.target)?;
    store.tag(&args.source, &target)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn rmi(args: &RmiArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let mut code = ExitCode::SUCCESS;
    for name in &args.images {
        match store.remove(name, args.force) {
            Ok(report) => {
                for n in report.untagged {
                    println!("Untagged: {}", n.short());
                }
                for d in report.untagged_digests {
                    println!("Untagged: {}", kiln_cache::short_name(&d));
                }
                for d in report.deleted {
                    println!("Deleted: {d}");
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                code = ExitCode::from(1);
            }
        }
    }
    Ok(code)
}

pub(crate) fn history(args: &HistoryArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let image = store.resolve(&args.image)?;
    let now = unix_now();
    let mut layers = image.layers.iter().rev();
    let mut rows = vec![
        ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]
            .map(str::to_owned)
            .to_vec(),
    ];
    let history = image.config.history().clone().unwrap_or_default();
    let mut first = true;
    for h in history.iter().rev() {
        let size = if h.empty_layer().unwrap_or(false) {
            0
        } else {
            layers.next().map_or(0, |l| l.size)
        };
        let id = if first {
            trunc_id(&image.id, args.no_trunc)
        } else {
            "<missing>".to_owned()
        };
        first = false;
        if args.quiet {
            println!("{id}");
            continue;
        }
        let created = h
            .created()
            .as_deref()
            .and_then(kiln_cache::parse_rfc3339)
            .map_or_else(|| "N/A".to_owned(), |t| human_age(now - t));
        let mut by = h.created_by().clone().unwrap_or_default();
        if !args.no_trunc && by.chars().count() > 45 {
            by = by.chars().take(44).collect::<String>() + "…";
        }
        rows.push(vec![
            id,
            created,
            by,
            human_size(size),
            h.comment().clone().unwrap_or_default(),
        ]);
    }
    if !args.quiet {
        print!("{}", table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn import(args: &ImportArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let store = global.store()?;
    let mut config = Map::new();
    for c in &args.changes {
        apply_change(&mut config, c).with_context(|| format!("in `--change {c}`"))?;
    }
    let names = args
        .name
        .as_deref()
        .map(Reference::parse)
        .transpose()?
        .into_iter()
        .collect::<Vec<_>>();
    let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => Some(
            v.parse::<i64>()
                .with_context(|| format!("SOURCE_DATE_EPOCH=`{v}`"))?,
        ),
        _ => None,
    };
    let opts = ImportOptions {
        config,
        message: args.message.clone(),
        source_date_epoch,
    };
    let image = archive::import_rootfs(&store, &args.source, &names, &opts)
        .with_context(|| format!("importing `{}`", args.source.display()))?;
    println!("{}", image.id);
    Ok(ExitCode::SUCCESS)
}

/// Applies one Dockerfile-style instruction to a config's `config` section.
fn apply_change(config: &mut Map<String, Value>, change: &str) -> anyhow::Result<()> {
    let change = change.trim();
    let (instr, rest) = change
        .split_once(char::is_whitespace)
        .unwrap_or((change, ""));
    let rest = rest.trim();
    let list = |rest: &str| -> anyhow::Result<Value> {
        if rest.starts_with('[') {
            let v: Vec<String> =
                serde_json::from_str(rest).context("expected a JSON array of strings")?;
            Ok(json!(v))
        } else {
            Ok(json!(["/bin/sh", "-c", rest]))
        }
    };
    let pairs = |rest: &str| -> anyhow::Result<Vec<(String, String)>> {
        if !rest.contains('=') {
            let (k, v) = rest
                .split_once(char::is_whitespace)
                .context("expected `KEY value` or `KEY=value`")?;
            return Ok(vec![(k.to_owned(), v.trim().to_owned())]);
        }
        rest.split_whitespace()
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("`{kv}` is not `KEY=value`"))?;
                Ok((k.to_owned(), v.trim_matches('"').to_owned()))
            })
            .collect()
    };
    match instr.to_ascii_uppercase().as_str() {
        "CMD" => {
            config.insert("Cmd".into(), list(rest)?);
        }
        "ENTRYPOINT" => {
            config.insert("Entrypoint".into(), list(rest)?);
        }
        "WORKDIR" => {
            config.insert("WorkingDir".into(), json!(rest));
        }
        "USER" => {
            config.insert("User".into(), json!(rest));
        }
        "STOPSIGNAL" => {
            config.insert("StopSignal".into(), json!(rest));
        }
        "ENV" => {
            let env = config.entry("Env").or_insert_with(|| json!([]));
            for (k, v) in pairs(rest)? {
                if let Some(a) = env.as_array_mut() {
                    a.retain(|e| e.as_str().is_none_or(|s| !s.starts_with(&format!("{k}="))));
                    a.push(json!(format!("{k}={v}")));
                }
            }
        }
        "LABEL" => {
            let labels = config.entry("Labels").or_insert_with(|| json!({}));
            for (k, v) in pairs(rest)? {
                if let Some(o) = labels.as_object_mut() {
                    o.insert(k, json!(v));
                }
            }
        }
        "EXPOSE" => {
            let ports = config.entry("ExposedPorts").or_insert_with(|| json!({}));
            for p in rest.split_whitespace() {
                let p = if p.contains('/') {
                    p.to_owned()
                } else {
                    format!("{p}/tcp")
                };
                if let Some(o) = ports.as_object_mut() {
                    o.insert(p, json!({}));
                }
            }
        }
        "VOLUME" => {
            let vols = config.entry("Volumes").or_insert_with(|| json!({}));
            let paths: Vec<String> = if rest.starts_with('[') {
                serde_json::from_str(rest).context("expected a JSON array of strings")?
            } else {
                rest.split_whitespace().map(str::to_owned).collect()
            };
            for p in paths {
                if let Some(o) = vols.as_object_mut() {
                    o.insert(p, json!({}));
                }
            }
        }
        other => bail!(
            "`{other}` cannot be used with `--change`\n\nhint: use ENV, CMD, ENTRYPOINT, WORKDIR, USER, LABEL, EXPOSE, VOLUME or STOPSIGNAL"
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_build_a_config() {
        let mut c = Map::new();
        apply_change(&mut c, r#"CMD ["sh", "-c", "echo hi"]"#).expect("cmd");
        apply_change(&mut c, "ENTRYPOINT /bin/run").expect("entrypoint");
        apply_change(&mut c, "ENV A=1 B=2").expect("env");
        apply_change(&mut c, "ENV A 3").expect("env legacy");
        apply_change(&mut c, "EXPOSE 80 53/udp").expect("expose");
        apply_change(&mut c, "WORKDIR /w").expect("workdir");
        assert_eq!(c["Cmd"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(c["Entrypoint"], json!(["/bin/sh", "-c", "/bin/run"]));
        assert_eq!(c["Env"], json!(["B=2", "A=3"]));
        assert_eq!(c["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}}));
        assert_eq!(c["WorkingDir"], json!("/w"));
        assert!(apply_change(&mut c, "RUN true").is_err());
        assert!(apply_change(&mut c, "CMD [broken").is_err());
    }
}
