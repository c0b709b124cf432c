//! Cross-shard messaging: one bounded single-producer single-consumer queue per ordered pair of
//! shards, and a doorbell that wakes a sleeping target.
//!
//! The queues are `rtrb` ring buffers (wait-free, one cache line of shared state per side, a
//! well-kept crate). The doorbell is an io_uring `MSG_RING` from the sender's ring into the
//! target's, which completes the target's `io_uring_enter` wait without any syscall by the
//! target. A target that is awake drains all its queues at the top of every loop iteration, so
//! it needs no doorbell: it sets `sleeping` just before it waits, and a sender rings only if it
//! is the one that swaps that flag from `true` to `false`. Both sides put a SeqCst fence between
//! their write (push, or setting `sleeping`) and their read (the flag, or the queues), so either
//! the sender sees `sleeping` or the target sees the message (Dekker's pattern).

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicU64, Ordering};

use rtrb::{Consumer, Producer, RingBuffer};

use super::handler::ShardId;

/// What every shard may read about every other.
pub(super) struct ShardShared {
    /// A dup of the shard's ring fd, for MSG_RING; -1 until the ring exists. The dup is closed
    /// only when every shard has finished, so a late doorbell never hits a reused fd.
    pub(super) ring_fd: AtomicI32,
    /// Set by the shard right before it blocks in `io_uring_enter`.
    pub(super) sleeping: AtomicBool,
    pub(super) stats: ShardStats,
}

impl ShardShared {
    pub(super) fn new() -> ShardShared {
        ShardShared {
            ring_fd: AtomicI32::new(-1),
            sleeping: AtomicBool::new(false),
            stats: ShardStats::default(),
        }
    }
}

impl Drop for ShardShared {
    fn drop(&mut self) {
        let fd = *self.ring_fd.get_mut();
        if fd >= 0 {
            // SAFETY: the fd was dup'ed for this struct and nothing else closes it.
            unsafe { libc::close(fd) };
        }
    }
}

/// Counters a shard publishes once per loop iteration, for tests and (later) the admin port.
#[derive(Default)]
pub(super) struct ShardStats {
    pub(super) connections_open: AtomicU64,
    pub(super) connections_accepted: AtomicU64,
    /// Bytes queued for clients and not yet taken by the kernel, over all connections.
    pub(super) out_bytes: AtomicU64,
    /// The largest single connection's out buffer at the last iteration.
    pub(super) out_bytes_conn_max: AtomicU64,
    /// Bytes held in reassembly buffers (frames split across receives, paused input).
    pub(super) reassembly_bytes: AtomicU64,
    pub(super) frames_in: AtomicU64,
    pub(super) peer_msgs_sent: AtomicU64,
    pub(super) peer_msgs_received: AtomicU64,
    pub(super) doorbells_rung: AtomicU64,
    /// Times the shard stopped decoding client input because a peer queue was full.
    pub(super) input_pauses: AtomicU64,
    /// Multishot receives that ended because the buffer ring ran dry (ENOBUFS) and were re-armed.
    pub(super) recv_buffer_exhausted: AtomicU64,
    /// Times a connection used its frame budget for a loop turn and waited for the next.
    pub(super) frame_budget_spent: AtomicU64,
}

/// The sending side of a shard: producers to every other shard, overflow lists, and the
/// targets to ring at the end of this iteration.
pub(super) struct PeerOut<M> {
    shard: ShardId,
    producers: Vec<Option<Producer<M>>>,
    overflow: Vec<VecDeque<M>>,
    /// Messages to this shard itself, delivered on the next iteration.
    pub(super) local: VecDeque<M>,
    to_ring: Vec<bool>,
    pub(super) sent: u64,
}

/// The receiving side of a shard.
pub(super) struct PeerIn<M> {
    pub(super) consumers: Vec<Option<Consumer<M>>>,
}

/// Builds the full mesh for `shards` shards: element `i` is shard `i`'s pair of ends.
pub(super) fn mesh<M>(shards: usize, capacity: usize) -> Vec<(PeerOut<M>, PeerIn<M>)> {
    let mut producers: Vec<Vec<Option<Producer<M>>>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    let mut consumers: Vec<Vec<Option<Consumer<M>>>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (producer, consumer) = RingBuffer::new(capacity);
                producers[from][to] = Some(producer);
                consumers[to][from] = Some(consumer);
            }
        }
    }
    producers
        .into_iter()
        .zip(consumers)
        .enumerate()
        .map(|(shard, (producers, consumers))| {
            (
                PeerOut {
                    shard,
                    producers,
                    overflow: (0..shards).map(|_| VecDeque::new()).collect(),
                    local: VecDeque::new(),
                    to_ring: vec![false; shards],
                    sent: 0,
                },
                PeerIn { consumers },
            )
        })
        .collect()
}

