//! Tracing set up once per process: one span per request (tracing-actix-web) and per committed
//! batch (the writer), filtered by `RUST_LOG`.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. Returns an error naming `RUST_LOG` when the filter does not
/// parse; a second call (tests start many apps in one process) is a no-op.
pub fn init(filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("RUST_LOG: {e}"))?;
    let _ = fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .compact()
        .try_init();
    Ok(())
}
