//! The second layer: [`Node`]s to typed [`Instruction`]s, with every
//! instruction's flags parsed and validated the way BuildKit's
//! `instructions.ParseInstruction` and `BFlags` do, plus the file-level
//! rules (only ARG before the first FROM).

use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, ParseError, suggest};
use crate::instruction::{
    Add, Arg, ArgDef, Chmod, Command, CommandLine, Copy, Dockerfile, Expose, Flag, From,
    Healthcheck, Instruction, KeyValue, KeyValues, Mount, MountType, Network, Run, Security,
    Sharing, Shell, ShellOrExec, Single, Source, Volume,
};
use crate::json_array::{JsonArray, parse_json_array};
use crate::node::{Heredoc, Node, parse_heredoc_marker, parse_nodes};
use crate::span::Position;

/// Every instruction keyword of Dockerfile 1.x.
pub const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// Error reading a Dockerfile from disk.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read the Dockerfile `{}`", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but does not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// Reads and parses a Dockerfile; parse errors name the file. Bytes that
/// are not UTF-8 are replaced by U+FFFD.
pub fn parse_file(path: &Path) -> Result<Dockerfile, FileError> {
    let bytes = fs_err::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    parse(&text).map_err(|e| FileError::Parse(e.with_file(path)))
}

/// Parses Dockerfile text into the typed AST.
///
/// ```
/// use kiln_parser::{Command, ShellOrExec};
///
/// let df = kiln_parser::parse("FROM alpine AS base\nRUN echo $HOME\n")?;
/// assert_eq!(df.stages()[0].base.name.as_deref(), Some("base"));
/// let Command::Run(run) = &df.instructions[1].command else { unreachable!() };
/// // Arguments stay unexpanded: the solver expands them later.
/// assert_eq!(run.command, ShellOrExec::Shell("echo $HOME".into()));
/// assert_eq!(df.dump(), "(from \"alpine\" \"AS\" \"base\")\n(run \"echo $HOME\")\n");
///
/// let err = kiln_parser::parse("FROM alpine\nCOPPY . /app\n").unwrap_err();
/// assert_eq!((err.line, err.column), (2, 1));
/// assert_eq!(err.hint.as_deref(), Some("did you mean `COPY`?"));
/// # Ok::<(), kiln_parser::ParseError>(())
/// ```
pub fn parse(src: &str) -> Result<Dockerfile, ParseError> {
    let file = parse_nodes(src)?;
    let mut instructions = Vec::with_capacity(file.nodes.len());
    let mut seen_from = false;
    for node in file.nodes {
        let ins = convert(node, src)?;
        match &ins.command {
            Command::From(_) => seen_from = true,
            Command::Arg(_) => {}
            _ if !seen_from => {
                let p = ins.span.start;
                return Err(ParseError::new(
                    ErrorKind::BeforeFrom(ins.keyword.to_uppercase()),
                    src,
                    p.line,
                    p.column,
                    ins.keyword.chars().count(),
                )
                .with_hint(Some(
                    "only `ARG` may come before the first `FROM`".to_string(),
                )));
            }
            _ => {}
        }
        instructions.push(ins);
    }
    Ok(Dockerfile {
        directives: file.directives,
        escape: file.escape,
        instructions,
        warnings: file.warnings,
    })
}

/// Where an error points and how wide.
struct At {
    pos: Position,
    width: usize,
}

/// Conversion context for one node.
struct Ctx<'a> {
    src: &'a str,
    node: &'a Node,
    upper: String,
}

impl Ctx<'_> {
    fn err(&self, kind: ErrorKind, at: At) -> ParseError {
        ParseError::new(kind, self.src, at.pos.line, at.pos.column, at.width)
    }

    fn at_keyword(&self) -> At {
        At {
            pos: self.node.keyword_position,
            width: self.node.keyword.chars().count(),
        }
    }

    fn at_args(&self) -> At {
        if self.node.args.is_empty() {
            return self.at_keyword();
        }
        At {
            pos: self.node.args_position,
            width: self.node.args.first().map_or(1, |a| a.chars().count()),
        }
    }

    fn at_flag(&self, i: usize) -> At {
        At {
            pos: self
                .node
                .flag_positions
                .get(i)
                .copied()
                .unwrap_or(self.node.span.start),
            width: self.node.flags.get(i).map_or(1, |f| f.chars().count()),
        }
    }

    fn args_err(&self, expected: &str) -> ParseError {
        self.err(
            ErrorKind::Arguments {
                instruction: self.upper.clone(),
                expected: expected.to_string(),
            },
            if self.node.args.is_empty() {
                self.at_keyword()
            } else {
                self.at_args()
            },
        )
    }
}

