//! [`Db`]: the state database as the daemon's tasks share it. SQLite blocks, so async code
//! never touches the [`Store`] directly: [`Db::run`] runs a closure over it on tokio's
//! blocking pool, and code already on a blocking thread (the DNS lookup) uses
//! [`Db::blocking`]. One connection behind one mutex, held only for the closure: no guard
//! ever lives across an `.await`.

use std::sync::{Arc, Mutex};

use banger_proto::{Image, Kernel};

use crate::Error;
use crate::model::VmRecord;
use crate::store::{BlobRecord, Store};

/// The shared state database (cheap to clone).
#[derive(Debug, Clone)]
pub(crate) struct Db(Arc<Mutex<Store>>);

impl Db {
    pub(crate) fn new(store: Store) -> Self {
        Self(Arc::new(Mutex::new(store)))
    }

    /// Runs `work` over the store on the blocking pool.
    pub(crate) async fn run<T, E>(
        &self,
        work: impl FnOnce(&mut Store) -> Result<T, E> + Send + 'static,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        E: Into<Error> + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.blocking(work))
            .await
            .map_err(|e| Error::Failed(format!("state database task failed: {e}")))?
    }

    /// Runs `work` over the store on this thread, which must be allowed to block.
    pub(crate) fn blocking<T, E: Into<Error>>(
        &self,
        work: impl FnOnce(&mut Store) -> Result<T, E>,
    ) -> Result<T, Error> {
        // A panic while holding the lock cannot leave SQLite half-written (every write is one
        // transaction), so a poisoned lock is safe to take over.
        let mut store = self.0.lock().unwrap_or_else(|p| p.into_inner());
        work(&mut store).map_err(Into::into)
    }

    /// The VM called `name`.
    pub(crate) async fn get_vm(&self, name: &str) -> Result<VmRecord, Error> {
        let name = name.to_owned();
        self.run(move |s| s.get_vm(&name)).await
    }

    /// Every VM.
    pub(crate) async fn list_vms(&self) -> Result<Vec<VmRecord>, Error> {
        self.run(|s| s.list_vms()).await
    }

    /// The VM with id `vm_id`, if any.
    pub(crate) async fn find_vm_by_id(&self, vm_id: &str) -> Result<Option<VmRecord>, Error> {
        let vm_id = vm_id.to_owned();
        self.run(move |s| s.find_vm_by_id(&vm_id)).await
    }

    /// Persists `record`'s state, runtime and last error.
    pub(crate) async fn update_vm(&self, record: &VmRecord) -> Result<(), Error> {
        let record = record.clone();
        self.run(move |s| s.update_vm(&record)).await
    }

    /// Persists `record`'s spec.
    pub(crate) async fn update_spec(&self, record: &VmRecord) -> Result<(), Error> {
        let record = record.clone();
        self.run(move |s| s.update_spec(&record)).await
    }

    /// The image called `name`, if any.
    pub(crate) async fn find_image(&self, name: &str) -> Result<Option<Image>, Error> {
        let name = name.to_owned();
        self.run(move |s| s.find_image(&name)).await
    }

    /// The kernel called `name`, if any.
    pub(crate) async fn find_kernel(&self, name: &str) -> Result<Option<Kernel>, Error> {
        let name = name.to_owned();
        self.run(move |s| s.find_kernel(&name)).await
    }

    /// Records (or replaces) an image.
    pub(crate) async fn put_image(&self, image: &Image) -> Result<(), Error> {
        let image = image.clone();
        self.run(move |s| s.put_image(&image)).await
    }

    /// Records (or replaces) a kernel.
    pub(crate) async fn put_kernel(&self, kernel: &Kernel) -> Result<(), Error> {
        let kernel = kernel.clone();
        self.run(move |s| s.put_kernel(&kernel)).await
    }

    /// Remembers which local file a registry blob is.
    pub(crate) async fn put_blob(&self, blob: BlobRecord) -> Result<(), Error> {
        self.run(move |s| s.put_blob(&blob)).await
    }

    /// The registry blob with `digest`, if remembered.
    pub(crate) async fn blob(&self, digest: &str) -> Result<Option<BlobRecord>, Error> {
        let digest = digest.to_owned();
        self.run(move |s| s.blob(&digest)).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A store closure that blocks leaves the (only) async worker free: the task that
    /// unblocks it gets to run.
    #[tokio::test(flavor = "current_thread")]
    async fn store_work_runs_off_the_async_worker() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::new(Store::open(&dir.path().join("state.db")).unwrap());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let blocked = {
            let db = db.clone();
            tokio::spawn(async move {
                db.run(move |store| {
                    // Bounded, so a regression fails the assertion below instead of hanging.
                    let _ = released.recv_timeout(Duration::from_secs(20));
                    store.list_vms()
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        release.send(()).unwrap();
        assert!(blocked.await.unwrap().unwrap().is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the store closure held the async worker"
        );
        // The lock is free again for the next caller.
        assert!(db.list_vms().await.unwrap().is_empty());
    }
}
