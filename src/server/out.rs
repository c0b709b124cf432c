//! One connection's outbound bytes, as a list of chunks handed to `sendmsg` as iovecs.
//!
//! Invariants: at most one send is in flight; the chunks in `in_flight` (and the iovec array and
//! `msghdr` that point into them) are not touched until its completion, because the kernel reads
//! them; new bytes go to `queued` only. Owned chunks hold encoded frame heads and small frames;
//! shared chunks hold stored message bodies ([`Bytes`]), which are sent where they lie. It
//! counts what the kernel took over the connection's life, so the broker can tell which frames
//! of a lost connection never reached the socket.
//!
//! Memory: the owned chunks' capacity (the kept spare included) is counted as it changes, a
//! plain add on the queue itself; the shard brings the memory budget's charge to it with
//! [`OutQueue::sync_charge`] where it already handles the connection's sends, so a frame costs
//! no atomic operation. Shared chunks are charged through their stored message.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Bodies shorter than this are copied into the owned chunk: an extra iovec costs the kernel
/// more than copying a few hundred bytes.
const SHARED_BYTES_MIN: usize = 512;

/// Iovecs per `sendmsg`; the rest waits for the next send. Linux's `UIO_MAXIOV` is 1024.
const IOVECS_PER_SEND_MAX: usize = 256;

/// An owned chunk stops growing at this size and a new one starts, and only chunks up to this
/// capacity are kept for reuse, so an idle connection does not hold a large buffer.
const OWNED_CHUNK_BYTES_MAX: usize = 64 * 1024;

enum Chunk {
    /// Bytes from `start` on are unsent.
    Owned {
        bytes: Vec<u8>,
        start: usize,
    },
    Shared(Bytes),
}

impl Chunk {
    fn remaining(&self) -> &[u8] {
        match self {
            Chunk::Owned { bytes, start } => &bytes[*start..],
            Chunk::Shared(bytes) => bytes,
        }
    }
}

pub(super) struct OutQueue {
    queued: VecDeque<Chunk>,
    in_flight: VecDeque<Chunk>,
    iovecs: Vec<libc::iovec>,
    /// Boxed so its address stays put while the connection table grows.
    msghdr: Box<libc::msghdr>,
    /// Unsent bytes in both lists.
    bytes: usize,
    /// Bytes the kernel has taken so far, over the connection's life.
    sent_total: u64,
    /// An emptied owned chunk kept for the next one, so a busy connection does not allocate
    /// per send.
    spare: Option<Vec<u8>>,
    /// Capacity of the owned chunks in both lists and of `spare`.
    owned_capacity: usize,
    /// `owned_capacity` as last charged to the memory budget.
    charged: u64,
}

impl OutQueue {
    pub(super) fn new() -> OutQueue {
        // SAFETY: msghdr is a plain C struct for which all-zero is the empty value.
        let msghdr: libc::msghdr = unsafe { std::mem::zeroed() };
        OutQueue {
            queued: VecDeque::new(),
            in_flight: VecDeque::new(),
            iovecs: Vec::new(),
            msghdr: Box::new(msghdr),
            bytes: 0,
            sent_total: 0,
            spare: None,
            owned_capacity: 0,
            charged: 0,
        }
    }

    /// Brings `budget`'s charge for this queue to its owned capacity: no atomic operation when
    /// it has not changed since the last call, which is the steady state of a busy connection
    /// (its chunks are reused).
    pub(super) fn sync_charge(&mut self, budget: &crate::broker::MemoryBudget) {
        let now = self.owned_capacity as u64;
        if now > self.charged {
            budget.charge(now - self.charged);
        } else if now < self.charged {
            budget.release(self.charged - now);
        }
        self.charged = now;
    }