/// The kind of value a flag takes.
#[derive(Clone, Copy, PartialEq)]
enum FlagKind {
    Bool,
    String,
    Strings,
}

fn flag_spec(keyword: &str) -> &'static [(&'static str, FlagKind)] {
    use FlagKind::{Bool, String as Str, Strings};
    match keyword {
        "from" => &[("platform", Str)],
        "run" => &[("mount", Strings), ("network", Str), ("security", Str)],
        "copy" => &[
            ("from", Str),
            ("chown", Str),
            ("chmod", Str),
            ("link", Bool),
            ("parents", Bool),
            ("exclude", Strings),
        ],
        "add" => &[
            ("chown", Str),
            ("chmod", Str),
            ("link", Bool),
            ("keep-git-dir", Bool),
            ("checksum", Str),
            ("unpack", Bool),
            ("exclude", Strings),
        ],
        "healthcheck" => &[
            ("interval", Str),
            ("timeout", Str),
            ("start-period", Str),
            ("start-interval", Str),
            ("retries", Str),
        ],
        _ => &[],
    }
}

/// Parsed flags: (name, value, index into node.flags).
struct Flags {
    list: Vec<Flag>,
    parsed: Vec<(String, String, usize)>,
}

impl Flags {
    fn string(&self, name: &str) -> Option<(&str, usize)> {
        self.parsed
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, i)| (v.as_str(), *i))
    }

    fn strings(&self, name: &str) -> Vec<(&str, usize)> {
        self.parsed
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, v, i)| (v.as_str(), *i))
            .collect()
    }

    fn bool(&self, name: &str) -> Option<bool> {
        self.string(name).map(|(v, _)| v == "true")
    }
}

