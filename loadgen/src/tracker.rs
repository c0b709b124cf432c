//! Loss, duplication and reordering, counted from the stamps consumers see.
//!
//! Each consumer owns one [`Tracker`] (no sharing on the receive path). It keeps, per producer,
//! a bitset of the sequences it has seen and the highest one so far. At the end the trackers
//! are compared with what the producers sent ([`Integrity::for_queue`] merges the trackers of
//! competing consumers, [`Integrity::for_subscriber`] checks one topic subscriber alone).
//!
//! Rules:
//! - a sequence seen twice is a duplicate, unless the second copy carries `redelivered:true`,
//!   which a broker may legitimately send after a consumer failed to acknowledge it;
//! - a sequence lower than the highest already seen from the same producer, by the same
//!   consumer, is out of order (FIFO per producer per consumer is what queues and topics promise);
//! - a sequence the producer sent but no consumer saw is lost;
//! - a sequence no producer sent is unexpected (a corrupt stamp or someone else's message).
//!
//! Pure bookkeeping, no clock and no I/O, so its verdicts are unit-tested directly.

use serde::Serialize;

/// Set of u64 sequences, dense from 0, grown on demand.
#[derive(Clone, Debug, Default)]
struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    /// Marks `index`, returning whether it was already marked.
    fn insert(&mut self, index: u64) -> bool {
        let word = (index / 64) as usize;
        if word >= self.words.len() {
            // Doubling keeps growth amortised when sequences arrive in order.
            let new_len = (word + 1).max(self.words.len() * 2);
            self.words.resize(new_len, 0);
        }
        let bit = 1u64 << (index % 64);
        let was = self.words[word] & bit != 0;
        self.words[word] |= bit;
        was
    }

    fn contains(&self, index: u64) -> bool {
        self.words
            .get((index / 64) as usize)
            .is_some_and(|word| word & (1u64 << (index % 64)) != 0)
    }

    /// Number of marked indexes below `limit`.
    fn count_below(&self, limit: u64) -> u64 {
        let full_words = (limit / 64) as usize;
        let mut count: u64 = self
            .words
            .iter()
            .take(full_words)
            .map(|word| u64::from(word.count_ones()))
            .sum();
        let rest = limit % 64;
        if rest > 0 {
            if let Some(word) = self.words.get(full_words) {
                count += u64::from((word & ((1u64 << rest) - 1)).count_ones());
            }
        }
        count
    }

    /// Number of marked indexes at or above `limit`.
    fn count_from(&self, limit: u64) -> u64 {
        let total: u64 = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        total - self.count_below(limit)
    }
}

#[derive(Clone, Debug, Default)]
struct ProducerTrack {
    seen: BitSet,
    /// Highest sequence seen so far, for the order check.
    highest: Option<u64>,
}

/// What one delivery was, as far as the tracker can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// First time this sequence was seen, in order.
    Fresh,
    /// First time seen, but after a higher sequence from the same producer.
    OutOfOrder,
    /// Seen before, without `redelivered:true`.
    Duplicate,
    /// Seen before and flagged `redelivered:true`: allowed.
    Redelivered,
}

/// One consumer's view of every producer's sequence.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    producers: Vec<ProducerTrack>,
    /// Deliveries, all kinds counted.
    pub deliveries: u64,
    pub out_of_order: u64,
    pub duplicates: u64,
    pub redelivered: u64,
    /// Bodies without a stamp: not ours, or cut short.
    pub unstamped: u64,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    pub fn record(&mut self, producer: u32, sequence: u64, redelivered: bool) -> Observation {
        self.deliveries += 1;
        let index = producer as usize;
        if index >= self.producers.len() {
            self.producers
                .resize_with(index + 1, ProducerTrack::default);
        }
        let track = &mut self.producers[index];
        let already_seen = track.seen.insert(sequence);
        let observation = if already_seen {
            if redelivered {
                Observation::Redelivered
            } else {
                Observation::Duplicate
            }
        } else if track.highest.is_some_and(|highest| sequence < highest) {
            Observation::OutOfOrder
        } else {
            Observation::Fresh
        };
        if !already_seen {
            track.highest = Some(track.highest.map_or(sequence, |h| h.max(sequence)));
        }
        match observation {
            Observation::Duplicate => self.duplicates += 1,
            Observation::Redelivered => self.redelivered += 1,
            Observation::OutOfOrder => self.out_of_order += 1,
            Observation::Fresh => {}
        }
        observation
    }

    pub fn record_unstamped(&mut self) {
        self.deliveries += 1;
        self.unstamped += 1;
    }

    /// Distinct sequences seen, all producers.
    pub fn unique(&self) -> u64 {
        self.producers
            .iter()
            .map(|track| track.seen.count_from(0))
            .sum()
    }
}

