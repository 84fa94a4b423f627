//! One module per command group; each turns parsed arguments into daemon calls and output.

pub mod cp;
pub mod daemon;
pub mod doctor;
pub mod image;
pub mod network;
pub mod vm;
pub mod workspace;

use std::io::IsTerminal;
use std::time::Duration;

/// Prints `value` as pretty JSON on stdout (DEL and C1 escaped too, see [`crate::output::json`]).
pub fn print_json(value: &impl serde::Serialize) -> Result<(), crate::client::ClientError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| anyhow::anyhow!(e))?;
    println!("{}", crate::output::json(text));
    Ok(())
}

/// Runs `work`, showing a spinner with `message` and the elapsed time when stderr is a TTY.
pub async fn with_progress<T>(message: &str, work: impl Future<Output = T>) -> T {
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    let result = work.await;
    bar.finish_and_clear();
    result
}