/// BuildKit's `BFlags.Parse` for the instruction's allowed flags.
fn parse_flags(ctx: &Ctx<'_>, keyword: &str) -> Result<Flags, ParseError> {
    let spec = flag_spec(keyword);
    let mut list = Vec::new();
    let mut parsed: Vec<(String, String, usize)> = Vec::new();
    for (i, raw) in ctx.node.flags.iter().enumerate() {
        let at = || ctx.at_flag(i);
        let Some(body) = raw.strip_prefix("--") else {
            return Err(ctx.err(ErrorKind::MalformedFlag(raw.clone()), at()));
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        };
        list.push(Flag {
            name: name.clone(),
            value: value.clone(),
            raw: raw.clone(),
            position: at().pos,
        });
        let Some(&(_, kind)) = spec.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = spec.iter().map(|(n, _)| *n).collect();
            let hint = match suggest(&name, &names) {
                Some(s) => Some(format!("did you mean `--{s}`?")),
                None if names.is_empty() => Some(format!("`{}` takes no flags", ctx.upper)),
                None => Some(format!(
                    "`{}` takes {}",
                    ctx.upper,
                    names
                        .iter()
                        .map(|n| format!("`--{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            };
            return Err(ctx
                .err(
                    ErrorKind::UnknownFlag {
                        instruction: ctx.upper.clone(),
                        flag: name,
                    },
                    at(),
                )
                .with_hint(hint));
        };
        if kind != FlagKind::Strings && parsed.iter().any(|(n, _, _)| *n == name) {
            return Err(ctx.err(ErrorKind::DuplicateFlag(name), at()));
        }
        let value = match (kind, value) {
            (FlagKind::Bool, None) => "true".to_string(),
            (FlagKind::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                "true" => "true".to_string(),
                "false" => "false".to_string(),
                _ => {
                    return Err(ctx.err(
                        ErrorKind::BadFlagValue {
                            flag: name,
                            value: v,
                            reason: "expected `true` or `false`".into(),
                        },
                        at(),
                    ));
                }
            },
            (_, None) => return Err(ctx.err(ErrorKind::MissingFlagValue(name), at())),
            (_, Some(v)) => v,
        };
        parsed.push((name, value, i));
    }
    Ok(Flags { list, parsed })
}

fn bad_value(ctx: &Ctx<'_>, flag: &str, value: &str, i: usize, reason: &str) -> ParseError {
    ctx.err(
        ErrorKind::BadFlagValue {
            flag: flag.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        },
        ctx.at_flag(i),
    )
}

/// Turns one node into a typed instruction.
fn convert(node: Node, src: &str) -> Result<Instruction, ParseError> {
    let keyword = node.keyword.to_ascii_lowercase();
    let ctx = Ctx {
        src,
        node: &node,
        upper: node.keyword.to_uppercase(),
    };
    if !INSTRUCTIONS
        .iter()
        .any(|k| k.eq_ignore_ascii_case(&keyword))
    {
        let hint = suggest(&node.keyword, INSTRUCTIONS).map(|s| format!("did you mean `{s}`?"));
        return Err(ctx
            .err(
                ErrorKind::UnknownInstruction(node.keyword.clone()),
                ctx.at_keyword(),
            )
            .with_hint(hint));
    }
    let flags = if keyword == "healthcheck"
        && node
            .args
            .first()
            .is_some_and(|t| t.eq_ignore_ascii_case("none"))
    {
        // BuildKit parses no flags for `HEALTHCHECK NONE`; kiln refuses them
        // rather than ignoring them silently.
        if !node.flags.is_empty() {
            return Err(ctx.err(
                ErrorKind::UnknownFlag {
                    instruction: "HEALTHCHECK NONE".into(),
                    flag: node.flags[0]
                        .trim_start_matches('-')
                        .split('=')
                        .next()
                        .unwrap_or("")
                        .to_string(),
                },
                ctx.at_flag(0),
            ));
        }
        Flags {
            list: Vec::new(),
            parsed: Vec::new(),
        }
    } else {
        parse_flags(&ctx, &keyword)?
    };
    let args = &node.args;
    if !node.json
        && matches!(
            keyword.as_str(),
            "run" | "cmd" | "entrypoint" | "shell" | "copy" | "add" | "volume"
        )
    {
        // `CMD ["a", "b"` is shell form to BuildKit (and fails at run time);
        // an array that clearly starts as JSON and runs off the end is a
        // mistake worth an error.
        let text = args.join(" ");
        let looks_json = text
            .strip_prefix('[')
            .is_some_and(|t| t.trim_start().starts_with('"'));
        if looks_json && parse_json_array(&text) == JsonArray::Unterminated {
            return Err(ctx
                .err(
                    ErrorKind::UnterminatedJson(ctx.upper.clone()),
                    ctx.at_args(),
                )
                .with_hint(Some(
                    "close the array with `]`; BuildKit would run the text as a shell command"
                        .to_string(),
                )));
        }
    }
    let command = match keyword.as_str() {
        "from" => convert_from(&ctx, &flags)?,
        "run" => convert_run(&ctx, &flags)?,
        "cmd" => Command::Cmd(CommandLine {
            command: ShellOrExec::from_args(args, node.json),
        }),
        "entrypoint" => Command::Entrypoint(CommandLine {
            command: ShellOrExec::from_args(args, node.json),
        }),
        "shell" => {
            if !node.json {
                return Err(ctx.err(
                    ErrorKind::NotJson {
                        instruction: "SHELL".into(),
                        got: args.join(" "),
                    },
                    ctx.at_args(),
                ));
            }
            if args.is_empty() {
                return Err(ctx.args_err("needs at least one argument"));
            }
            Command::Shell(Shell {
                shell: args.clone(),
            })
        }
        "env" | "label" => {
            if args.is_empty() {
                return Err(ctx.args_err("needs at least one `key=value` argument"));
            }
            let mut pairs = Vec::new();
            for t in args.chunks(3) {
                let [key, value, sep] = t else {
                    return Err(ctx.args_err("has a malformed `key=value` list"));
                };
                if key.is_empty() {
                    return Err(ctx.err(
                        ErrorKind::BadArgument(format!("`{}` names can not be blank", ctx.upper)),
                        ctx.at_args(),
                    ));
                }
                pairs.push(KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    legacy: sep.is_empty(),
                });
            }
            let kv = KeyValues { pairs };
            if keyword == "env" {
                Command::Env(kv)
            } else {
                Command::Label(kv)
            }
        }
        "arg" => {
            if args.is_empty() {
                return Err(ctx.args_err("needs at least one argument"));
            }
            let mut defs = Vec::new();
            for a in args {
                let def = match a.split_once('=') {
                    Some(("", _)) => {
                        return Err(ctx.err(
                            ErrorKind::BadArgument(format!(
                                "`ARG` names can not be blank in `{a}`"
                            )),
                            ctx.at_args(),
                        ));
                    }
                    Some((k, v)) => ArgDef {
                        name: k.to_string(),
                        default: Some(v.to_string()),
                    },
                    None => ArgDef {
                        name: a.clone(),
                        default: None,
                    },
                };
                defs.push(def);
            }
            Command::Arg(Arg { args: defs })
        }
        "expose" => {
            if args.is_empty() {
                return Err(ctx.args_err("needs at least one argument"));
            }
            for p in args {
                if !p.contains('$') && !valid_port(p) {
                    return Err(ctx.err(
                        ErrorKind::BadArgument(format!(
                            "invalid port `{p}`: expected `port[-port][/tcp|udp|sctp]`"
                        )),
                        ctx.at_args(),
                    ));
                }
            }
            Command::Expose(Expose {
                ports: args.clone(),
            })
        }
        "volume" => {
            if args.is_empty() {
                return Err(ctx.args_err("needs at least one argument"));
            }
            let mut paths = Vec::new();
            for v in args {
                let v = v.trim();
                if v.is_empty() {
                    return Err(ctx.err(
                        ErrorKind::BadArgument("`VOLUME` paths can not be empty".into()),
                        ctx.at_args(),
                    ));
                }
                paths.push(v.to_string());
            }
            Command::Volume(Volume { paths })
        }
        "user" | "workdir" | "stopsignal" | "maintainer" => {
            if args.len() != 1 {
                return Err(ctx.args_err("needs exactly one argument"));
            }
            let single = Single {
                value: args[0].clone(),
            };
            match keyword.as_str() {
                "user" => Command::User(single),
                "workdir" => Command::Workdir(single),
                "stopsignal" => Command::Stopsignal(single),
                _ => Command::Maintainer(single),
            }
        }
        "copy" | "add" => convert_copy_add(&ctx, &flags, keyword == "copy")?,
        "onbuild" => {
            let Some(sub) = &node.sub else {
                return Err(ctx.args_err("needs an instruction to run later"));
            };
            let trigger = sub.keyword.to_ascii_uppercase();
            if matches!(trigger.as_str(), "ONBUILD" | "FROM" | "MAINTAINER") {
                return Err(ctx
                    .err(
                        ErrorKind::BadOnbuildTrigger(trigger.clone()),
                        At {
                            pos: sub.span.start,
                            width: trigger.chars().count(),
                        },
                    )
                    .with_hint(
                        (trigger == "ONBUILD")
                            .then(|| "chaining `ONBUILD ONBUILD` isn't allowed".to_string()),
                    ));
            }
            let mut sub = (**sub).clone();
            sub.heredocs = node.heredocs.clone();
            sub.span.end = node.span.end;
            Command::Onbuild(Box::new(convert(sub, src)?))
        }
        "healthcheck" => convert_healthcheck(&ctx, &flags)?,
        _ => {
            return Err(ctx.err(
                ErrorKind::UnknownInstruction(node.keyword.clone()),
                ctx.at_keyword(),
            ));
        }
    };
    Ok(Instruction {
        span: node.span,
        keyword: node.keyword.clone(),
        flags: flags.list,
        args: node.args.clone(),
        json: node.json,
        original: node.original.clone(),
        comments: node.comments.clone(),
        command,
    })
}

fn convert_from(ctx: &Ctx<'_>, flags: &Flags) -> Result<Command, ParseError> {
    let args = &ctx.node.args;
    let name = match args.len() {
        1 => None,
        3 if args[1].eq_ignore_ascii_case("as") => {
            let name = args[2].to_lowercase();
            let mut chars = name.chars();
            let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
                });
            if !ok {
                let at = At {
                    pos: ctx.node.args_position,
                    width: 1,
                };
                return Err(ctx.err(
                    ErrorKind::BadArgument(format!(
                        "invalid name for build stage: `{}`, name can't start with a number or contain symbols",
                        args[2]
                    )),
                    at,
                ));
            }
            Some(name)
        }
        3 => {
            return Err(ctx
                .args_err("needs either one or three arguments")
                .with_hint(Some(format!(
                    "did you mean `FROM {} AS {}`?",
                    args[0], args[2]
                ))));
        }
        _ => {
            return Err(
                ctx.args_err("needs either one or three arguments (`FROM image [AS name]`)")
            );
        }
    };
    let platform = match flags.string("platform") {
        Some(("", i)) => {
            return Err(bad_value(
                ctx,
                "platform",
                "",
                i,
                "the platform can not be empty",
            ));
        }
        Some((p, _)) => Some(p.to_string()),
        None => None,
    };
    Ok(Command::From(From {
        image: args[0].clone(),
        name,
        platform,
    }))
}

fn convert_run(ctx: &Ctx<'_>, flags: &Flags) -> Result<Command, ParseError> {
    if ctx.node.args.is_empty() && !ctx.node.json {
        return Err(ctx.args_err("needs a command"));
    }
    let mut mounts = Vec::new();
    for (value, i) in flags.strings("mount") {
        mounts.push(parse_mount(value).map_err(|kind| ctx.err(kind, ctx.at_flag(i)))?);
    }
    let network = match flags.string("network") {
        None => None,
        Some(("default", _)) => Some(Network::Default),
        Some(("none", _)) => Some(Network::None),
        Some(("host", _)) => Some(Network::Host),
        Some((v, i)) => {
            return Err(bad_value(
                ctx,
                "network",
                v,
                i,
                "expected `default`, `none` or `host`",
            ));
        }
    };
    let security = match flags.string("security") {
        None => None,
        Some(("sandbox", _)) => Some(Security::Sandbox),
        Some(("insecure", _)) => Some(Security::Insecure),
        Some((v, i)) => {
            return Err(bad_value(
                ctx,
                "security",
                v,
                i,
                "expected `sandbox` or `insecure`",
            ));
        }
    };
    Ok(Command::Run(Run {
        mounts,
        network,
        security,
        command: ShellOrExec::from_args(&ctx.node.args, ctx.node.json),
        heredocs: ctx.node.heredocs.clone(),
    }))
}

/// Splits a `--mount` value as Go's `encoding/csv` reads one record.
fn csv_fields(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => break,
                    c => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Some(out);
                }
                Some(',') => out.push(field),
                Some(_) => return None,
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(field);
                        return Some(out);
                    }
                    Some(',') => break,
                    Some('"') => return None,
                    Some(c) => field.push(c),
                }
            }
            out.push(field);
        }
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    // Go's strconv.ParseBool.
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// BuildKit's `parseMount` (runmount.go), without expansion: values that
/// hold `$` are kept and checked at build time.
pub(crate) fn parse_mount(value: &str) -> Result<Mount, ErrorKind> {
    let bad = |option: &str, reason: &str| ErrorKind::BadMount {
        option: option.to_string(),
        reason: reason.to_string(),
    };
    let fields = csv_fields(value).ok_or_else(|| bad(value, "unbalanced quotes"))?;
    let mut m = Mount {
        kind: MountType::Bind,
        target: None,
        source: None,
        from: None,
        id: None,
        sharing: None,
        readonly: None,
        required: None,
        mode: None,
        uid: None,
        gid: None,
        size: None,
        env: None,
        raw: value.to_string(),
    };
    // The type decides which keys are allowed, so find it first.
    for f in &fields {
        if let Some((k, v)) = f.split_once('=')
            && k.trim().eq_ignore_ascii_case("type")
        {
            m.kind = match v.to_ascii_lowercase().as_str() {
                "bind" => MountType::Bind,
                "cache" => MountType::Cache,
                "tmpfs" => MountType::Tmpfs,
                "secret" => MountType::Secret,
                "ssh" => MountType::Ssh,
                _ => {
                    return Err(bad(
                        f,
                        "unsupported mount type: expected `bind`, `cache`, `tmpfs`, `secret` or `ssh`",
                    ));
                }
            };
        }
    }
    let literal = |v: &str| !v.contains('$');
    for f in &fields {
        if f.is_empty() {
            continue;
        }
        let Some((k, v)) = f.split_once('=') else {
            match f.trim().to_ascii_lowercase().as_str() {
                "readonly" | "ro" => m.readonly = Some(true),
                "readwrite" | "rw" => m.readonly = Some(false),
                "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                    m.required = Some(true)
                }
                _ => return Err(bad(f, "must be a `key=value` pair")),
            }
            continue;
        };
        let key = k.trim().to_ascii_lowercase();
        let v = v.to_string();
        match key.as_str() {
            "type" => {}
            "from" => m.from = Some(v),
            "source" | "src" => m.source = Some(v),
            "target" | "dst" | "destination" => m.target = Some(v),
            "readonly" | "ro" | "readwrite" | "rw" => {
                let b = parse_bool(&v).ok_or_else(|| bad(f, "expected a boolean"))?;
                m.readonly = Some(if key.starts_with("readonly") || key == "ro" {
                    b
                } else {
                    !b
                });
            }
            "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                m.required = Some(parse_bool(&v).ok_or_else(|| bad(f, "expected a boolean"))?);
            }
            "size" if m.kind == MountType::Tmpfs => m.size = Some(v),
            "id" => m.id = Some(v),
            "sharing" if m.kind == MountType::Cache => {
                m.sharing = Some(match v.to_ascii_lowercase().as_str() {
                    "shared" => Sharing::Shared,
                    "private" => Sharing::Private,
                    "locked" => Sharing::Locked,
                    _ => return Err(bad(f, "expected `shared`, `private` or `locked`")),
                });
            }
            "mode" => {
                if literal(&v) && u32::from_str_radix(&v, 8).is_err() {
                    return Err(bad(f, "expected an octal mode such as `0755`"));
                }
                m.mode = Some(v);
            }
            "uid" | "gid" => {
                if literal(&v) && v.parse::<u32>().is_err() {
                    return Err(bad(f, "expected a number"));
                }
                if key == "uid" {
                    m.uid = Some(v)
                } else {
                    m.gid = Some(v)
                }
            }
            "env" if m.kind == MountType::Secret => m.env = Some(v),
            _ => {
                return Err(bad(
                    f,
                    &format!(
                        "unexpected key `{key}` for a `{}` mount",
                        format!("{:?}", m.kind).to_lowercase()
                    ),
                ));
            }
        }
    }
    match m.kind {
        MountType::Cache | MountType::Tmpfs if m.target.as_deref().is_none_or(str::is_empty) => {
            Err(bad(value, "a `target` is required"))
        }
        MountType::Secret if m.target.is_none() && m.id.is_none() && m.env.is_none() => {
            Err(bad(value, "a secret mount needs an `id` or a `target`"))
        }
        MountType::Secret | MountType::Ssh if m.from.is_some() => {
            Err(bad(value, "`from` is not allowed here"))
        }
        _ => Ok(m),
    }
}

