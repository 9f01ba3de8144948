//! Included by the test files that write status events (`#[path]`, so the others do not
//! carry it unused).

use tms_store::{StatusEvent, Store, WriteBatch};

/// Writes a batch of status events only.
pub async fn write_status(store: &Store, status: Vec<StatusEvent>) {
    store
        .write_batch(&WriteBatch {
            status,
            ..Default::default()
        })
        .await
        .unwrap();
}
