//! Bad input never hurts anyone else: random frames (any command, headers from a vocabulary of
//! meaningful and malformed values, bodies) from several connections never panic the broker;
//! each connection either keeps going or gets exactly one ERROR and is closed, with nothing
//! written to it afterwards; and a well-behaved pair of clients still exchanges messages.

use proptest::prelude::*;

use super::*;

const NAMES: [&str; 14] = [
    "destination",
    "id",
    "ack",
    "receipt",
    "transaction",
    "accept-version",
    "heart-beat",
    "expires",
    "persistent",
    "prefetch-count",
    "activemq.prefetchSize",
    "message-id",
    "subscription",
    "login",
];

const VALUES: [&str; 16] = [
    "/queue/a",
    "/topic/t",
    "/queue/monitor",
    "",
    "0",
    "1",
    "0.0",
    "1.0",
    "1.2",
    "1.0,1.1,1.2",
    "client",
    "client-individual",
    "auto",
    "tx",
    "10,10",
    "-1",
];

#[derive(Clone, Debug)]
struct HostileFrame {
    connection: usize,
    command: usize,
    headers: Vec<(usize, usize)>,
    body: Vec<u8>,
}

fn hostile_frame() -> impl Strategy<Value = HostileFrame> {
    (
        0..3usize,
        0..Command::ALL.len(),
        proptest::collection::vec((0..NAMES.len(), 0..VALUES.len()), 0..5),
        proptest::collection::vec(any::<u8>(), 0..3),
    )
        .prop_map(|(connection, command, headers, body)| HostileFrame {
            connection,
            command,
            headers,
            body,
        })
}

proptest! {
    #[test]
    fn random_frames_get_an_error_and_a_close_or_are_served(
        frames in proptest::collection::vec(hostile_frame(), 1..60),
    ) {
        let mut cluster = Cluster::new(2, BrokerConfig::default());
        // One connected with 1.2, one with 1.0, one not connected yet.
        let hostile: Vec<ConnectionId> = vec![cluster.connect(0), cluster.open(1), cluster.open(0)];
        cluster.send(hostile[1], frame(Command::Connect, &[], b""));
        cluster.take(hostile[1]);
        let mut closed = [false; 3];
        for hostile_frame in &frames {
            let conn = hostile[hostile_frame.connection];
            let headers: Vec<(&str, &str)> = hostile_frame
                .headers
                .iter()
                .map(|(name, value)| (NAMES[*name], VALUES[*value]))
                .collect();
            let command = Command::ALL[hostile_frame.command];
            cluster.send(conn, frame(command, &headers, &hostile_frame.body));
            let seen = cluster.take(conn);
            if closed[hostile_frame.connection] {
                prop_assert!(seen.is_empty(), "written to after its close: {seen:?}");
                continue;
            }
            let errors = seen
                .iter()
                .filter(|s| matches!(s, Seen::Frame(f) if f.command == Command::Error))
                .count();
            if seen.contains(&Seen::Closed) {
                closed[hostile_frame.connection] = true;
                // A DISCONNECT closes without an ERROR; anything else closes with exactly one,
                // written last before the close.
                if command != Command::Disconnect {
                    prop_assert_eq!(errors, 1, "{:?}", seen);
                    let error_at = seen
                        .iter()
                        .position(|s| matches!(s, Seen::Frame(f) if f.command == Command::Error));
                    prop_assert_eq!(error_at, Some(seen.len() - 2));
                }
                prop_assert_eq!(seen.last(), Some(&Seen::Closed));
            } else {
                prop_assert_eq!(errors, 0, "an ERROR without a close: {:?}", seen);
            }
        }
        // Whatever happened, well-behaved clients are served.
        let consumer = cluster.connect(0);
        cluster.subscribe(consumer, "s", "/queue/fresh", "auto");
        let producer = cluster.connect(1);
        cluster.publish(producer, "/queue/fresh", "still working");
        prop_assert_eq!(bodies(&cluster.frames(consumer)), ["still working"]);
    }
}