/// `--chmod`: Go's `strconv.ParseUint(v, 8, 32)`, or a symbolic mode.
fn parse_chmod(v: &str) -> Option<Chmod> {
    if v.contains('$') {
        return Some(Chmod::Unexpanded(v.to_string()));
    }
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return u32::from_str_radix(v, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .map(Chmod::Octal);
    }
    let clause_ok = |c: &str| {
        let who_end = c.find(|ch: char| !"ugoa".contains(ch)).unwrap_or(c.len());
        let rest = &c[who_end..];
        if rest.is_empty() {
            return false;
        }
        // One or more `op perms` actions.
        let mut chars = rest.chars().peekable();
        let mut any = false;
        while let Some(op) = chars.next() {
            if !"+-=".contains(op) {
                return false;
            }
            any = true;
            let mut perms = String::new();
            while let Some(&p) = chars.peek() {
                if "+-=".contains(p) {
                    break;
                }
                perms.push(p);
                chars.next();
            }
            let ok = perms.chars().all(|p| "rwxXst".contains(p))
                || matches!(perms.as_str(), "u" | "g" | "o");
            if !ok {
                return false;
            }
        }
        any
    };
    (!v.is_empty() && v.split(',').all(clause_ok)).then(|| Chmod::Symbolic(v.to_string()))
}