/// The verdict on a run: zero everywhere but `received` means nothing went wrong.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Integrity {
    /// Messages the producers sent (and the broker accepted), which consumers should all see.
    pub expected: u64,
    /// Distinct expected messages that arrived.
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Redeliveries flagged `redelivered:true`; reported, not an error.
    pub redelivered: u64,
    /// Messages with no stamp or a sequence no producer sent.
    pub unexpected: u64,
}

impl Integrity {
    /// Anything that means the broker lost, invented, duplicated or reordered a message.
    pub fn failed(&self) -> bool {
        self.lost > 0 || self.duplicated > 0 || self.out_of_order > 0 || self.unexpected > 0
    }

    /// Competing consumers on one queue: each expected message should reach exactly one of
    /// them. `sent[p]` is how many messages producer `p` sent (sequences `0..sent[p]`).
    pub fn for_queue(trackers: &[Tracker], sent: &[u64]) -> Integrity {
        let mut integrity = Integrity {
            expected: sent.iter().sum(),
            ..Integrity::default()
        };
        for tracker in trackers {
            integrity.duplicated += tracker.duplicates;
            integrity.out_of_order += tracker.out_of_order;
            integrity.redelivered += tracker.redelivered;
            integrity.unexpected += tracker.unstamped;
            for (producer, track) in tracker.producers.iter().enumerate() {
                let limit = sent.get(producer).copied().unwrap_or(0);
                integrity.unexpected += track.seen.count_from(limit);
            }
        }
        for (producer, &count) in sent.iter().enumerate() {
            let tracks: Vec<&ProducerTrack> = trackers
                .iter()
                .filter_map(|tracker| tracker.producers.get(producer))
                .collect();
            for sequence in 0..count {
                let holders = tracks
                    .iter()
                    .filter(|track| track.seen.contains(sequence))
                    .count() as u64;
                if holders == 0 {
                    integrity.lost += 1;
                } else {
                    integrity.received += 1;
                    // The same message handed to two consumers, neither copy flagged as a
                    // redelivery by the second consumer's tracker: the broker duplicated it.
                    integrity.duplicated += holders - 1;
                }
            }
        }
        integrity
    }

    /// One topic subscriber, which should see every message sent after it subscribed.
    pub fn for_subscriber(tracker: &Tracker, sent: &[u64]) -> Integrity {
        Integrity::for_queue(std::slice::from_ref(tracker), sent)
    }

