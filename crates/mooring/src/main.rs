//! The `mooring` command: serve every service from one process, write a default
//! configuration, or ask a running server how it is.

mod banner;
mod cli;
mod jobs_cli;
mod serve;
mod streams_cli;
mod video_cli;

use anyhow::Result;
use clap::Parser;

use cli::{Cli, Command, EventsCommand, JobsCommand};

/// jemalloc keeps size classes apart and returns freed pages to the system, so the memory
/// that connection tasks and buffers use while busy is given back once those connections
/// are idle and parked. With glibc's allocator (and with mimalloc, whose pages freed from
/// another thread wait for their owner thread to run again) an idle connection cost
/// 1.5-2.6x its live heap in RSS after a burst of connects; with jemalloc about 1.1x.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
        Command::Streams(command) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(streams_cli::run(command, &mut std::io::stdout().lock()))
        }
        Command::Video(command) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let result = match command {
                video_cli::VideoCommand::Put(args) => runtime
                    .block_on(video_cli::put(&args, &mut std::io::stdout()))
                    .map(|clean| if clean { 0 } else { 1 }),
                video_cli::VideoCommand::Get(args) => {
                    runtime.block_on(video_cli::get(&args)).map(|written| {
                        eprintln!("wrote {written} bytes");
                        0
                    })
                }
            };
            // Do not wait for a blocked read of standard input.
            runtime.shutdown_background();
            match result? {
                0 => Ok(()),
                code => std::process::exit(code),
            }
        }
        Command::Jobs(JobsCommand::Ls(args)) => jobs_cli::ls(&args.data_dir),
        Command::Jobs(JobsCommand::Show(args)) => jobs_cli::show(&args.data.data_dir, &args.job_id),
    }
}
