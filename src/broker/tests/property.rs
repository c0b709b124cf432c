//! Property: for any interleaving of SEND, SUBSCRIBE, UNSUBSCRIBE, ACK, NACK, BEGIN, COMMIT,
//! ABORT and disconnects across several sessions and destinations (and of peer messages between
//! two shards), no queue message is lost or delivered twice without a redelivery mark, each
//! producer's order holds for every subscription's unmarked deliveries, and nothing reaches a
//! subscription after UNSUBSCRIBE. The checks are [`super::simulation::World`]'s.

use proptest::prelude::*;

use super::simulation::{Action, World};
use super::*;

const CLIENTS: usize = 4;

fn action() -> impl Strategy<Value = Action> {
    let client = 0..CLIENTS;
    prop_oneof![
        client.clone().prop_map(|client| Action::Connect { client }),
        (
            client.clone(),
            0..4usize,
            any::<bool>(),
            any::<bool>(),
            proptest::option::weighted(0.2, 500..5000u64)
        )
            .prop_map(|(client, destination, in_tx, receipt, expires_in)| {
                Action::Send {
                    client,
                    destination,
                    in_tx,
                    receipt,
                    expires_in,
                }
            }),
        (client.clone(), 0..4usize, 0..3usize, 1..4u32).prop_map(
            |(client, destination, ack, prefetch)| {
                Action::Subscribe {
                    client,
                    destination,
                    ack,
                    prefetch,
                }
            }
        ),
        (client.clone(), 0..100usize)
            .prop_map(|(client, pick)| Action::Unsubscribe { client, pick }),
        (client.clone(), 0..100usize, any::<bool>(), any::<bool>()).prop_map(
            |(client, pick, in_tx, nack)| Action::Ack {
                client,
                pick,
                in_tx,
                nack
            }
        ),
        client.clone().prop_map(|client| Action::Begin { client }),
        client.clone().prop_map(|client| Action::Commit { client }),
        client.clone().prop_map(|client| Action::Abort { client }),
        (client, any::<bool>())
            .prop_map(|(client, graceful)| Action::Disconnect { client, graceful }),
        (0..10usize, 1..8usize).prop_map(|(link, count)| Action::Pump { link, count }),
        (0..CLIENTS).prop_map(|client| Action::Flush { client }),
        (0..CLIENTS, any::<bool>())
            .prop_map(|(client, writable)| Action::Writable { client, writable }),
        (0..2usize, 0..100usize).prop_map(|(shard, pick)| Action::Durable { shard, pick }),
        Just(Action::Tick),
    ]
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=100000 for a longer hunt.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn interleavings_lose_nothing_and_mark_every_redelivery(
        shards in 1..3u16,
        actions in proptest::collection::vec(action(), 1..120),
    ) {
        let config = BrokerConfig {
            deliveries_max: 3,
            log_enabled: true,
            receipts_wait_for_sync: true,
            ..BrokerConfig::default()
        };
        let mut world = World::new(shards, CLIENTS, config);
        for client in 0..CLIENTS {
            world.apply(&Action::Connect { client });
        }
        for action in &actions {
            world.apply(action);
        }
        world.finish();
    }
}
