//! `stompd-log dump`: every record in log order, with what the shard's acks say about it.

use std::io::Write;

use serde_json::{json, Map, Value};
use stompd::log::inspect::RecordKind;
use stompd::log::{RecordView, ShardInspection};

use crate::cli::{DumpArgs, Format};
use crate::render;
use crate::source::{resolve, ShardSource};

pub fn run(args: &DumpArgs, out: &mut dyn Write) -> anyhow::Result<u8> {
    let mut remaining = args.limit.unwrap_or(u64::MAX);
    for source in resolve(&args.path, args.shard)? {
        if remaining == 0 {
            break;
        }
        let inspection = source.inspect()?;
        for record in inspection.records() {
            if remaining == 0 {
                break;
            }
            if !source.wants(record.position.segment)
                || args.from.is_some_and(|from| record.position < from)
            {
                continue;
            }
            let wanted = match &record.record {
                RecordView::Message(m) => {
                    (args.destination.is_empty()
                        || args
                            .destination
                            .iter()
                            .any(|d| d.as_bytes() == m.destination))
                        && (!args.pending || !inspection.is_acked(record.position))
                }
                RecordView::Ack(_) | RecordView::Delivered(_) => {
                    args.destination.is_empty() && !args.pending
                }
            };
            if !wanted {
                continue;
            }
            remaining -= 1;
            match args.format {
                Format::Text => write_text(out, &source, &inspection, &record, args)?,
                Format::Json => {
                    let object = json_record(&source, &inspection, &record, args);
                    writeln!(out, "{}", Value::Object(object))?;
                }
            }
        }
    }
    Ok(0)
}

fn write_text(
    out: &mut dyn Write,
    source: &ShardSource,
    inspection: &ShardInspection,
    record: &stompd::log::inspect::InspectedRecord<'_>,
    args: &DumpArgs,
) -> std::io::Result<()> {
    let kind = RecordKind::of(&record.record).as_str();
    match &record.record {
        RecordView::Message(m) => {
            let state = if m.is_transient() {
                // Written only to save memory: recovery never restores it.
                "transient".to_string()
            } else if inspection.is_acked(record.position) {
                "acked".to_string()
            } else {
                match inspection.deliveries(record.position) {
                    0 => "pending".to_string(),
                    n => format!("pending, delivered {n}x"),
                }
            };
            writeln!(
                out,
                "{} {} {kind} {} id {} at {} ms ({state})",
                source.name,
                record.position,
                render::text(m.destination),
                render::text(&m.message_id().text()),
                m.timestamp_ms,
            )?;
            for (name, value) in m.headers() {
                writeln!(out, "    {}:{}", render::text(&name), render::text(&value))?;
            }
            writeln!(out, "    body {}", render::body_text(m.body, args.body))
        }
        RecordView::Ack(list) | RecordView::Delivered(list) => {
            let refs: Vec<String> = list.iter().map(|p| p.to_string()).collect();
            writeln!(
                out,
                "{} {} {kind} {}",
                source.name,
                record.position,
                refs.join(" ")
            )
        }
    }
}

fn json_record(
    source: &ShardSource,
    inspection: &ShardInspection,
    record: &stompd::log::inspect::InspectedRecord<'_>,
    args: &DumpArgs,
) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("shard".into(), json!(source.name));
    object.insert("segment".into(), json!(record.position.segment));
    object.insert("offset".into(), json!(record.position.offset));
    object.insert(
        "kind".into(),
        json!(RecordKind::of(&record.record).as_str()),
    );
    match &record.record {
        RecordView::Message(m) => {
            object.insert("destination".into(), render::json_text(m.destination));
            object.insert(
                "message_id".into(),
                render::json_text(&m.message_id().text()),
            );
            object.insert("transient".into(), json!(m.is_transient()));
            object.insert("timestamp_ms".into(), json!(m.timestamp_ms));
            object.insert("acked".into(), json!(inspection.is_acked(record.position)));
            object.insert(
                "deliveries".into(),
                json!(inspection.deliveries(record.position)),
            );
            let headers: Vec<Value> = m
                .headers()
                .map(|(name, value)| json!([render::json_text(&name), render::json_text(&value)]))
                .collect();
            object.insert("headers".into(), Value::Array(headers));
            render::insert_body(&mut object, m.body, args.body);
        }
        RecordView::Ack(list) | RecordView::Delivered(list) => {
            let refs: Vec<Value> = list
                .iter()
                .map(|p| json!({"segment": p.segment, "offset": p.offset}))
                .collect();
            object.insert("refs".into(), Value::Array(refs));
        }
    }
    object
}