impl<M> PeerOut<M> {
    /// Queues `msg` for `to`; `false` when it had to wait in the overflow list.
    pub(super) fn send(&mut self, to: ShardId, msg: M) -> bool {
        self.sent += 1;
        if to == self.shard {
            self.local.push_back(msg);
            return true;
        }
        // Overflow first keeps the per-pair order.
        if !self.overflow[to].is_empty() {
            self.overflow[to].push_back(msg);
            return false;
        }
        let producer = self.producers[to]
            .as_mut()
            .expect("a producer per other shard");
        match producer.push(msg) {
            Ok(()) => {
                self.to_ring[to] = true;
                true
            }
            Err(rtrb::PushError::Full(msg)) => {
                self.overflow[to].push_back(msg);
                false
            }
        }
    }

    /// Moves what fits from the overflow lists into the queues.
    pub(super) fn flush_overflow(&mut self) {
        for to in 0..self.overflow.len() {
            let Some(producer) = self.producers[to].as_mut() else {
                continue;
            };
            while let Some(msg) = self.overflow[to].pop_front() {
                match producer.push(msg) {
                    Ok(()) => self.to_ring[to] = true,
                    Err(rtrb::PushError::Full(msg)) => {
                        self.overflow[to].push_front(msg);
                        break;
                    }
                }
            }
        }
    }

    /// Whether some queue was full: the shard stops decoding client input until it is not.
    pub(super) fn is_congested(&self) -> bool {
        self.overflow.iter().any(|list| !list.is_empty())
    }

    /// The targets that were sent to since the last call and are asleep, each returned once;
    /// the caller rings their doorbells.
    pub(super) fn take_doorbells(&mut self, shared: &[ShardShared], mut ring: impl FnMut(ShardId)) {
        let mut fenced = false;
        for (to, pending) in self.to_ring.iter_mut().enumerate() {
            if !std::mem::take(pending) {
                continue;
            }
            if !fenced {
                fence(Ordering::SeqCst);
                fenced = true;
            }
            if shared[to].sleeping.swap(false, Ordering::SeqCst) {
                ring(to);
            }
        }
    }

    /// Whether a message to this shard itself is waiting.
    pub(super) fn has_local(&self) -> bool {
        !self.local.is_empty()
    }
}

impl<M> PeerIn<M> {
    pub(super) fn any_waiting(&self) -> bool {
        self.consumers
            .iter()
            .flatten()
            .any(|consumer| !consumer.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_overflows_in_order_and_drains_later() {
        let mut ends = mesh::<u32>(2, 2);
        let (mut out0, _) = ends.remove(0);
        let (_, mut in1) = ends.remove(0);
        for value in 0..5 {
            out0.send(1, value);
        }
        assert!(out0.is_congested());
        let consumer = in1.consumers[0].as_mut().expect("queue from shard 0");
        let mut received = Vec::new();
        while received.len() < 5 {
            while let Ok(value) = consumer.pop() {
                received.push(value);
            }
            out0.flush_overflow();
        }
        assert_eq!(received, vec![0, 1, 2, 3, 4]);
        assert!(!out0.is_congested());
    }

    #[test]
    fn only_a_sleeping_target_gets_a_doorbell_and_only_once() {
        let shared: Vec<ShardShared> = (0..2).map(|_| ShardShared::new()).collect();
        let (mut out0, _) = mesh::<u32>(2, 8).remove(0);
        out0.send(1, 1);
        let mut rung = Vec::new();
        out0.take_doorbells(&shared, |to| rung.push(to));
        assert!(rung.is_empty(), "an awake target drains its queues itself");

        shared[1].sleeping.store(true, Ordering::SeqCst);
        out0.send(1, 2);
        out0.send(1, 3);
        out0.take_doorbells(&shared, |to| rung.push(to));
        out0.send(1, 4);
        out0.take_doorbells(&shared, |to| rung.push(to));
        assert_eq!(rung, vec![1], "one doorbell per sleep");
    }
}
