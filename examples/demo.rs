//! The main job: `cargo run --release --example demo`.
//!
//! A local upstream goes through healthy → rate limited → outage → slow →
//! recovered; the same workload runs through a naive retry loop and through
//! `GuardedClient`; then an axum server with the server stack takes a burst.
//! No external service is needed.

use std::path::PathBuf;
use std::time::Duration;

use apiguard_suite::demo::{Config, run};
use clap::Parser;

/// apiguard demo: a naive client and GuardedClient side by side against an
/// upstream that rate limits, fails, drops connections and slows down.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Length of the client run in seconds; five equal phases (healthy, rate
    /// limited, outage, slow, recovered).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Requests per second each client offers.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// The upstream's limit (requests per second) while it rate limits.
    #[arg(long, default_value_t = 10)]
    limit: u32,
    /// Write a timeline chart (request rates, phases, breaker state) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// No progress lines, only the final table.
    #[arg(long)]
    quiet: bool,
    /// Serve the run's metrics for Prometheus at http://ADDR/metrics (per-host
    /// breaker state, pace, requests by outcome…), and keep serving them
    /// after the run until Ctrl-C.
    #[arg(long, value_name = "ADDR")]
    prometheus: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    if !(args.duration.is_finite()
        && args.duration > 0.0
        && args.rate.is_finite()
        && args.rate > 0.0)
    {
        return Err("--duration and --rate must be positive numbers".into());
    }
    if args.limit == 0 {
        return Err("--limit must be at least 1".into());
    }
    if let Some(addr) = args.prometheus {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| format!("--prometheus {addr}: {e}"))?;
        println!("metrics at http://{addr}/metrics");
    }
    let cfg = Config {
        duration: Duration::from_secs_f64(args.duration),
        rate: args.rate,
        limit: args.limit,
        progress: !args.quiet,
    };
    println!(
        "apiguard demo: {:.0} s, {} req/s offered by each client, upstream limit {} req/s while it rate limits\n",
        args.duration, args.rate, args.limit
    );
    let report = run(cfg).await?;
    println!();
    print!("{}", report.table());
    if let Some(path) = args.plot {
        report.plot(&path).map_err(|e| e.to_string())?;
        println!("\ntimeline written to {}", path.display());
    }
    if let Some(addr) = args.prometheus {
        println!("\nstill serving http://{addr}/metrics; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}