    /// Gives back this queue's whole charge, when its connection is released (the queue goes
    /// with it).
    pub(super) fn release_charge(&mut self, budget: &crate::broker::MemoryBudget) {
        budget.release(self.charged);
        self.charged = 0;
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes handed to the kernel over the connection's life: those it took, plus, while a
    /// send is in flight (`send_in_flight`), those offered to it. What lies beyond never
    /// reached the socket.
    pub(super) fn handed_bytes(&self, send_in_flight: bool) -> u64 {
        let offered: usize = if send_in_flight {
            self.in_flight
                .iter()
                .map(|chunk| chunk.remaining().len())
                .sum()
        } else {
            0
        };
        self.sent_total + offered as u64
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Lets `encode` append to the last owned chunk.
    pub(super) fn append_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> usize {
        let reuse = matches!(self.queued.back(), Some(Chunk::Owned { bytes, .. }) if bytes.len() < OWNED_CHUNK_BYTES_MAX);
        if !reuse {
            let bytes = self.spare.take().unwrap_or_default();
            self.queued.push_back(Chunk::Owned { bytes, start: 0 });
        }
        let Some(Chunk::Owned { bytes, .. }) = self.queued.back_mut() else {
            unreachable!("an owned chunk was just ensured at the back");
        };
        let before = bytes.len();
        let capacity_before = bytes.capacity();
        encode(bytes);
        let added = bytes.len() - before;
        self.owned_capacity += bytes.capacity() - capacity_before;
        self.bytes += added;
        added
    }

    pub(super) fn append_shared(&mut self, body: Bytes) -> usize {
        let length = body.len();
        if length < SHARED_BYTES_MIN {
            return self.append_with(|out| out.extend_from_slice(&body));
        }
        self.queued.push_back(Chunk::Shared(body));
        self.bytes += length;
        length
    }

    /// Moves queued chunks behind what is left of the last send and points the `msghdr` at
    /// them. `None` when there is nothing to send. The caller must not call this again, nor
    /// drop the queue, before [`Self::complete`].
    pub(super) fn prepare_send(&mut self) -> Option<*const libc::msghdr> {
        while self.in_flight.len() < IOVECS_PER_SEND_MAX {
            match self.queued.pop_front() {
                Some(chunk) => self.in_flight.push_back(chunk),
                None => break,
            }
        }
        if self.in_flight.is_empty() {
            return None;
        }
        self.iovecs.clear();
        for chunk in &self.in_flight {
            let bytes = chunk.remaining();
            debug_assert!(!bytes.is_empty(), "empty chunks are never queued");
            self.iovecs.push(libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            });
        }
        self.msghdr.msg_iov = self.iovecs.as_mut_ptr();
        self.msghdr.msg_iovlen = self.iovecs.len() as _;
        Some(&*self.msghdr as *const libc::msghdr)
    }

    /// The kernel took `sent` bytes of the send prepared last; what it did not take stays first.
    pub(super) fn complete(&mut self, mut sent: usize) {
        assert!(sent <= self.bytes, "the kernel sent more than was queued");
        self.bytes -= sent;
        self.sent_total += sent as u64;
        while sent > 0 {
            let chunk = self
                .in_flight
                .front_mut()
                .expect("sent bytes lie in in-flight chunks");
            let remaining = chunk.remaining().len();
            if sent < remaining {
                match chunk {
                    Chunk::Owned { start, .. } => *start += sent,
                    Chunk::Shared(bytes) => bytes.advance(sent),
                }
                break;
            }
            sent -= remaining;
            let chunk = self
                .in_flight
                .pop_front()
                .expect("the front chunk was just seen");
            self.retire(chunk);
        }
        // Drop chunks the kernel consumed exactly (the loop above stops at zero).
        while matches!(self.in_flight.front(), Some(chunk) if chunk.remaining().is_empty()) {
            let chunk = self
                .in_flight
                .pop_front()
                .expect("the front chunk was just seen");
            self.retire(chunk);
        }
    }

    /// A chunk leaves the lists: an owned one becomes the spare if there is none and it is
    /// small, else its capacity is no longer held.
    fn retire(&mut self, chunk: Chunk) {
        let Chunk::Owned { mut bytes, .. } = chunk else {
            return;
        };
        if bytes.capacity() <= OWNED_CHUNK_BYTES_MAX && self.spare.is_none() {
            bytes.clear();
            self.spare = Some(bytes);
        } else {
            self.owned_capacity -= bytes.capacity();
        }
    }

    /// Capacity of the owned chunks among `chunks`.
    fn owned_capacity_of<'a>(chunks: impl Iterator<Item = &'a Chunk>) -> usize {
        chunks
            .map(|chunk| match chunk {
                Chunk::Owned { bytes, .. } => bytes.capacity(),
                Chunk::Shared(_) => 0,
            })
            .sum()
    }

    /// Drops what was not handed to the kernel yet (the in-flight part is the kernel's).
    pub(super) fn drop_queued(&mut self) -> usize {
        let dropped: usize = self
            .queued
            .iter()
            .map(|chunk| chunk.remaining().len())
            .sum();
        self.owned_capacity -= Self::owned_capacity_of(self.queued.iter());
        self.queued.clear();
        self.bytes -= dropped;
        dropped
    }

