//! The shard's provided buffer ring: the memory multishot receives land in.
//!
//! The kernel picks a buffer from the ring for each receive; the CQE names the buffer id. With
//! incremental consumption (`IOU_PBUF_RING_INC`, Linux 6.12) many receives share one buffer, each
//! starting where the last one stopped, and the CQE flag `BUF_MORE` says the kernel keeps the
//! buffer; without it every receive uses up a whole buffer. Either way a buffer goes back to the
//! ring only once the kernel is done with it and the loop has processed (or copied) its bytes;
//! the recycled ids are published with one release-store of the tail per completion batch.
//!
//! Only the ring array is pinned kernel-side (one page for 256 entries); the buffers are
//! ordinary memory, so RLIMIT_MEMLOCK does not bound their size.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// `IOU_PBUF_RING_INC` from the kernel's uapi header (the crate keeps its bindings private).
const PBUF_RING_INC: u16 = 2;

/// Anonymous memory mapping, page-aligned as the ring array must be.
struct Mapping {
    base: NonNull<u8>,
    bytes: usize,
}

impl Mapping {
    fn new(bytes: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping has no preconditions.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            base: NonNull::new(base.cast()).expect("mmap never returns null on success"),
            bytes,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base and bytes are what mmap returned and were given.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

pub(super) struct BufRing {
    ring: Mapping,
    buffers: Mapping,
    buffer_bytes: usize,
    count: u16,
    /// The tail as we have written it; published by [`Self::commit`].
    tail: u16,
    published_tail: u16,
    /// Per buffer, where the next receive into it starts (always 0 without `incremental`).
    offsets: Vec<u32>,
    pub(super) incremental: bool,
    pub(super) group: u16,
}

impl BufRing {
    /// Registers `count` buffers of `buffer_bytes` as group `group`, with incremental
    /// consumption when the kernel has it. `count` must be a power of two up to 32768.
    pub(super) fn register(
        submitter: &Submitter<'_>,
        group: u16,
        count: u16,
        buffer_bytes: usize,
    ) -> io::Result<BufRing> {
        assert!(count.is_power_of_two(), "ring entries are a power of two");
        assert!(buffer_bytes > 0 && buffer_bytes <= u32::MAX as usize);
        let ring = Mapping::new(usize::from(count) * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(usize::from(count) * buffer_bytes)?;
        let address = ring.base.as_ptr() as u64;
        // SAFETY: the ring memory is page-aligned, zeroed, sized for `count` entries and outlives
        // the registration (the ring fd is closed before `BufRing` is dropped, see shard.rs).
        let incremental = match unsafe {
            submitter.register_buf_ring_with_flags(address, count, group, PBUF_RING_INC)
        } {
            Ok(()) => true,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                // SAFETY: as above.
                unsafe { submitter.register_buf_ring_with_flags(address, count, group, 0) }?;
                tracing::info!(
                        "buffer ring without incremental consumption (IOU_PBUF_RING_INC needs Linux 6.12): every receive uses a whole buffer"
                    );
                false
            }
            Err(error) => return Err(error),
        };
        let mut buf_ring = BufRing {
            ring,
            buffers,
            buffer_bytes,
            count,
            tail: 0,
            published_tail: 0,
            offsets: vec![0; usize::from(count)],
            incremental,
            group,
        };
        for id in 0..count {
            buf_ring.push(id);
        }
        buf_ring.commit();
        Ok(buf_ring)
    }

    fn entries(&self) -> *mut BufRingEntry {
        self.ring.base.as_ptr().cast()
    }

    fn push(&mut self, id: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        // SAFETY: index < count, and the kernel does not read entries at or past the published
        // tail, so this one is ours to write.
        let entry = unsafe { &mut *self.entries().add(index) };
        // SAFETY: id < count, so the buffer lies inside the mapping.
        let address = unsafe {
            self.buffers
                .base
                .as_ptr()
                .add(usize::from(id) * self.buffer_bytes)
        };
        entry.set_addr(address as u64);
        entry.set_len(self.buffer_bytes as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
    }

    /// The bytes one receive completion delivered into buffer `id`.
    ///
    /// # Safety
    /// `id` and `length` must come from a receive CQE of this ring's group, taken in CQE order;
    /// the slice must not be used after [`Self::commit`], when the kernel may reuse the buffer.
    pub(super) unsafe fn take<'b>(
        &mut self,
        id: u16,
        length: usize,
        kernel_keeps: bool,
    ) -> &'b [u8] {
        let offset = self.offsets[usize::from(id)] as usize;
        assert!(
            offset + length <= self.buffer_bytes,
            "a receive cannot overrun its buffer"
        );
        let bytes = std::slice::from_raw_parts(
            self.buffers
                .base
                .as_ptr()
                .add(usize::from(id) * self.buffer_bytes + offset),
            length,
        );
        if self.incremental && kernel_keeps {
            self.offsets[usize::from(id)] = (offset + length) as u32;
        } else {
            self.offsets[usize::from(id)] = 0;
            self.push(id);
        }
        bytes
    }

    /// A buffer the kernel gave up without data in it for us (it finished the buffer in a CQE
    /// that carried no bytes).
    pub(super) fn recycle(&mut self, id: u16) {
        self.offsets[usize::from(id)] = 0;
        self.push(id);
    }

    /// Publishes recycled buffers to the kernel.
    pub(super) fn commit(&mut self) {
        if self.tail == self.published_tail {
            return;
        }
        // SAFETY: the tail field overlays entry 0's `resv` and is only ever written by us; the
        // kernel reads it with acquire semantics, so the entry writes above are visible first.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
        self.published_tail = self.tail;
    }
}
