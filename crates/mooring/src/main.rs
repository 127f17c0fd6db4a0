//! The `mooring` command: serve every service from one process, write a default
//! configuration, or ask a running server how it is.

mod banner;
mod cli;
mod jobs_cli;
mod serve;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command, EventsCommand, JobsCommand};

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.config.load()?;
            serve::init_logging(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("mooring")
                .build()?;
            runtime.block_on(serve::serve(config))
        }
        Command::Init(args) => cli::init(&args),
        Command::Status(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(cli::status(&args))
        }
        Command::Events(EventsCommand::Tail(args)) => mooring_events::tail::run(
            &args.data_dir,
            &args.bus,
            args.from_start,
            !args.no_follow,
            &mut std::io::stdout().lock(),
            &|| false,
        ),
        Command::Jobs(JobsCommand::Ls(args)) => jobs_cli::ls(&args.data_dir),
        Command::Jobs(JobsCommand::Show(args)) => jobs_cli::show(&args.data.data_dir, &args.job_id),
    }
}
