//! The typed AST: one [`Instruction`] per Dockerfile instruction, its
//! [`Command`] a typed variant with flags parsed and validated.
//!
//! Arguments stay UNEXPANDED: `$VAR` is expanded later by the build solver
//! with the shell lexer, because ARG and ENV values are only known then.
//! Values that can hold variables (mount options, `--chmod`, ports) are
//! therefore only validated here when they contain no `$`.

use serde::Serialize;

use crate::node::{Directive, Heredoc, Warning};
use crate::quote::go_quote;
use crate::span::{Position, Span};

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dockerfile {
    /// Parser directives (`syntax`, `escape`, `check`) from the top.
    pub directives: Vec<Directive>,
    /// The escape character in effect (`\` or `` ` ``).
    pub escape: char,
    /// All instructions in source order: the global ARGs, then each stage's
    /// FROM followed by its instructions (see [`Dockerfile::stages`]).
    pub instructions: Vec<Instruction>,
    /// Warnings (empty continuation lines).
    pub warnings: Vec<Warning>,
}

/// One build stage: its FROM and the instructions up to the next FROM.
#[derive(Debug, Clone, Copy)]
pub struct Stage<'a> {
    /// The FROM instruction.
    pub from: &'a Instruction,
    /// The typed FROM.
    pub base: &'a From,
    /// The instructions after FROM.
    pub instructions: &'a [Instruction],
}

impl Dockerfile {
    /// The ARG instructions before the first FROM (global build args).
    pub fn global_args(&self) -> &[Instruction] {
        let first_from = self
            .instructions
            .iter()
            .position(|i| matches!(i.command, Command::From(_)));
        &self.instructions[..first_from.unwrap_or(self.instructions.len())]
    }

    /// The build stages, in order.
    pub fn stages(&self) -> Vec<Stage<'_>> {
        let starts: Vec<usize> = self
            .instructions
            .iter()
            .enumerate()
            .filter(|(_, i)| matches!(i.command, Command::From(_)))
            .map(|(n, _)| n)
            .collect();
        let mut stages = Vec::new();
        for (k, &s) in starts.iter().enumerate() {
            let end = starts
                .get(k + 1)
                .copied()
                .unwrap_or(self.instructions.len());
            if let Command::From(base) = &self.instructions[s].command {
                stages.push(Stage {
                    from: &self.instructions[s],
                    base,
                    instructions: &self.instructions[s + 1..end],
                });
            }
        }
        stages
    }

    /// BuildKit's `AST.Dump() + "\n"`, byte for byte (the conformance
    /// `result` format).
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for i in &self.instructions {
            s.push('(');
            s.push_str(&i.dump());
            s.push_str(")\n");
        }
        s
    }
}

/// A leading `--flag` of an instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flag {
    /// The name without `--`.
    pub name: String,
    /// The value after `=`, if any.
    pub value: Option<String>,
    /// As BuildKit stores it: `--name=value` after quote removal.
    pub raw: String,
    /// Where the flag starts in the source.
    pub position: Position,
}

/// One instruction with its source span, as-written keyword, flags and raw
/// arguments, and its typed [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instruction {
    /// From the keyword to the end of its last line.
    pub span: Span,
    /// The keyword as written (`RUN`, `run`).
    pub keyword: String,
    /// The flags as written, in order.
    pub flags: Vec<Flag>,
    /// The arguments as BuildKit's parser splits them (unexpanded).
    pub args: Vec<String>,
    /// The arguments were a JSON array.
    pub json: bool,
    /// The logical source line (continuations joined), BuildKit's
    /// `Node.Original`; RUN's history `created_by` comes from it.
    pub original: String,
    /// The comment lines right above it (BuildKit's `PrevComment`).
    pub comments: Vec<String>,
    /// The typed instruction.
    pub command: Command,
}

impl Instruction {
    /// BuildKit's `Node.Dump()` for this instruction (without parentheses).
    pub fn dump(&self) -> String {
        let mut s = self.keyword.to_lowercase();
        if !self.flags.is_empty() {
            let flags: Vec<String> = self.flags.iter().map(|f| go_quote(&f.raw)).collect();
            s.push_str(" [");
            s.push_str(&flags.join(" "));
            s.push(']');
        }
        if let Command::Onbuild(inner) = &self.command {
            s.push_str(" (");
            s.push_str(&inner.dump());
            s.push(')');
        } else {
            for a in &self.args {
                s.push(' ');
                s.push_str(&go_quote(a));
            }
        }
        s.trim_matches(char::is_whitespace).to_string()
    }

