//! One module per subcommand (or group of subcommands).

pub(crate) mod build;
mod build_cache;
mod build_memo;
mod container;
mod format;
mod image;
mod network;
mod parse;
mod registry;
mod run;
mod store;
mod volume;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

/// Flags every subcommand takes.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// The store directory (default: `/var/lib/kiln` as root,
    /// `$XDG_DATA_HOME/kiln` otherwise).
    #[arg(long, global = true, env = "KILN_ROOT", value_name = "DIR")]
    pub(crate) root: Option<PathBuf>,
}

impl Global {
    /// Opens the store named by `--root` (or the default).
    pub(crate) fn store(&self) -> anyhow::Result<kiln_cache::Store> {
        let root = self.root.clone().unwrap_or_else(kiln_cache::default_root);
        Ok(kiln_cache::Store::open(&root)?)
    }
}

/// Every kiln subcommand.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the version.
    Version,
    /// Build an image from a Dockerfile and a context directory.
    Build(Box<build::BuildArgs>),
    /// Print the build graph of a Dockerfile in Graphviz DOT.
    Graph(build::GraphArgs),
    /// Parse a Dockerfile and print its syntax tree.
    Parse(parse::ParseArgs),
    /// Load images from a docker-archive, an OCI archive or an OCI layout directory.
    Load(image::LoadArgs),
    /// Save images to a docker-archive (default) or an OCI archive.
    Save(image::SaveArgs),
    /// List images.
    Images(image::ImagesArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Give an image another name.
    Tag(image::TagArgs),
    /// Remove images (names, or images by id).
    Rmi(image::RmiArgs),
    /// Show the history of an image.
    History(image::HistoryArgs),
    /// Make a one-layer image from a rootfs directory or tarball.
    Import(image::ImportArgs),
    /// Download an image from a registry.
    Pull(registry::PullArgs),
    /// Upload an image to a registry.
    Push(registry::PushArgs),
    /// Log in to a registry (credentials go to docker's config.json).
    Login(registry::LoginArgs),
    /// Log out from a registry.
    Logout(registry::LogoutArgs),
    /// Remove what no image name or cache record needs.
    Prune(store::PruneArgs),
    /// Store-wide commands.
    #[command(subcommand)]
    System(store::SystemCommand),
    /// Manage networks.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Create and start a container.
    Run(Box<run::RunArgs>),
    /// List containers.
    Ps(container::PsArgs),
    /// Print a container's output.
    Logs(container::LogsArgs),
    /// Stop containers (stop signal, then SIGKILL after a timeout).
    Stop(container::StopArgs),
    /// Send a signal to containers.
    Kill(container::KillArgs),
    /// Start stopped containers.
    Start(container::StartArgs),
    /// Remove containers.
    Rm(container::RmArgs),
    /// Run a command in a running container.
    Exec(container::ExecArgs),
    /// Show containers as JSON.
    Inspect(container::InspectArgs),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
}

/// Runs one subcommand and returns the process exit code.
pub(crate) fn run(command: Command, global: &Global) -> anyhow::Result<ExitCode> {
    match command {
        Command::Version => {
            println!("kiln {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Parse(args) => parse::run(&args),
        Command::Build(a) => build::build(&a, global),
        Command::Graph(a) => build::graph(&a),
        Command::Load(a) => image::load(&a, global),
        Command::Save(a) => image::save(&a, global),
        Command::Images(a) => image::images(&a, global),
        Command::Image(c) => image::image(c, global),
        Command::Tag(a) => image::tag(&a, global),
        Command::Rmi(a) => image::rmi(&a, global),
        Command::History(a) => image::history(&a, global),
        Command::Import(a) => image::import(&a, global),
        Command::Pull(a) => registry::pull(&a, global),
        Command::Push(a) => registry::push(&a, global),
        Command::Login(a) => registry::login(&a),
        Command::Logout(a) => registry::logout(&a),
        Command::Prune(a) => store::prune(&a, global),
        Command::System(c) => store::system(c, global),
        Command::Network(c) => network::network(c, global),
        Command::Run(a) => run::run(&a, global),
        Command::Ps(a) => container::ps(&a, global),
        Command::Logs(a) => container::logs(&a, global),
        Command::Stop(a) => container::stop(&a, global),
        Command::Kill(a) => container::kill(&a, global),
        Command::Start(a) => container::start(&a, global),
        Command::Rm(a) => container::rm(&a, global),
        Command::Exec(a) => container::exec(&a, global),
        Command::Inspect(a) => container::inspect(&a, global),
        Command::Volume(c) => volume::volume(c, global),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::Cli;

    #[test]
    fn parses_docker_style_flags() {
        let cli = Cli::try_parse_from([
            "kiln",
            "--root",
            "/r",
            "save",
            "--format",
            "oci",
            "--compress",
            "gzip",
            "-o",
            "x.tar",
            "a",
            "b",
        ])
        .expect("parses");
        assert_eq!(cli.global.root.as_deref(), Some(std::path::Path::new("/r")));
        assert!(matches!(cli.command, super::Command::Save(_)));
        assert!(Cli::try_parse_from(["kiln", "save", "--format", "tgz", "-o", "x", "a"]).is_err());
        assert!(Cli::try_parse_from(["kiln", "rmi", "-f", "a", "b"]).is_ok());
        assert!(Cli::try_parse_from(["kiln", "prune", "--all", "--force"]).is_ok());
        assert!(Cli::try_parse_from(["kiln", "image", "inspect", "busybox"]).is_ok());
        assert!(Cli::try_parse_from(["kiln", "system", "df"]).is_ok());
        assert!(
            Cli::try_parse_from(["kiln", "import", "-c", "CMD [\"sh\"]", "rootfs", "name"]).is_ok()
        );
        assert!(
            Cli::try_parse_from(["kiln", "load"]).is_err(),
            "load needs -i"
        );
    }
}