    /// Adds another subscriber's verdict (topics report the sum over subscribers).
    pub fn add(&mut self, other: &Integrity) {
        self.expected += other.expected;
        self.received += other.received;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.redelivered += other.redelivered;
        self.unexpected += other.unexpected;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(tracker: &mut Tracker, producer: u32, sequences: impl IntoIterator<Item = u64>) {
        for sequence in sequences {
            tracker.record(producer, sequence, false);
        }
    }

    #[test]
    fn clean_run_is_clean() {
        let mut tracker = Tracker::new();
        deliver(&mut tracker, 0, 0..1000);
        deliver(&mut tracker, 1, 0..500);
        let integrity = Integrity::for_subscriber(&tracker, &[1000, 500]);
        assert_eq!(integrity.received, 1500);
        assert!(!integrity.failed(), "{integrity:?}");
    }

    #[test]
    fn a_gap_is_a_loss() {
        let mut tracker = Tracker::new();
        deliver(&mut tracker, 0, (0..100).filter(|s| s % 10 != 3));
        let integrity = Integrity::for_subscriber(&tracker, &[100]);
        assert_eq!(integrity.lost, 10);
        assert_eq!(integrity.out_of_order, 0);
        assert!(integrity.failed());
    }

    #[test]
    fn missing_tail_is_a_loss() {
        let mut tracker = Tracker::new();
        deliver(&mut tracker, 0, 0..90);
        let integrity = Integrity::for_subscriber(&tracker, &[100]);
        assert_eq!(integrity.lost, 10);
    }

    #[test]
    fn a_repeat_is_a_duplicate_unless_flagged_redelivered() {
        let mut tracker = Tracker::new();
        deliver(&mut tracker, 0, 0..10);
        assert_eq!(tracker.record(0, 4, false), Observation::Duplicate);
        assert_eq!(tracker.record(0, 5, true), Observation::Redelivered);
        let integrity = Integrity::for_subscriber(&tracker, &[10]);
        assert_eq!(integrity.duplicated, 1);
        assert_eq!(integrity.redelivered, 1);
        assert_eq!(integrity.lost, 0);
        assert!(integrity.failed());
    }

    #[test]
    fn a_swap_is_out_of_order_but_not_lost() {
        let mut tracker = Tracker::new();
        deliver(&mut tracker, 0, [0, 1, 3, 2, 4]);
        let integrity = Integrity::for_subscriber(&tracker, &[5]);
        assert_eq!(integrity.out_of_order, 1);
        assert_eq!(integrity.lost, 0);
        assert_eq!(integrity.duplicated, 0);
        assert!(integrity.failed());
    }

    #[test]
    fn order_is_per_producer() {
        let mut tracker = Tracker::new();
        tracker.record(0, 5, false);
        assert_eq!(tracker.record(1, 0, false), Observation::Fresh);
    }

    #[test]
    fn competing_consumers_split_without_loss() {
        let mut even = Tracker::new();
        let mut odd = Tracker::new();
        deliver(&mut even, 0, (0..100).step_by(2));
        deliver(&mut odd, 0, (1..100).step_by(2));
        let integrity = Integrity::for_queue(&[even, odd], &[100]);
        assert_eq!(integrity.received, 100);
        assert!(!integrity.failed(), "{integrity:?}");
    }

    #[test]
    fn one_message_at_two_consumers_is_a_duplicate() {
        let mut first = Tracker::new();
        let mut second = Tracker::new();
        deliver(&mut first, 0, 0..10);
        deliver(&mut second, 0, [7]);
        let integrity = Integrity::for_queue(&[first, second], &[10]);
        assert_eq!(integrity.duplicated, 1);
        assert!(integrity.failed());
    }

    #[test]
    fn a_sequence_never_sent_is_unexpected() {
        let mut tracker = Tracker::new();
        deliver(&mut tracker, 0, 0..11);
        tracker.record_unstamped();
        let integrity = Integrity::for_subscriber(&tracker, &[10]);
        assert_eq!(integrity.unexpected, 2);
        assert!(integrity.failed());
    }

    #[test]
    fn bitset_counts_across_word_edges() {
        let mut set = BitSet::default();
        for index in [0, 63, 64, 127, 128, 1000] {
            assert!(!set.insert(index));
        }
        assert!(set.insert(64));
        assert_eq!(set.count_below(64), 2);
        assert_eq!(set.count_below(65), 3);
        assert_eq!(set.count_below(129), 5);
        assert_eq!(set.count_from(128), 2);
        assert_eq!(set.count_from(0), 6);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the broker does to a stream (drop, repeat, shuffle), every expected message
        /// is either received or lost, never both, and a clean verdict means an exact, in-order
        /// copy of what was sent.
        #[test]
        fn accounting_adds_up(
            sent in 0u64..300,
            deliveries in proptest::collection::vec(0u64..320, 0..600),
        ) {
            let mut tracker = Tracker::new();
            for &sequence in &deliveries {
                tracker.record(0, sequence, false);
            }
            let integrity = Integrity::for_subscriber(&tracker, &[sent]);
            prop_assert_eq!(integrity.received + integrity.lost, sent);
            let distinct_in_range = deliveries
                .iter()
                .filter(|&&s| s < sent)
                .collect::<std::collections::BTreeSet<_>>()
                .len() as u64;
            prop_assert_eq!(integrity.received, distinct_in_range);
            let clean = deliveries == (0..sent).collect::<Vec<_>>();
            prop_assert_eq!(!integrity.failed(), clean);
        }

        /// Competing consumers that split a stream between them, each in order, are clean.
        #[test]
        fn any_in_order_split_is_clean(
            owners in proptest::collection::vec(0usize..4, 0..500),
        ) {
            let mut trackers = vec![Tracker::new(); 4];
            for (sequence, &owner) in owners.iter().enumerate() {
                trackers[owner].record(0, sequence as u64, false);
            }
            let integrity = Integrity::for_queue(&trackers, &[owners.len() as u64]);
            prop_assert!(!integrity.failed(), "{:?}", integrity);
            prop_assert_eq!(integrity.received, owners.len() as u64);
        }
    }
}
