//! stub
use std::{path::PathBuf, process::ExitCode};
#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    #[arg(long)]
    pub manifests: PathBuf,
}
pub fn run(_args: &CompileArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
