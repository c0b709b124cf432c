//! Turns a directory of `--json` reports into the markdown comparison table of BENCHMARKS.md.
//!
//! Layout read: `DIR/<case>/<broker>.<repeat>.json`, one report per run, as
//! `benches/compare.sh` writes them. Cases are listed in name order; a leading `NN-` on a case
//! name sets that order and is not shown. Each case gets one row per figure that matters for its
//! workload (throughput for queues and topics, p99 for latency, both rates for a backlog, the
//! connect rate and memory per connection), with each broker's median and [min–max] over its
//! repeats, and the ratio of each broker's median to the baseline broker's. Runs that failed
//! (lost messages, errors) are counted and flagged, never silently averaged in.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;

use serde_json::Value;

/// One figure of one report, and whether higher is better.
struct Figure {
    name: &'static str,
    value: Option<f64>,
    higher_is_better: bool,
}

fn figures(report: &Value) -> Vec<Figure> {
    let number = |path: &[&str]| {
        path.iter()
            .try_fold(report, |value, key| value.get(key))
            .and_then(Value::as_f64)
    };
    let rate = |name, path: &[&str]| Figure {
        name,
        value: number(path),
        higher_is_better: true,
    };
    let latency = |name, key| Figure {
        name,
        value: number(&["latency", key]).map(|us| us / 1000.0),
        higher_is_better: false,
    };
    match report.get("workload").and_then(Value::as_str) {
        Some("queue") if report.get("received").is_some_and(|r| !r.is_null()) => {
            vec![rate("msgs/s", &["received", "msgs_per_s"])]
        }
        Some("queue") => vec![rate("sent msgs/s", &["sent", "msgs_per_s"])],
        Some("topic") => vec![rate("deliveries/s", &["received", "msgs_per_s"])],
        Some("latency") => vec![latency("p50 ms", "p50_us"), latency("p99 ms", "p99_us")],
        Some("pingpong") => vec![latency("p50 ms", "p50_us"), latency("p99 ms", "p99_us")],
        Some("backlog") => vec![
            rate("fill msgs/s", &["sent", "msgs_per_s"]),
            rate("drain msgs/s", &["received", "msgs_per_s"]),
        ],
        Some("connections") => {
            let per_connection = match (
                number(&["broker_rss_kib_before"]),
                number(&["broker_rss_kib_after"]),
                number(&["connections"]),
            ) {
                (Some(before), Some(after), Some(count)) if count > 0.0 => {
                    Some((after - before) / count)
                }
                _ => None,
            };
            vec![
                rate("connects/s", &["connect_per_s"]),
                Figure {
                    name: "KiB RSS/conn",
                    value: per_connection,
                    higher_is_better: false,
                },
            ]
        }
        _ => Vec::new(),
    }
}

/// Reports of one case, per broker, in file-name order.
type Case = BTreeMap<String, Vec<Value>>;

fn read_dir(dir: &Path) -> io::Result<BTreeMap<String, Case>> {
    let mut cases = BTreeMap::new();
    for case_entry in fs::read_dir(dir)? {
        let case_entry = case_entry?;
        if !case_entry.file_type()?.is_dir() {
            continue;
        }
        let case_name = case_entry.file_name().to_string_lossy().into_owned();
        let mut files: Vec<_> = fs::read_dir(case_entry.path())?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        files.sort();
        let case: &mut Case = cases.entry(case_name).or_default();
        for path in files {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let broker = stem.split('.').next().unwrap_or_default().to_string();
            // A run that crashed leaves an empty or partial file: it counts as failed.
            let report = fs::read_to_string(&path)
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or(Value::Null);
            case.entry(broker).or_default().push(report);
        }
    }
    Ok(cases)
}

fn median_min_max(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    };
    Some((median, values[0], values[values.len() - 1]))
}

