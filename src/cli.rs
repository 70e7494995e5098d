//! The command line: `loralab run FILE.lua [--set key=value]... [--gpus LIST | --workers N]`,
//! `loralab check FILE.lua [--set key=value]...`, `loralab slurm FILE.lua --tasks N ...`,
//! `loralab status RUN_DIR`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::interrupt;

#[derive(Parser)]
#[command(name = "loralab", version, about = "Fine-tuning experiments as Lua scripts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Lua script (in one process, or in one worker per GPU or per --workers).
    Run {
        /// The script to run.
        script: PathBuf,
        /// A setting for the script, visible as lab.args.KEY and applied by lab.settings{...}.
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
        set: Vec<(String, String)>,
        /// One worker per GPU, e.g. 0,1,2,3 (indices into CUDA_VISIBLE_DEVICES where it is set).
        #[arg(long, value_name = "LIST", conflicts_with_all = ["workers", "worker"])]
        gpus: Option<String>,
        /// N worker processes on the CPU, sharing the script's cells.
        #[arg(long, value_name = "N", conflicts_with = "worker")]
        workers: Option<usize>,
        /// Run as the worker NAME of a launch (set by --gpus, --workers and `loralab slurm`).
        #[arg(long, value_name = "NAME")]
        worker: Option<String>,
    },
    /// Resolve a script's settings and list the cells it would run, which are finished, without
    /// loading a model, training or sampling.
    Check {
        /// The script to check.
        script: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
        set: Vec<(String, String)>,
    },
    /// Submit the script to Slurm as an array of workers sharing its run folder.
    Slurm {
        /// The script to run.
        script: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
        set: Vec<(String, String)>,
        /// Array tasks (workers).
        #[arg(long, value_name = "N")]
        tasks: usize,
        /// GPUs per task (--gres=gpu:N).
        #[arg(long, value_name = "N")]
        gpus_per_task: Option<usize>,
        /// CPUs per task.
        #[arg(long, value_name = "N")]
        cpus_per_task: Option<usize>,
        #[arg(long, value_name = "P")]
        partition: Option<String>,
        /// Time limit per task (Slurm's format, e.g. 04:00:00).
        #[arg(long, value_name = "T")]
        time: Option<String>,
        #[arg(long, value_name = "A")]
        account: Option<String>,
        /// A further sbatch option, written as an #SBATCH line (repeatable), e.g. --sbatch-arg=--mem=64G.
        #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
        sbatch_arg: Vec<String>,
    },
    /// Show every cell of a run folder: finished, running (where, heartbeat), failed, not started.
    /// Exits 0 only when every cell is finished.
    Status {
        /// The run folder.
        dir: PathBuf,
    },
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

/// Parses the command line and runs it; returns the process's exit status.
pub fn run() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    interrupt::install();
    match cli.command {
        Command::Run { script, set, gpus, workers, worker } => {
            if let Some(list) = gpus {
                let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
                let slots = crate::workers::gpu_slots(&list, visible.as_deref(), crate::workers::gpu_count())?;
                return crate::workers::launch(&script, &set, &slots);
            }
            if let Some(n) = workers {
                return crate::workers::launch(&script, &set, &crate::workers::cpu_slots(n)?);
            }
            if let Some(name) = worker {
                crate::cells::set_worker_name(&name);
            }
            crate::lua::run_file(&script, &set)?;
            Ok(0)
        }
        Command::Check { script, set } => {
            crate::lua::check_file(&script, &set)?;
            Ok(0)
        }
        Command::Slurm { script, set, tasks, gpus_per_task, cpus_per_task, partition, time, account, sbatch_arg } => {
            let opts = crate::slurm::SlurmOptions {
                tasks,
                gpus_per_task,
                cpus_per_task,
                partition,
                time,
                account,
                sbatch_args: sbatch_arg,
            };
            crate::slurm::submit(&script, &set, &opts)?;
            Ok(0)
        }
        Command::Status { dir } => {
            let totals = crate::status::print(&dir)?;
            Ok(if totals.cells() > 0 && totals.finished == totals.cells() { 0 } else { 1 })
        }
    }
}
