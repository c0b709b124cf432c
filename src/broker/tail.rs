//! A queue's tail: the newest part of a backlog, kept only as records in the shard's store.
//!
//! Paging bodies out ([`super::destination`]'s `page_out`) makes a backlog cost memory per
//! message, not per byte; a tail makes it cost nothing per message. While the broker's memory
//! is past the paging level and a queue already has a head of waiting entries, each message
//! that arrives is appended to the store and counted here instead of entering the queue's
//! `ready` list; as consumers drain the head, the queue reads the tail back in batches
//! ([`Tail::read`]) by scanning the store from where the last batch ended (ActiveMQ's store
//! cursor does the same over KahaDB). After a restart every queue's undelivered messages form
//! its tail, so memory after recovery does not depend on the backlog either.
//!
//! Invariants:
//! - the members are exactly the live records of the queue from `from` on, but those in
//!   `skip`, plus the members in `fresh` not written yet; `count` and `bytes` are theirs;
//! - every member arrived after every message in the queue's `ready` list: a message goes to
//!   the tail only while one exists or when it starts one, and members come back in store
//!   order, which is arrival order (the store writes records in the order they are appended);
//! - `from` is known once the first member's record is written; until then `fresh` holds that
//!   member, so nothing the queue appended for another reason before it can be taken for one.

use std::collections::VecDeque;
use std::sync::Arc;

use super::store::{Skip, Store, TailScan};
use super::types::{ConnectionId, Message, MessageId, Paged, StoreRef};

/// How many index entries one read brings back: a batch is a few tens of KiB of memory per
/// queue, and one scan of the store per batch. Small in the broker's own tests, so that their
/// few messages make tails, and reads, and ends of tails.
#[cfg(not(test))]
pub(crate) const READ_ENTRIES: usize = 1024;
#[cfg(test)]
pub(crate) const READ_ENTRIES: usize = 16;

/// A member whose record may not be written yet, with its sender (told if the write fails).
type Fresh = (Arc<Message>, Option<ConnectionId>);

/// A tail's members as the tests see them: `written` live records of the queue from `from`
/// on but those skipped, then `unwritten`.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct TailSpan {
    pub from: Option<StoreRef>,
    pub written: u64,
    pub skip: Skip,
    pub unwritten: Vec<Arc<Message>>,
}

#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Where the next scan starts; `None` until the first member's record is written.
    from: Option<StoreRef>,
    /// Members not read back yet.
    count: u64,
    /// Their body bytes, for `queue_bytes_max`.
    bytes: u64,
    /// Members appended whose records were not known to be written when last looked at,
    /// oldest first (written ones leave from the front). Held only until the store's pass
    /// writes them, so a few at a time.
    fresh: VecDeque<Fresh>,
    /// Live records of the queue at or after `from` that are not members (see [`Skip`]).
    skip: Skip,
}

impl Tail {
    /// A message arrived while the tail exists or starts one: its record was appended (or is
    /// on its way) and is all the queue keeps of it.
    pub(crate) fn push(&mut self, message: Arc<Message>, origin: Option<ConnectionId>) {
        self.count += 1;
        self.bytes += message.body.len() as u64;
        self.fresh.push_back((message, origin));
        self.settle();
    }

    /// A member found by recovery, in store order.
    pub(crate) fn restore(&mut self, entry: &Paged) {
        self.from.get_or_insert(entry.at());
        self.count += 1;
        self.bytes += u64::from(entry.body_bytes);
    }

    /// A live record of the queue that recovery put in the head: passed over if it lies in
    /// the tail's range.
    pub(crate) fn skip(&mut self, at: StoreRef) {
        if self.from.is_some_and(|from| at > from) {
            self.skip.at.insert(at);
        }
    }

    /// A message the queue holds in memory was logged again (handed back unwritten): its new
    /// record lands among the tail's, and is passed over.
    pub(crate) fn skip_id(&mut self, id: MessageId) {
        self.skip.ids.insert(id);
    }

    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes a member whose record could not be written (the store reported it), so that the
    /// queue does not wait for it; returns its sender when known.
    pub(crate) fn forget(&mut self, id: MessageId) -> Option<Option<ConnectionId>> {
        let index = self
            .fresh
            .iter()
            .position(|(message, _)| message.id == id)?;
        let (message, origin) = self.fresh.remove(index)?;
        self.count -= 1;
        self.bytes -= message.body.len() as u64;
        Some(origin)
    }

    /// Where the members are, for the tests' invariant checks.
    #[cfg(test)]
    pub(crate) fn span(&self) -> TailSpan {
        let unwritten: Vec<Arc<Message>> = self
            .fresh
            .iter()
            .filter(|(m, _)| m.stored_at.get().is_none())
            .map(|(m, _)| m.clone())
            .collect();
        TailSpan {
            from: self
                .from
                .or_else(|| self.fresh.front().and_then(|(m, _)| m.stored_at.get())),
            written: self.count - unwritten.len() as u64,
            skip: self.skip.clone(),
            unwritten,
        }
    }

    /// Learns where the first member's record went, and lets go of members written since.
    fn settle(&mut self) {
        if self.from.is_none() {
            let Some(at) = self.fresh.front().and_then(|(m, _)| m.stored_at.get()) else {
                return;
            };
            self.from = Some(at);
        }
        while self
            .fresh
            .front()
            .is_some_and(|(m, _)| m.stored_at.get().is_some())
        {
            self.fresh.pop_front();
        }
    }

    /// Reads up to `max` members back from `store`, oldest first, as index entries into
    /// `out`. Returns `Some` when the tail is over: every member is read, or the scan reached
    /// the store's end and the members left are those whose records are not written yet,
    /// returned to be held in memory (they are the newest messages of the queue).
    pub(crate) fn read(
        &mut self,
        store: &mut dyn Store,
        name: &Arc<[u8]>,
        max: usize,
        out: &mut Vec<Paged>,
    ) -> Option<Vec<Fresh>> {
        self.settle();
        if let Some(from) = self.from {
            let before = out.len();
            let wanted = max.min(usize::try_from(self.count).unwrap_or(usize::MAX));
            let scanned = store.scan(TailScan {
                destination: name,
                from,
                skip: &mut self.skip,
                max: wanted,
                out,
            });
            for entry in &out[before..] {
                self.count -= 1;
                self.bytes -= u64::from(entry.body_bytes);
            }
            self.from = Some(scanned.next);
            self.skip.at = self.skip.at.split_off(&scanned.next);
            if self.count == 0 {
                return Some(Vec::new());
            }
            if !scanned.at_end {
                return None;
            }
        }
        Some(self.unwritten())
    }

    /// The scan found every written member: the rest are in `fresh`, not written yet.
    fn unwritten(&mut self) -> Vec<Fresh> {
        let left: Vec<Fresh> = std::mem::take(&mut self.fresh)
            .into_iter()
            .filter(|(m, _)| m.stored_at.get().is_none())
            .collect();
        if left.len() as u64 != self.count {
            tracing::warn!(
                members = self.count,
                found = left.len(),
                "a queue's tail lost track of its records; the missing ones are dropped"
            );
        }
        left
    }
}