    /// The heredocs of a RUN, COPY or ADD (also inside ONBUILD).
    pub fn heredocs(&self) -> &[Heredoc] {
        match &self.command {
            Command::Run(r) => &r.heredocs,
            Command::Copy(c) => &c.heredocs,
            Command::Add(a) => &a.heredocs,
            Command::Onbuild(i) => i.heredocs(),
            _ => &[],
        }
    }
}

/// The typed instructions of Dockerfile 1.x.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Command {
    /// `FROM [--platform=p] image [AS name]`
    From(From),
    /// `RUN [--mount=...] [--network=...] [--security=...] command`
    Run(Run),
    /// `CMD command`
    Cmd(CommandLine),
    /// `ENTRYPOINT command`
    Entrypoint(CommandLine),
    /// `SHELL ["exe", "arg"]`
    Shell(Shell),
    /// `ENV k=v ...` or `ENV k v`
    Env(KeyValues),
    /// `ARG name[=default] ...`
    Arg(Arg),
    /// `LABEL k=v ...`
    Label(KeyValues),
    /// `EXPOSE port[/proto] ...`
    Expose(Expose),
    /// `VOLUME ["/a"]` or `VOLUME /a /b`
    Volume(Volume),
    /// `USER user[:group]`
    User(Single),
    /// `WORKDIR /path`
    Workdir(Single),
    /// `COPY [flags] src... dest`
    Copy(Copy),
    /// `ADD [flags] src... dest`
    Add(Add),
    /// `ONBUILD instruction`
    Onbuild(Box<Instruction>),
    /// `STOPSIGNAL signal`
    Stopsignal(Single),
    /// `HEALTHCHECK NONE` or `HEALTHCHECK [flags] CMD command`
    Healthcheck(Healthcheck),
    /// `MAINTAINER name` (deprecated)
    Maintainer(Single),
}

/// A command in shell form (run by the stage's SHELL) or exec form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "form", content = "value", rename_all = "lowercase")]
pub enum ShellOrExec {
    /// Shell form: the whole text, unexpanded.
    Shell(String),
    /// Exec form: the JSON array's elements.
    Exec(Vec<String>),
}

impl ShellOrExec {
    pub(crate) fn from_args(args: &[String], json: bool) -> Self {
        if json {
            Self::Exec(args.to_vec())
        } else {
            Self::Shell(args.join(" "))
        }
    }
}

/// FROM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct From {
    /// The image (or stage) reference, unexpanded.
    pub image: String,
    /// The stage name after AS, lower-cased.
    pub name: Option<String>,
    /// `--platform`.
    pub platform: Option<String>,
}

/// RUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    /// `--mount` options, in order.
    pub mounts: Vec<Mount>,
    /// `--network`.
    pub network: Option<Network>,
    /// `--security`.
    pub security: Option<Security>,
    /// The command.
    pub command: ShellOrExec,
    /// Heredoc bodies for `RUN <<EOF`.
    pub heredocs: Vec<Heredoc>,
}

/// `RUN --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The default network.
    Default,
    /// No network.
    None,
    /// The host's network.
    Host,
}

/// `RUN --security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// The default sandbox.
    Sandbox,
    /// All capabilities (needs an entitlement).
    Insecure,
}

/// The kind of a `RUN --mount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    /// A read-only (by default) bind of the context or another stage.
    Bind,
    /// A persistent cache directory.
    Cache,
    /// A tmpfs.
    Tmpfs,
    /// A build secret as a file (or env var).
    Secret,
    /// The SSH agent socket.
    Ssh,
}

/// `cache` mount sharing mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// Several builds may use it at once.
    Shared,
    /// Each concurrent build gets its own.
    Private,
    /// Builds wait for each other.
    Locked,
}