    /// Drops everything; only when no send is in flight.
    pub(super) fn clear(&mut self) -> usize {
        let dropped = self.bytes;
        self.owned_capacity -=
            Self::owned_capacity_of(self.queued.iter().chain(self.in_flight.iter()));
        self.queued.clear();
        self.in_flight.clear();
        self.bytes = 0;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owned capacity counted afresh from the chunks, to check the running count.
    fn owned_capacity_counted(queue: &OutQueue) -> usize {
        OutQueue::owned_capacity_of(queue.queued.iter().chain(queue.in_flight.iter()))
            + queue.spare.as_ref().map_or(0, Vec::capacity)
    }

    /// Sends everything queued, the kernel taking all it is offered.
    fn send_all(queue: &mut OutQueue) {
        while let Some(header) = queue.prepare_send() {
            let offered = prepared_bytes(header).len();
            queue.complete(offered);
        }
    }

    #[test]
    fn the_budget_is_charged_the_owned_capacity_and_gets_it_all_back() {
        let budget = crate::broker::MemoryBudget::new(u64::MAX);
        let mut queue = OutQueue::new();
        // Heads and small bodies are copied into owned chunks; a large body is shared and not
        // counted here (its message carries its charge).
        for _ in 0..100 {
            queue.append_with(|out| out.extend_from_slice(&[b'h'; 200]));
            queue.append_shared(Bytes::from(vec![b's'; 100]));
            queue.append_shared(Bytes::from(vec![b'l'; 4000]));
        }
        assert!(queue.owned_capacity >= 100 * 300);
        assert_eq!(queue.owned_capacity, owned_capacity_counted(&queue));
        queue.sync_charge(&budget);
        assert_eq!(budget.charged(), queue.owned_capacity as u64);

        // Sent: the small chunk is kept as the spare and stays charged.
        send_all(&mut queue);
        assert!(queue.is_empty());
        let spare = queue.spare.as_ref().map_or(0, Vec::capacity);
        assert!(spare > 0, "a small emptied chunk is kept");
        assert_eq!(queue.owned_capacity, spare);
        queue.sync_charge(&budget);
        assert_eq!(budget.charged(), spare as u64);

        // More than one chunk's worth: the chunks past the spare are freed once sent, and the
        // charge follows down.
        for _ in 0..3 {
            queue.append_with(|out| out.extend_from_slice(&vec![b'x'; OWNED_CHUNK_BYTES_MAX]));
        }
        queue.sync_charge(&budget);
        assert!(budget.charged() >= 3 * OWNED_CHUNK_BYTES_MAX as u64);
        send_all(&mut queue);
        queue.sync_charge(&budget);
        assert_eq!(queue.owned_capacity, owned_capacity_counted(&queue));
        assert_eq!(budget.charged(), queue.owned_capacity as u64);
        assert!(budget.charged() <= OWNED_CHUNK_BYTES_MAX as u64);

        // Dropped unsent, then the connection goes: nothing stays charged.
        queue.append_with(|out| out.extend_from_slice(&[b'y'; 5000]));
        queue.prepare_send().expect("bytes are queued");
        queue.append_with(|out| out.extend_from_slice(&[b'z'; 5000]));
        queue.drop_queued();
        queue.clear();
        queue.sync_charge(&budget);
        assert_eq!(queue.owned_capacity, owned_capacity_counted(&queue));
        assert_eq!(budget.charged(), queue.owned_capacity as u64);
        queue.release_charge(&budget);
        assert_eq!(budget.charged(), 0);
    }

    fn gather(queue: &OutQueue) -> Vec<u8> {
        let mut all = Vec::new();
        for chunk in queue.in_flight.iter().chain(queue.queued.iter()) {
            all.extend_from_slice(chunk.remaining());
        }
        all
    }

    // msg_iovlen is usize on glibc and c_int on musl.
    #[allow(clippy::unnecessary_cast)]
    #[test]
    fn short_writes_resume_where_the_kernel_stopped() {
        let mut queue = OutQueue::new();
        queue.append_with(|out| out.extend_from_slice(b"MESSAGE\n\n"));
        let body = Bytes::from(vec![b'x'; 1000]);
        queue.append_shared(body);
        queue.append_with(|out| out.push(0));
        let expected = gather(&queue);
        assert_eq!(queue.bytes(), expected.len());

        let mut sent_total = Vec::new();
        for step in [3usize, 7, 500, 1] {
            let header = queue.prepare_send().expect("bytes are queued");
            // SAFETY: the msghdr points at iovecs the queue keeps alive until `complete`.
            let iovecs = unsafe {
                std::slice::from_raw_parts((*header).msg_iov, (*header).msg_iovlen as usize)
            };
            let mut flat = Vec::new();
            for iovec in iovecs {
                // SAFETY: each iovec points into a chunk held by the queue.
                flat.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(iovec.iov_base as *const u8, iovec.iov_len)
                });
            }
            sent_total.extend_from_slice(&flat[..step]);
            queue.complete(step);
            // New bytes may arrive meanwhile and must go after the unsent rest.
            if step == 7 {
                queue.append_with(|out| out.extend_from_slice(b"\n"));
            }
        }
        while let Some(header) = queue.prepare_send() {
            // SAFETY: as above.
            let length: usize = unsafe {
                std::slice::from_raw_parts((*header).msg_iov, (*header).msg_iovlen as usize)
            }
            .iter()
            .map(|iovec| iovec.iov_len)
            .sum();
            let mut flat = gather(&queue);
            flat.truncate(length);
            sent_total.extend_from_slice(&flat);
            queue.complete(length);
        }
        let mut expected_all = expected;
        expected_all.push(b'\n');
        assert_eq!(sent_total, expected_all);
        assert!(queue.is_empty());
    }

    #[test]
    fn handed_bytes_count_what_the_kernel_took_and_what_it_was_offered() {
        let mut queue = OutQueue::new();
        queue.append_with(|out| out.extend_from_slice(&[b'a'; 100]));
        assert_eq!(queue.handed_bytes(false), 0, "nothing offered yet");
        queue.prepare_send().expect("bytes are queued");
        assert_eq!(
            queue.handed_bytes(true),
            100,
            "offered in the send in flight"
        );
        queue.complete(40);
        // Written meanwhile: not offered until the next send.
        queue.append_shared(Bytes::from(vec![b'b'; 1000]));
        assert_eq!(queue.handed_bytes(false), 40);
        queue.prepare_send().expect("the rest and the new bytes");
        assert_eq!(queue.handed_bytes(true), 1100);
        queue.complete(1060);
        assert_eq!(queue.handed_bytes(false), 1100);
        assert!(queue.is_empty());
    }

    /// What the kernel would send: the bytes the prepared msghdr points at.
    #[allow(clippy::unnecessary_cast)]
    fn prepared_bytes(header: *const libc::msghdr) -> Vec<u8> {
        // SAFETY: the msghdr and its iovecs point into chunks the queue keeps alive.
        let iovecs =
            unsafe { std::slice::from_raw_parts((*header).msg_iov, (*header).msg_iovlen as usize) };
        let mut flat = Vec::new();
        for iovec in iovecs {
            // SAFETY: as above.
            flat.extend_from_slice(unsafe {
                std::slice::from_raw_parts(iovec.iov_base as *const u8, iovec.iov_len)
            });
        }
        flat
    }

    #[derive(Clone, Debug)]
    enum Step {
        Append(Vec<u8>),
        AppendShared(Vec<u8>),
        /// Send, and let the kernel take this fraction (per mille) of what was offered.
        Send(u16),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 1..300).prop_map(Step::Append),
            proptest::collection::vec(any::<u8>(), 1..2000).prop_map(Step::AppendShared),
            (0u16..=1000).prop_map(Step::Send),
        ]
    }

    proptest::proptest! {
        /// Whatever the mix of appends and short writes, the bytes handed to the kernel are
        /// exactly the bytes appended, in order, and the byte count stays exact.
        #[test]
        fn the_kernel_sees_every_byte_once_in_order(steps in proptest::collection::vec(step(), 1..60)) {
            let budget = crate::broker::MemoryBudget::new(u64::MAX);
            let mut queue = OutQueue::new();
            let mut appended = Vec::new();
            let mut sent = Vec::new();
            for step in steps {
                match step {
                    Step::Append(bytes) => {
                        queue.append_with(|out| out.extend_from_slice(&bytes));
                        appended.extend_from_slice(&bytes);
                    }
                    Step::AppendShared(bytes) => {
                        queue.append_shared(Bytes::from(bytes.clone()));
                        appended.extend_from_slice(&bytes);
                    }
                    Step::Send(per_mille) => {
                        if let Some(header) = queue.prepare_send() {
                            let offered = prepared_bytes(header);
                            let taken = offered.len() * usize::from(per_mille) / 1000;
                            sent.extend_from_slice(&offered[..taken]);
                            queue.complete(taken);
                        }
                    }
                }
                proptest::prop_assert_eq!(queue.bytes(), appended.len() - sent.len());
                proptest::prop_assert_eq!(queue.owned_capacity, owned_capacity_counted(&queue));
                queue.sync_charge(&budget);
                proptest::prop_assert_eq!(budget.charged(), queue.owned_capacity as u64);
            }
            while let Some(header) = queue.prepare_send() {
                let offered = prepared_bytes(header);
                sent.extend_from_slice(&offered);
                queue.complete(offered.len());
            }
            proptest::prop_assert_eq!(sent, appended);
            proptest::prop_assert!(queue.is_empty());
            queue.release_charge(&budget);
            proptest::prop_assert_eq!(budget.charged(), 0);
        }
    }
}