fn short(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if magnitude >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The markdown table for every case under `dir`, brokers in the order given, ratios against
/// `baseline` (a broker name).
pub fn markdown(dir: &Path, brokers: &[String], baseline: &str) -> io::Result<String> {
    let cases = read_dir(dir)?;
    let mut text = String::new();
    let _ = write!(text, "| case | figure |");
    for broker in brokers {
        let _ = write!(text, " {broker} |");
    }
    for broker in brokers.iter().filter(|b| b.as_str() != baseline) {
        let _ = write!(text, " {broker} / {baseline} |");
    }
    text.push('\n');
    let columns = 2 + brokers.len() * 2 - usize::from(brokers.iter().any(|b| b == baseline));
    let _ = writeln!(text, "|{}", "---|".repeat(columns));
    for (case_name, case) in &cases {
        let Some(first) = case.values().flatten().find(|r| !r.is_null()) else {
            continue;
        };
        let names: Vec<&'static str> = figures(first).iter().map(|f| f.name).collect();
        for (figure_index, figure_name) in names.iter().enumerate() {
            let mut medians: BTreeMap<&str, (f64, bool)> = BTreeMap::new();
            let shown = match case_name.split_once('-') {
                Some((number, rest)) if number.bytes().all(|b| b.is_ascii_digit()) => rest,
                _ => case_name.as_str(),
            };
            let _ = write!(text, "| {shown} | {figure_name} |");
            for broker in brokers {
                let reports = case.get(broker).map(Vec::as_slice).unwrap_or_default();
                let failed = reports
                    .iter()
                    .filter(|r| r.get("ok").and_then(Value::as_bool) != Some(true))
                    .count();
                let mut higher_is_better = true;
                let values: Vec<f64> = reports
                    .iter()
                    .filter(|r| r.get("ok").and_then(Value::as_bool) == Some(true))
                    .filter_map(|r| {
                        let figure = figures(r).into_iter().nth(figure_index)?;
                        higher_is_better = figure.higher_is_better;
                        figure.value
                    })
                    .collect();
                let cell = match median_min_max(values) {
                    Some((median, min, max)) => {
                        medians.insert(broker, (median, higher_is_better));
                        format!("{} [{}–{}]", short(median), short(min), short(max))
                    }
                    None if reports.is_empty() => "not run".to_string(),
                    None => "–".to_string(),
                };
                let flag = if failed > 0 {
                    format!(" ({failed} of {} failed)", reports.len())
                } else {
                    String::new()
                };
                let _ = write!(text, " {cell}{flag} |");
            }
            for broker in brokers.iter().filter(|b| b.as_str() != baseline) {
                let cell = match (medians.get(broker.as_str()), medians.get(baseline)) {
                    (Some(&(value, _)), Some(&(base, _))) if base > 0.0 => {
                        format!("{:.2}×", value / base)
                    }
                    _ => "–".to_string(),
                };
                let _ = write!(text, " {cell} |");
            }
            text.push('\n');
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, case: &str, file: &str, json: &str) {
        fs::create_dir_all(dir.join(case)).unwrap();
        fs::write(dir.join(case).join(file), json).unwrap();
    }

    fn queue(rate: f64, ok: bool) -> String {
        format!(
            r#"{{"workload":"queue","ok":{ok},"received":{{"msgs_per_s":{rate}}},"sent":{{"msgs_per_s":{rate}}}}}"#
        )
    }

    #[test]
    fn medians_spreads_ratios_and_failures() {
        let dir = std::env::temp_dir().join(format!("loadgen-summary-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (repeat, rate) in [(0, 50_000.0), (1, 60_000.0), (2, 40_000.0)] {
            write(
                &dir,
                "03-queue-128",
                &format!("activemq.{repeat}.json"),
                &queue(rate, true),
            );
        }
        write(
            &dir,
            "03-queue-128",
            "stompd.0.json",
            &queue(500_000.0, true),
        );
        write(
            &dir,
            "03-queue-128",
            "stompd.1.json",
            &queue(700_000.0, true),
        );
        write(&dir, "03-queue-128", "stompd.2.json", &queue(1.0, false));
        let table = markdown(
            &dir,
            &["activemq".to_string(), "stompd".to_string()],
            "activemq",
        )
        .unwrap();
        let _ = fs::remove_dir_all(&dir);
        assert!(table.contains("| queue-128 | msgs/s |"), "{table}");
        assert!(table.contains("50k [40k–60k]"), "{table}");
        assert!(
            table.contains("600k [500k–700k] (1 of 3 failed)"),
            "{table}"
        );
        assert!(table.contains("12.00×"), "{table}");
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(
            median_min_max(vec![4.0, 1.0, 3.0, 2.0]),
            Some((2.5, 1.0, 4.0))
        );
    }
}