/// `--checksum`: `algo:hex` for sha256/sha384/sha512, or a git commit.
fn valid_checksum(v: &str) -> bool {
    if v.contains('$') {
        return true;
    }
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match v.split_once(':') {
        Some(("sha256", h)) => hex(h, 64),
        Some(("sha384", h)) => hex(h, 96),
        Some(("sha512", h)) => hex(h, 128),
        Some(_) => false,
        None => hex(v, 40) || hex(v, 64),
    }
}

fn convert_copy_add(ctx: &Ctx<'_>, flags: &Flags, is_copy: bool) -> Result<Command, ParseError> {
    let args = &ctx.node.args;
    if args.len() < 2 {
        return Err(ctx
            .args_err("needs at least two arguments: one or more sources and a destination")
            .with_hint(Some(format!("`{} <src>... <dest>`", ctx.upper))));
    }
    let (dest, srcs) = args.split_last().unwrap_or((&args[0], &[]));
    if parse_heredoc_marker(dest).ok().flatten().is_some() {
        return Err(ctx.err(
            ErrorKind::BadArgument(format!(
                "`{}` can not have a heredoc as its destination",
                ctx.upper
            )),
            ctx.at_args(),
        ));
    }
    let mut sources = Vec::new();
    for s in srcs {
        let marker = if ctx.node.json {
            None
        } else {
            parse_heredoc_marker(s).ok().flatten()
        };
        match marker {
            Some(h) => {
                let doc: Option<&Heredoc> = ctx.node.heredocs.iter().find(|d| d.name == h.name);
                let mut content = doc.map(|d| d.content.clone()).unwrap_or_default();
                if h.chomp {
                    content = content
                        .split_inclusive('\n')
                        .map(|l| l.trim_start_matches('\t'))
                        .collect();
                }
                sources.push(Source::Heredoc {
                    name: h.name,
                    content,
                    expand: h.expand,
                });
            }
            None => sources.push(Source::Path { path: s.clone() }),
        }
    }
    let chmod = match flags.string("chmod") {
        None => None,
        Some((v, i)) => Some(parse_chmod(v).ok_or_else(|| {
            bad_value(
                ctx,
                "chmod",
                v,
                i,
                "expected an octal mode such as `0755` or a symbolic one such as `u+x,g-w`",
            )
        })?),
    };
    let chown = match flags.string("chown") {
        Some(("", i)) => return Err(bad_value(ctx, "chown", "", i, "expected `user[:group]`")),
        other => other.map(|(v, _)| v.to_string()),
    };
    let exclude: Vec<String> = flags
        .strings("exclude")
        .into_iter()
        .map(|(v, _)| v.to_string())
        .collect();
    let dest = dest.clone();
    let heredocs = ctx.node.heredocs.clone();
    if is_copy {
        let from = match flags.string("from") {
            Some(("", i)) => {
                return Err(bad_value(
                    ctx,
                    "from",
                    "",
                    i,
                    "expected a stage name, image or context",
                ));
            }
            other => other.map(|(v, _)| v.to_string()),
        };
        Ok(Command::Copy(Copy {
            from,
            chown,
            chmod,
            link: flags.bool("link").unwrap_or(false),
            parents: flags.bool("parents").unwrap_or(false),
            exclude,
            sources,
            dest,
            heredocs,
        }))
    } else {
        let checksum = match flags.string("checksum") {
            Some((v, i)) if !valid_checksum(v) => {
                return Err(bad_value(
                    ctx,
                    "checksum",
                    v,
                    i,
                    "expected a digest such as `sha256:<64 hex digits>`",
                ));
            }
            other => other.map(|(v, _)| v.to_string()),
        };
        Ok(Command::Add(Add {
            chown,
            chmod,
            link: flags.bool("link").unwrap_or(false),
            keep_git_dir: flags.bool("keep-git-dir").unwrap_or(false),
            checksum,
            unpack: flags.bool("unpack"),
            exclude,
            sources,
            dest,
            heredocs,
        }))
    }
}

