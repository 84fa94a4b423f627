//! One module per command group; each turns parsed arguments into daemon calls and output.

pub mod daemon;
pub mod vm;

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), crate::client::ClientError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| anyhow::anyhow!(e))?;
    println!("{text}");
    Ok(())
}
