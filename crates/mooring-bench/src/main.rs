//! `mooring-bench`: the benchmark binary; the same thing as `mooring bench`.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "mooring-bench",
    about = "Benchmarks the mooring server against a private Mosquitto on loopback"
)]
struct Cli {
    #[command(flatten)]
    args: mooring_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mooring_bench::run(Cli::parse().args).await
}