/// Go's `time.ParseDuration`, in nanoseconds (negative allowed).
pub(crate) fn parse_go_duration(s: &str) -> Option<i128> {
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let int_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let int_part = &rest[..int_end];
        rest = &rest[int_end..];
        let mut frac_part = "";
        if let Some(r) = rest.strip_prefix('.') {
            let fe = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            frac_part = &r[..fe];
            rest = &r[fe..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let unit_end = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale: f64 = match unit {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let number: f64 = format!(
            "{}.{}",
            if int_part.is_empty() { "0" } else { int_part },
            if frac_part.is_empty() { "0" } else { frac_part }
        )
        .parse()
        .ok()?;
        total += number * scale;
        if total > 9.3e18 {
            return None;
        }
    }
    let ns = total as i128;
    Some(if neg { -ns } else { ns })
}

fn convert_healthcheck(ctx: &Ctx<'_>, flags: &Flags) -> Result<Command, ParseError> {
    let args = &ctx.node.args;
    let Some(kind) = args.first() else {
        return Err(ctx.args_err("needs `NONE` or `CMD <command>`"));
    };
    if kind.eq_ignore_ascii_case("none") {
        if args.len() > 1 {
            return Err(ctx.err(
                ErrorKind::BadArgument("`HEALTHCHECK NONE` takes no arguments".into()),
                ctx.at_args(),
            ));
        }
        return Ok(Command::Healthcheck(Healthcheck::None));
    }
    if !kind.eq_ignore_ascii_case("cmd") {
        return Err(ctx
            .err(
                ErrorKind::BadArgument(format!("unknown type `{kind}` in `HEALTHCHECK`")),
                ctx.at_args(),
            )
            .with_hint(Some(
                "use `HEALTHCHECK CMD <command>` or `HEALTHCHECK NONE`".into(),
            )));
    }
    if args.len() < 2 {
        return Err(ctx.args_err("needs a command after `CMD`"));
    }
    let duration = |name: &str| -> Result<u64, ParseError> {
        let Some((v, i)) = flags.string(name) else {
            return Ok(0);
        };
        if v.is_empty() {
            return Ok(0);
        }
        let ns = parse_go_duration(v).ok_or_else(|| {
            bad_value(
                ctx,
                name,
                v,
                i,
                "expected a duration such as `30s` or `1m30s`",
            )
        })?;
        if ns != 0 && ns < 1_000_000 {
            return Err(bad_value(
                ctx,
                name,
                v,
                i,
                "the duration can not be less than 1ms",
            ));
        }
        Ok(u64::try_from(ns).unwrap_or(0))
    };
    let interval_ns = duration("interval")?;
    let timeout_ns = duration("timeout")?;
    let start_period_ns = duration("start-period")?;
    let start_interval_ns = duration("start-interval")?;
    let retries = match flags.string("retries") {
        None | Some(("", _)) => 0,
        Some((v, i)) => match v.parse::<i32>() {
            Ok(n) if n >= 0 => n.unsigned_abs(),
            Ok(_) => {
                return Err(bad_value(
                    ctx,
                    "retries",
                    v,
                    i,
                    "the retry count can not be negative",
                ));
            }
            Err(_) => return Err(bad_value(ctx, "retries", v, i, "expected a whole number")),
        },
    };
    Ok(Command::Healthcheck(Healthcheck::Cmd {
        interval_ns,
        timeout_ns,
        start_period_ns,
        start_interval_ns,
        retries,
        command: ShellOrExec::from_args(&args[1..], ctx.node.json),
    }))
}

/// `port`, `from-to`, optionally `/tcp|udp|sctp` (any case).
fn valid_port(p: &str) -> bool {
    let (ports, proto) = match p.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (p, None),
    };
    if let Some(proto) = proto
        && !matches!(proto.to_ascii_lowercase().as_str(), "tcp" | "udp" | "sctp")
    {
        return false;
    }
    let num = |s: &str| {
        !s.is_empty()
            && s.len() <= 5
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|n| n <= 65535)
    };
    match ports.split_once('-') {
        Some((a, b)) => num(a) && num(b),
        None => num(ports),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_go() {
        assert_eq!(parse_go_duration("30s"), Some(30_000_000_000));
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("1.5h"), Some(5_400_000_000_000));
        assert_eq!(parse_go_duration("0"), Some(0));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(".s"), None);
        assert_eq!(parse_go_duration("1d"), None);
    }

    #[test]
    fn chmod_forms() {
        assert_eq!(parse_chmod("0755"), Some(Chmod::Octal(0o755)));
        assert_eq!(
            parse_chmod("u+x,g-w"),
            Some(Chmod::Symbolic("u+x,g-w".into()))
        );
        assert_eq!(parse_chmod("a=rX"), Some(Chmod::Symbolic("a=rX".into())));
        assert_eq!(
            parse_chmod("$MODE"),
            Some(Chmod::Unexpanded("$MODE".into()))
        );
        assert_eq!(parse_chmod("0758"), None);
        assert_eq!(parse_chmod("u+q"), None);
        assert_eq!(parse_chmod(""), None);
    }

    #[test]
    fn mounts() {
        let m = parse_mount("type=cache,target=/root/.cache,sharing=locked,id=x").unwrap();
        assert_eq!(
            (m.kind, m.sharing, m.target.as_deref()),
            (
                MountType::Cache,
                Some(Sharing::Locked),
                Some("/root/.cache")
            )
        );
        let m = parse_mount("type=secret,id=tok,required,env=TOKEN").unwrap();
        assert_eq!((m.required, m.env.as_deref()), (Some(true), Some("TOKEN")));
        let m = parse_mount("target=/src,rw").unwrap();
        assert_eq!((m.kind, m.readonly), (MountType::Bind, Some(false)));
        assert!(parse_mount("type=nfs,target=/x").is_err());
        assert!(parse_mount("type=cache").is_err());
        assert!(parse_mount("type=cache,target=/x,sharing=maybe").is_err());
        assert!(parse_mount("type=bind,target=/x,bogus=1").is_err());
        assert!(parse_mount("type=cache,target=/x,mode=999").is_err());
        assert!(parse_mount("type=cache,target=/x,mode=$M").is_ok());
        assert_eq!(
            csv_fields(r#"a,"b,c",d"#),
            Some(vec!["a".into(), "b,c".into(), "d".into()])
        );
    }

    #[test]
    fn ports() {
        assert!(valid_port("80") && valid_port("80/tcp") && valid_port("8000-8010/UDP"));
        assert!(!valid_port("http") && !valid_port("80/xyz") && !valid_port("99999"));
    }
}
