//! What a run reports: a line per second while it runs, then one summary, as text for people
//! or as one JSON object (`--json`) for scripts. The JSON field names are part of the tool's
//! interface (`benches/compare.sh` reads them); add fields, do not rename them.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::tracker::Integrity;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// From a histogram of nanoseconds.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Option<Latency> {
        if histogram.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(Latency {
            samples: histogram.len(),
            p50_us: us(histogram.value_at_quantile(0.50)),
            p90_us: us(histogram.value_at_quantile(0.90)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            p99_9_us: us(histogram.value_at_quantile(0.999)),
            max_us: us(histogram.max()),
            mean_us: histogram.mean() / 1000.0,
        })
    }
}

/// A histogram for latencies in ns, from 1 ns to 100 s at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static bounds are valid")
}

/// A rate over a measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rate {
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
}

impl Rate {
    pub fn new(messages: u64, bytes: u64, seconds: f64) -> Rate {
        let per_second = |count: u64| {
            if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            }
        };
        Rate {
            messages,
            bytes,
            seconds,
            msgs_per_s: per_second(messages),
            mb_per_s: per_second(bytes) / 1e6,
        }
    }
}

/// One run's results.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub workload: String,
    /// The flags that shaped the run, as given.
    pub parameters: serde_json::Value,
    /// Negotiated STOMP version and the broker's `server` header.
    pub stomp_version: String,
    pub server: Option<String>,
    /// Whole run, warm-up included.
    pub elapsed_s: f64,
    pub warmup_s: f64,
    /// Producers, after warm-up (for backlog: the fill).
    pub sent: Option<Rate>,
    /// Consumers, after warm-up (for backlog: the drain; for topics: all deliveries).
    pub received: Option<Rate>,
    /// Send to delivery, from the intended send time.
    pub latency: Option<Latency>,
    /// Seconds from the start of the run (before connecting) to the first MESSAGE at any
    /// consumer: with `queue --drain-only` after a restart, how soon a backlog is served.
    pub first_message_s: Option<f64>,
    pub integrity: Option<Integrity>,
    /// Topic: the share of sent messages each subscriber received (1.0 is complete).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_subscriber_completeness: Vec<f64>,
    /// Connections workload: connections opened and subscribed, per second.
    pub connect_per_s: Option<f64>,
    pub connections: Option<u64>,
    /// Client CPU (user and system) in the measured window, after warm-up.
    pub client_cpu_s: f64,
    /// Client CPU over the measured window's wall time; 100 is one core busy.
    pub client_cpu_percent: f64,
    /// Client CPU per message handled (sent plus received), in ns: what the load generator
    /// costs, independent of how fast the broker was.
    pub client_cpu_ns_per_msg: Option<f64>,
    /// Broker CPU in the measured window, with `--broker-pid`.
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_percent: Option<f64>,
    pub broker_rss_kib_before: Option<u64>,
    pub broker_rss_kib_after: Option<u64>,
    /// Anything that went wrong without stopping the run (errors from a thread, timeouts).
    pub errors: Vec<String>,
    /// False when messages were lost, duplicated or reordered, or a thread failed.
    pub ok: bool,
}

impl Report {
    pub fn finish(&mut self) {
        self.ok = self.errors.is_empty() && !self.integrity.as_ref().is_some_and(Integrity::failed);
    }

    /// The one loud line for a failed run, or `None`.
    pub fn failure_line(&self) -> Option<String> {
        if self.ok {
            return None;
        }
        let mut line = String::from("LOADGEN FAILED:");
        if let Some(integrity) = &self.integrity {
            if integrity.failed() {
                let _ = write!(
                    line,
                    " lost {}, duplicated {}, out of order {}, unexpected {} (of {} expected)",
                    integrity.lost,
                    integrity.duplicated,
                    integrity.out_of_order,
                    integrity.unexpected,
                    integrity.expected
                );
            }
        }
        for error in &self.errors {
            let _ = write!(line, "; {error}");
        }
        Some(line)
    }

