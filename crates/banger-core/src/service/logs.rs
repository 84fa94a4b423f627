//! `vm logs`: the serial console from an offset, and why a VM that is not running stopped.

use banger_proto::{ConsoleChunk, VmName};

use super::Manager;
use crate::Error;
use crate::model::has_process;

/// Largest console chunk returned at once.
const CONSOLE_CHUNK: u64 = 1 << 20;

impl Manager {
    /// Serial console output from `offset`.
    pub async fn console(&self, name: &str, offset: u64) -> Result<ConsoleChunk, Error> {
        use std::io::{Read, Seek, SeekFrom};
        let name = VmName::parse(name)?;
        let record = self.observed_vm(&name).await?;
        let path = self.layout.vm_console_log(&record.id);
        let mut data = Vec::new();
        let mut next_offset = offset;
        if let Ok(mut file) = std::fs::File::open(&path) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            // A new boot truncated the file: start over.
            let start = if offset > len { 0 } else { offset };
            file.seek(SeekFrom::Start(start))
                .map_err(Error::io(format!("cannot read {}", path.display())))?;
            file.take(CONSOLE_CHUNK)
                .read_to_end(&mut data)
                .map_err(Error::io(format!("cannot read {}", path.display())))?;
            next_offset = start + data.len() as u64;
        }
        let running = has_process(record.state);
        Ok(ConsoleChunk {
            data: String::from_utf8_lossy(&data).into_owned(),
            next_offset,
            running,
            last_error: record.last_error.filter(|_| !running),
        })
    }
}
