//! The `latchkey` binary: parse the command line, run it, exit non-zero with a one-line
//! reason on failure.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    // One JSON object per line for log collectors; text for people otherwise.
    if std::env::var("LATCHKEY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    match latchkey::cli::run(latchkey::cli::Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `check`: denied, as printed.
        Err(e) if e.is::<latchkey::cli::Denied>() => std::process::ExitCode::from(1),
        Err(e) => {
            // The contract: a one-line reason; exit 2 (`check` tells 1, denied, apart).
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::from(2)
        }
    }
}
