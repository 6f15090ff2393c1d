//! Per-stream command serialisation inside one process: commands to the same
//! aggregate queue behind each other instead of racing to a version conflict.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use tokio::sync::{Mutex, MutexGuard};

/// A fixed set of mutexes; a stream maps to one by hash. Unrelated streams may
/// share a stripe, which only costs a little waiting, never correctness.
pub struct StreamLocks {
    stripes: Vec<Mutex<()>>,
}

impl StreamLocks {
    pub fn new(stripes: usize) -> Self {
        Self {
            stripes: (0..stripes.max(1)).map(|_| Mutex::new(())).collect(),
        }
    }

    pub async fn lock(&self, stream_type: &str, stream_id: &str) -> MutexGuard<'_, ()> {
        let mut hasher = DefaultHasher::new();
        (stream_type, stream_id).hash(&mut hasher);
        let index = (hasher.finish() % self.stripes.len() as u64) as usize;
        self.stripes[index].lock().await
    }
}

impl Default for StreamLocks {
    fn default() -> Self {
        Self::new(1024)
    }
}
