//! What the broker logic reads back from its shard's store: the bodies of messages a queue
//! paged out. Writes still leave as [`super::Effect::Append`] effects, carried out by the
//! server after each call; a read cannot wait for that, so the shard holds its store and a
//! queue calls it in place (the store is a memory-mapped log: a read touches no socket and
//! does not block on more than a page fault).

use std::sync::Arc;

use super::types::{Message, Paged};

/// A shard's store, as the broker sees it.
pub trait Store: Send {
    /// The message whose record `entry` names, on queue `destination`, with its body and
    /// headers, or `None` when it cannot be read (the store says why in its log). A message
    /// is only ever paged out once its record is written, so `None` means damage.
    fn load(&mut self, destination: &Arc<[u8]>, entry: &Paged) -> Option<Message>;
}

/// No store: nothing is logged, so nothing is ever paged out (`--queue-type memory`, tests).
#[derive(Debug, Default)]
pub struct NoStore;

impl Store for NoStore {
    fn load(&mut self, _destination: &Arc<[u8]>, _entry: &Paged) -> Option<Message> {
        None
    }
}

impl<S: Store> Store for Option<S> {
    fn load(&mut self, destination: &Arc<[u8]>, entry: &Paged) -> Option<Message> {
        self.as_mut()?.load(destination, entry)
    }
}
