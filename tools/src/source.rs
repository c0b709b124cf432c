//! Turns the DIR (or SEGMENT) an operator names into the shard logs to read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use stompd::log::inspect::shard_number;
use stompd::log::{list_segments, list_shards, ShardInspection};

/// One shard log to read, possibly narrowed to one of its segments.
#[derive(Clone, Debug)]
pub struct ShardSource {
    /// How the output names it: `shard-N`, or the directory's path when it is not named so.
    pub name: String,
    pub dir: PathBuf,
    /// Only this segment (the operator named a segment file).
    pub segment: Option<u64>,
}

impl ShardSource {
    /// Scans the shard (all of it: acks in other segments decide what is pending).
    pub fn inspect(&self) -> anyhow::Result<ShardInspection> {
        ShardInspection::read(&self.dir).with_context(|| format!("reading {}", self.dir.display()))
    }

    /// Whether output about segment `sequence` is wanted.
    pub fn wants(&self, sequence: u64) -> bool {
        self.segment.map_or(true, |only| only == sequence)
    }
}

/// A data directory gives its `shard-N` directories (or just `--shard N`); a directory holding
/// segments, or named `shard-N`, is one shard; a segment file is that segment of its directory.
pub fn resolve(path: &Path, shard: Option<u32>) -> anyhow::Result<Vec<ShardSource>> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if metadata.is_file() {
        let sequence = segment_sequence(path).with_context(|| {
            format!(
                "{} is not named like a segment (20 digits and .seg); its sequence number, which \
                 seeds every record's CRC, comes from that name",
                path.display()
            )
        })?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        return Ok(vec![single(dir, Some(sequence))]);
    }
    let shards = list_shards(path).with_context(|| format!("listing {}", path.display()))?;
    if !shards.is_empty() {
        let selected: Vec<ShardSource> = shards
            .into_iter()
            .filter(|&(n, _)| shard.map_or(true, |wanted| wanted == n))
            .map(|(n, dir)| ShardSource {
                name: format!("shard-{n}"),
                dir,
                segment: None,
            })
            .collect();
        if selected.is_empty() {
            bail!(
                "{} has no shard-{} directory",
                path.display(),
                shard.unwrap_or_default()
            );
        }
        return Ok(selected);
    }
    let has_segments = !list_segments(path)
        .with_context(|| format!("listing {}", path.display()))?
        .is_empty();
    if has_segments || shard_number(path).is_some() {
        if let (Some(wanted), Some(n)) = (shard, shard_number(path)) {
            if wanted != n {
                bail!("{} is shard {n}, not shard {wanted}", path.display());
            }
        }
        return Ok(vec![single(path, None)]);
    }
    bail!(
        "{} holds neither shard-N directories nor segment files (*.seg): is it the broker's \
         --data-dir?",
        path.display()
    )
}

fn single(dir: &Path, segment: Option<u64>) -> ShardSource {
    let name = match shard_number(dir) {
        Some(n) => format!("shard-{n}"),
        None => dir.display().to_string(),
    };
    ShardSource {
        name,
        dir: dir.to_owned(),
        segment,
    }
}

fn segment_sequence(path: &Path) -> Option<u64> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".seg")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}
