//! `windlass-runtime`: a runc-compatible CLI over the `windlass_runtime` library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use windlass_runtime::{cli, Runtime};

mod image_cmd;

#[derive(Parser)]
#[command(
    name = "windlass-runtime",
    version,
    about = "Windlass OCI container runtime"
)]
struct Cli {
    /// Directory for container state (one directory per container).
    #[arg(long, global = true, default_value = "/run/windlass/runtime")]
    root: PathBuf,
    /// Where cgroup hierarchies are mounted.
    #[arg(long, global = true, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Write logs to this file instead of stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of logs and error messages.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log at debug level.
    #[arg(long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a container (its process waits for `start`).
    Create(CreateArgs),
    /// Start a created container's process.
    Start { id: String },
    /// Print a container's OCI state as JSON.
    State { id: String },
    /// List a container's processes.
    Ps {
        id: String,
        #[arg(short, long, value_enum, default_value = "table")]
        format: ListFormat,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Change a container's resource limits.
    Update {
        /// A JSON file with `linux.resources` (`-` reads stdin).
        #[arg(short, long)]
        resources: PathBuf,
        id: String,
    },
    /// Send a signal (default SIGTERM) to a container's init.
    Kill {
        id: String,
        signal: Option<String>,
        /// Signal every process in the container's cgroup.
        #[arg(short, long)]
        all: bool,
    },
    /// Delete a container and everything it holds.
    Delete {
        id: String,
        /// Kill a running container first.
        #[arg(short, long)]
        force: bool,
    },
    /// Create and start a container; in the foreground, wait and return its exit code.
    Run(RunArgs),
    /// List containers.
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        format: ListFormat,
        /// Print only IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a process in a running container.
    Exec(ExecCmd),
    /// Manage images: pull, list, inspect, rm, gc, import, export.
    Image(image_cmd::ImageArgs),
    /// Internal: a sandbox container's log shim (started by the sandbox library, not by users).
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        log_path: PathBuf,
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ListFormat {
    Table,
    Json,
}

#[derive(Args)]
struct CreateArgs {
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    id: String,
}

#[derive(Args)]
struct RunArgs {
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    #[arg(short, long)]
    detach: bool,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    id: String,
}

#[derive(Args)]
struct ExecCmd {
    #[arg(short, long)]
    tty: bool,
    /// Run as `uid[:gid]` instead of the container's user.
    #[arg(short, long)]
    user: Option<String>,
    /// Additional group IDs (repeatable).
    #[arg(short = 'g', long = "additional-gids")]
    additional_gids: Vec<u32>,
    #[arg(short, long = "env")]
    env: Vec<String>,
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// A process.json describing the whole process.
    #[arg(short, long)]
    process: Option<PathBuf>,
    #[arg(short, long)]
    detach: bool,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    id: String,
    #[arg(last = true)]
    command: Vec<String>,
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    // runc-like commands log warnings only; image pulls report progress at info.
    let filter = if cli.debug {
        "debug"
    } else if matches!(cli.command, Command::Image(_)) {
        "info"
    } else {
        "warn"
    };
    let builder = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into()),
    );
    match &cli.log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let rt = Runtime::new(&cli.root, &cli.cgroup_root);
    Ok(match cli.command {
        Command::Create(a) => {
            cli::create(&rt, &a.id, &a.bundle, a.pid_file, a.console_socket)?;
            0
        }
        Command::Start { id } => {
            cli::start(&rt, &id)?;
            0
        }
        Command::State { id } => {
            println!("{}", cli::state(&rt, &id)?);
            0
        }
        Command::Ps { id, format } => {
            print!("{}", cli::ps(&rt, &id, format == ListFormat::Json)?);
            0
        }
        Command::Pause { id } => {
            cli::pause(&rt, &id)?;
            0
        }
        Command::Resume { id } => {
            cli::resume(&rt, &id)?;
            0
        }
        Command::Update { resources, id } => {
            cli::update(&rt, &id, &resources)?;
            0
        }
        Command::Kill { id, signal, all } => {
            cli::kill(&rt, &id, signal.as_deref(), all)?;
            0
        }
        Command::Delete { id, force } => {
            cli::delete(&rt, &id, force)?;
            0
        }
        Command::Run(a) => cli::run(
            &rt,
            &a.id,
            &a.bundle,
            a.detach,
            a.pid_file,
            a.console_socket,
        )?,
        Command::List { format, quiet } => {
            print!("{}", cli::list(&rt, format == ListFormat::Json, quiet)?);
            0
        }
        Command::Image(args) => {
            image_cmd::run(args)?;
            0
        }
        Command::Shim {
            bundle,
            log_path,
            id,
        } => {
            windlass_runtime::run_shim(&rt, &id, &bundle, &log_path)?;
            0
        }
        Command::Exec(a) => cli::exec(
            &rt,
            &a.id,
            cli::ExecArgs {
                args: a.command,
                env: a.env,
                cwd: a.cwd,
                user: a.user,
                additional_gids: a.additional_gids,
                tty: a.tty,
                process: a.process,
                detach: a.detach,
                pid_file: a.pid_file,
                console_socket: a.console_socket,
            },
        )?,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.log_format == LogFormat::Json;
    if let Err(e) = init_logging(&cli) {
        eprintln!("windlass-runtime: cannot open log: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            // Ref: runc prints the error as a logrus line on stderr and exits 1.
            let msg = format!("{e:#}");
            let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            if json {
                eprintln!(
                    "{}",
                    serde_json::json!({"level": "error", "msg": msg, "time": time})
                );
            } else {
                eprintln!("time=\"{time}\" level=error msg={msg:?}");
            }
            ExitCode::FAILURE
        }
    }
}