/// One `RUN --mount=...`, options unexpanded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// `type=` (default `bind`).
    pub kind: MountType,
    /// `target=`/`dst=`/`destination=`.
    pub target: Option<String>,
    /// `source=`/`src=`.
    pub source: Option<String>,
    /// `from=`: a stage or image.
    pub from: Option<String>,
    /// `id=`.
    pub id: Option<String>,
    /// `sharing=` (cache).
    pub sharing: Option<Sharing>,
    /// `readonly`/`ro`, or the opposite of `readwrite`/`rw`.
    pub readonly: Option<bool>,
    /// `required` (secret, ssh).
    pub required: Option<bool>,
    /// `mode=` (octal, as written).
    pub mode: Option<String>,
    /// `uid=`.
    pub uid: Option<String>,
    /// `gid=`.
    pub gid: Option<String>,
    /// `size=` (tmpfs).
    pub size: Option<String>,
    /// `env=` (secret): also expose the secret as this variable.
    pub env: Option<String>,
    /// The flag value as written.
    pub raw: String,
}

/// CMD and ENTRYPOINT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandLine {
    /// The command (an empty exec form for `CMD []`).
    pub command: ShellOrExec,
}

/// SHELL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shell {
    /// The shell and its arguments.
    pub shell: Vec<String>,
}

/// One `key=value` of ENV or LABEL, unexpanded (quotes kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    /// The key as written.
    pub key: String,
    /// The value as written.
    pub value: String,
    /// Legacy `ENV key value` form (no `=`).
    pub legacy: bool,
}

/// ENV and LABEL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValues {
    /// The pairs, in order.
    pub pairs: Vec<KeyValue>,
}

/// One ARG name with its optional default, unexpanded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgDef {
    /// The name.
    pub name: String,
    /// The default after `=`.
    pub default: Option<String>,
}

/// ARG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Arg {
    /// The declared args, in order.
    pub args: Vec<ArgDef>,
}

/// EXPOSE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Expose {
    /// `port[/proto]` or `from-to[/proto]`, unexpanded.
    pub ports: Vec<String>,
}

/// VOLUME.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// The paths.
    pub paths: Vec<String>,
}

/// USER, WORKDIR, STOPSIGNAL, MAINTAINER: one value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Single {
    /// The value as written, unexpanded.
    pub value: String,
}

/// A COPY/ADD source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Source {
    /// A path (or URL, for ADD), unexpanded.
    Path {
        /// As written.
        path: String,
    },
    /// A heredoc source: its content becomes a file named `name`.
    Heredoc {
        /// The file name (the heredoc delimiter).
        name: String,
        /// The body, with leading tabs already removed for `<<-`.
        content: String,
        /// Whether variables in the body are expanded.
        expand: bool,
    },
}

/// `--chmod`: octal or symbolic (unvalidated when it holds a variable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "form", content = "value", rename_all = "lowercase")]
pub enum Chmod {
    /// `0755`.
    Octal(u32),
    /// `u+x,g-w`.
    Symbolic(String),
    /// Holds `$`: expanded and checked at build time.
    Unexpanded(String),
}

/// COPY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    /// `--from`: a stage, image or named context.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// The sources.
    pub sources: Vec<Source>,
    /// The destination, unexpanded.
    pub dest: String,
    /// The heredocs, as read.
    pub heredocs: Vec<Heredoc>,
}

/// ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Add {
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<Chmod>,
    /// `--link`.
    pub link: bool,
    /// `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// `--checksum`.
    pub checksum: Option<String>,
    /// `--unpack` (None when not given: archives from the context unpack,
    /// from URLs they don't).
    pub unpack: Option<bool>,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// The sources.
    pub sources: Vec<Source>,
    /// The destination, unexpanded.
    pub dest: String,
    /// The heredocs, as read.
    pub heredocs: Vec<Heredoc>,
}

/// HEALTHCHECK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable the base image's check.
    None,
    /// `HEALTHCHECK [flags] CMD ...`
    Cmd {
        /// `--interval`, in nanoseconds (0 = default).
        interval_ns: u64,
        /// `--timeout`, in nanoseconds.
        timeout_ns: u64,
        /// `--start-period`, in nanoseconds.
        start_period_ns: u64,
        /// `--start-interval`, in nanoseconds.
        start_interval_ns: u64,
        /// `--retries` (0 = default).
        retries: u32,
        /// The test command (shell form becomes `CMD-SHELL`).
        command: ShellOrExec,
    },
}
