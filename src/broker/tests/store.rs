//! A store for the broker tests: the log's bookkeeping without files. It numbers records as
//! the server's log would position them, hands paged-out messages back, and checks that every
//! logged message is acknowledged at most once, and only while live.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::broker::{
    DiskPressure, MemoryCharge, Message, Paged, Record, Recovered, Scanned, Store, StoreRef,
    StoredAt, TailScan,
};

#[derive(Debug, Default)]
pub(crate) struct TestStore {
    /// Live records by position, in log order.
    pub live: BTreeMap<u64, Arc<Message>>,
    /// Delivered marks per live record, as the log's recovery counts them.
    pub delivered: BTreeMap<u64, u32>,
    next: u64,
    /// What `disk_pressure` answers: tests set it as a log's budget would fill and drain.
    pub disk: DiskPressure,
    /// Messages read back (`load`), and tail scans (`scan`).
    pub loads: u64,
    pub scans: u64,
}

impl TestStore {
    /// Carries out one `Effect::Append`, as the server's store would.
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::Message { message } => {
                self.next += 8;
                message.stored_at.set(StoreRef(self.next));
                // A copy, as the log's bytes are: keeping the message itself would keep its
                // memory charged.
                let copy = Message {
                    id: message.id,
                    destination: message.destination.clone(),
                    header_block: message.header_block.clone(),
                    header_block_plain: message.header_block_plain,
                    body: message.body.clone(),
                    expires_ms: message.expires_ms,
                    persistent: message.persistent,
                    charge: MemoryCharge::none(),
                    stored_at: StoredAt::new(),
                };
                self.live.insert(self.next, Arc::new(copy));
            }
            Record::Ack {
                destination,
                id,
                at,
            } => {
                let at = at.map(|at| at.0).or_else(|| self.find(destination, *id));
                if let Some(at) = at {
                    self.delivered.remove(&at);
                    let removed = self.live.remove(&at);
                    let removed = removed.expect("an ack names a live record");
                    assert_eq!(removed.id, *id, "an ack names its own message's record");
                }
            }
            Record::Delivered {
                destination,
                id,
                at,
            } => {
                // As the server's log: without a position, the mark names the record written
                // earlier in the same pass.
                let at = at.map(|at| at.0).or_else(|| self.find(destination, *id));
                if let Some(at) = at {
                    let marked = self.live.get(&at).expect("a mark names a live record");
                    assert_eq!(marked.id, *id, "a mark names its own message's record");
                    *self.delivered.entry(at).or_insert(0) += 1;
                }
            }
        }
    }

    /// What the log's recovery hands [`crate::broker::Shard::restore`] after a crash with
    /// every record durable: the live messages in log order, as index entries, with their
    /// delivered marks.
    /// What recovery brings back, as the log's does: the live records but transient ones (a
    /// non-persistent message paged out), which a restart forgets, here as there.
    pub fn recovered(&mut self) -> Vec<Recovered> {
        self.live.retain(|_, message| message.persistent);
        self.live
            .iter()
            .map(|(&at, message)| Recovered {
                destination: message.destination.clone(),
                entry: Paged::of(message, StoreRef(at)),
                deliveries: self.delivered.get(&at).copied().unwrap_or(0),
            })
            .collect()
    }

    fn find(&self, destination: &[u8], id: crate::broker::MessageId) -> Option<u64> {
        self.live
            .iter()
            .rev()
            .find(|(_, m)| m.id == id && *m.destination == *destination)
            .map(|(at, _)| *at)
    }
}

impl Store for TestStore {
    fn load(&mut self, destination: &Arc<[u8]>, entry: &Paged) -> Option<Message> {
        self.loads += 1;
        let stored = self.live.get(&entry.at().0)?;
        assert_eq!(stored.id, entry.id(), "a paged entry names its own record");
        let message = stored.moved_to(destination.clone());
        message.stored_at.set(entry.at());
        Some(message)
    }

    fn scan(&mut self, scan: TailScan<'_>) -> Scanned {
        self.scans += 1;
        let mut next = StoreRef(self.next + 8);
        let mut taken = 0;
        for (&at, message) in self.live.range(scan.from.0..) {
            if taken == scan.max {
                next = StoreRef(at);
                break;
            }
            let at = StoreRef(at);
            if message.destination == *scan.destination && !scan.skip.passes_over(at, message.id) {
                scan.out.push(Paged::of(message, at));
                taken += 1;
            }
        }
        Scanned {
            next,
            at_end: taken < scan.max,
        }
    }

    fn disk_pressure(&self) -> DiskPressure {
        self.disk
    }
}