    /// The text summary.
    pub fn human(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "{} over {:.2} s (warm-up {:.1} s), STOMP {}{}",
            self.workload,
            self.elapsed_s,
            self.warmup_s,
            self.stomp_version,
            self.server
                .as_deref()
                .map(|s| format!(", server {s}"))
                .unwrap_or_default()
        );
        let rate_line = |text: &mut String, name: &str, rate: &Rate| {
            let _ = writeln!(
                text,
                "  {name:<9} {:>12} msgs/s  {:>9.2} MB/s  ({} msgs in {:.2} s)",
                group(rate.msgs_per_s as u64),
                rate.mb_per_s,
                group(rate.messages),
                rate.seconds
            );
        };
        let (sent_name, received_name) = match self.workload.as_str() {
            "backlog" => ("fill", "drain"),
            "topic" => ("sent", "delivered"),
            _ => ("sent", "received"),
        };
        if let Some(rate) = &self.sent {
            rate_line(&mut text, sent_name, rate);
        }
        if let Some(rate) = &self.received {
            rate_line(&mut text, received_name, rate);
        }
        if let (None, Some(seconds)) = (&self.sent, self.first_message_s) {
            let _ = writeln!(text, "  first message {seconds:.3} s after the start");
        }
        if let Some(per_s) = self.connect_per_s {
            let _ = writeln!(
                text,
                "  connections {} at {:.0} connects/s (each with a subscription)",
                self.connections.unwrap_or(0),
                per_s
            );
        }
        if let Some(latency) = &self.latency {
            let _ = writeln!(
                text,
                "  latency   p50 {} p90 {} p99 {} p99.9 {} max {} ({} samples)",
                micros(latency.p50_us),
                micros(latency.p90_us),
                micros(latency.p99_us),
                micros(latency.p99_9_us),
                micros(latency.max_us),
                group(latency.samples)
            );
        }
        if !self.per_subscriber_completeness.is_empty() {
            let min = self
                .per_subscriber_completeness
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min);
            let _ = writeln!(
                text,
                "  subscribers {}: lowest completeness {:.4}%",
                self.per_subscriber_completeness.len(),
                min * 100.0
            );
        }
        if let Some(integrity) = &self.integrity {
            let _ = writeln!(
                text,
                "  integrity received {}/{}, lost {}, duplicated {}, out of order {}, redelivered {}, unexpected {}",
                group(integrity.received),
                group(integrity.expected),
                integrity.lost,
                integrity.duplicated,
                integrity.out_of_order,
                integrity.redelivered,
                integrity.unexpected
            );
        }
        let _ = write!(
            text,
            "  client CPU {:.2} s ({:.0}% of one core)",
            self.client_cpu_s, self.client_cpu_percent
        );
        if let Some(ns) = self.client_cpu_ns_per_msg {
            let _ = write!(text, ", {ns:.0} ns per message handled");
        }
        if let (Some(seconds), Some(percent)) = (self.broker_cpu_s, self.broker_cpu_percent) {
            let _ = write!(text, ", broker CPU {seconds:.2} s ({percent:.0}%)");
        }
        if let (Some(before), Some(after)) = (self.broker_rss_kib_before, self.broker_rss_kib_after)
        {
            let _ = write!(text, ", broker RSS {before} -> {after} KiB");
        }
        text.push('\n');
        text
    }
}

fn micros(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{us:.0}µs")
    }
}

/// 1234567 as "1,234,567".
pub fn group(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The once-a-second display: a bar on a terminal, a plain line on stderr otherwise, nothing
/// with `--quiet`. The bar shows whichever bound is nearer, the message count or the duration.
pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    last: (u64, u64),
    total: u64,
    duration: Duration,
}

/// Steps of the bar: per mille.
const BAR_STEPS: u64 = 1000;

impl Progress {
    pub fn new(total: u64, duration: Duration, quiet: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (terminal && !quiet).then(|| {
            let bar = ProgressBar::with_draw_target(Some(BAR_STEPS), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {percent:>3}% {msg}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            lines: !terminal && !quiet,
            last: (0, 0),
            total: total.max(1),
            duration,
        }
    }

    /// Called once a second with the running totals.
    pub fn tick(&mut self, elapsed: Duration, sent: u64, received: u64) {
        let sent_rate = sent - self.last.0.min(sent);
        let received_rate = received - self.last.1.min(received);
        self.last = (sent, received);
        let message = format!(
            "sent {}/s  received {}/s",
            group(sent_rate),
            group(received_rate)
        );
        if let Some(bar) = &self.bar {
            let by_count = sent.max(received) as f64 / self.total as f64;
            let by_time = elapsed.as_secs_f64() / self.duration.as_secs_f64().max(1e-9);
            bar.set_position((by_count.max(by_time).min(1.0) * BAR_STEPS as f64) as u64);
            // Short enough for an 80-column terminal with the bar.
            bar.set_message(message);
        } else if self.lines {
            eprintln!(
                "[{:>4.0}s] {message}  (total sent {}, received {})",
                elapsed.as_secs_f64(),
                group(sent),
                group(received)
            );
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_digits() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut histogram = latency_histogram();
        for us in 1..=1000u64 {
            histogram.record(us * 1000).unwrap();
        }
        let latency = Latency::from_histogram(&histogram).unwrap();
        assert_eq!(latency.samples, 1000);
        assert!((latency.p50_us - 500.0).abs() < 1.0, "{latency:?}");
        assert!((latency.p99_us - 990.0).abs() < 1.0, "{latency:?}");
        assert!((latency.max_us - 1000.0).abs() < 1.0, "{latency:?}");
    }

    #[test]
    fn integrity_failure_makes_the_report_fail_loudly() {
        let mut report = Report {
            integrity: Some(Integrity {
                expected: 10,
                received: 9,
                lost: 1,
                ..Integrity::default()
            }),
            ..Report::default()
        };
        report.finish();
        assert!(!report.ok);
        assert!(report.failure_line().unwrap().contains("lost 1"));
    }
}
