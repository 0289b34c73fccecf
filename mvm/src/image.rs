//! `mvm pull`, `images`, `rmi`, `load` and `push`: flags in, the engine's image store
//! (`engine::image`) does the work, results printed as Docker prints them.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use engine::image::{self, ImageError};
use rootfs_builder::reference::Reference;
use rootfs_builder::registry::human_size;

use crate::error::{bad_input, from_engine, EXIT_FAILURE};
use crate::output::table;

/// Flags of `mvm pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image to pull: `busybox`, `127.0.0.1:5000/team/app:v1`, `app@sha256:...`.
    pub image: String,
    /// Reach this registry (`host[:port]`) over plain HTTP (local addresses always are).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// Print no progress.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Output format of `mvm images`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON array.
    Json,
}

/// Flags of `mvm images`.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Flags of `mvm rmi`.
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Images to remove (by name, or `name@sha256:...` for every tag of that digest).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
}

/// Flags of `mvm load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// OCI image layout (directory or tar) or docker-archive tar (`docker save` output).
    #[arg(short, long = "input", value_name = "FILE")]
    pub input: PathBuf,
    /// Name for the image (needed when the archive does not name it).
    #[arg(short, long, value_name = "NAME")]
    pub tag: Option<String>,
}

/// Flags of `mvm push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// Stored image to push to the registry its name gives.
    pub image: String,
    /// Reach this registry (`host[:port]`) over plain HTTP (local addresses always are).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// Print no progress.
    #[arg(short, long)]
    pub quiet: bool,
}

fn image_error(e: ImageError) -> anyhow::Error {
    from_engine(e.into())
}

/// `mvm pull`: prints the canonical reference on stdout when done.
pub fn pull(root: &Path, args: &PullArgs) -> anyhow::Result<i32> {
    let reference =
        image::pull(root, &args.image, &args.insecure_registry, args.quiet).map_err(image_error)?;
    outln!("{reference}");
    Ok(0)
}

/// `mvm push`: prints the manifest digest on stdout when done.
pub fn push(root: &Path, args: &PushArgs) -> anyhow::Result<i32> {
    let digest =
        image::push(root, &args.image, &args.insecure_registry, args.quiet).map_err(image_error)?;
    outln!("{digest}");
    Ok(0)
}

/// `mvm images`.
pub fn images(root: &Path, args: &ImagesArgs) -> anyhow::Result<i32> {
    let list = image::list(root).map_err(image_error)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if args.format == Format::Json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|i| {
                serde_json::json!({
                    "reference": i.reference,
                    "repository": i.repository,
                    "tag": i.tag,
                    "digest": i.manifest_digest,
                    "size": i.size,
                    "created": i.created,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let mut rows = vec![["REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED"].map(String::from)];
    for i in &list {
        let digest = i
            .manifest_digest
            .split_once(':')
            .map_or(i.manifest_digest.as_str(), |(_, hex)| hex);
        rows.push([
            i.repository.clone(),
            i.tag.clone().unwrap_or_else(|| "<none>".to_string()),
            format!("sha256:{}", &digest[..digest.len().min(12)]),
            human_size(i.size),
            i.created
                .as_deref()
                .and_then(parse_rfc3339)
                .map_or_else(|| "unknown".to_string(), |t| ago(now, t)),
        ]);
    }
    print!("{}", table(&rows));
    Ok(0)
}

/// `mvm rmi`: untags each image and deletes the blobs (and cached root filesystems) nothing
/// uses any more. Goes on after a failure and exits 1 if any image could not be removed.
pub fn rmi(root: &Path, args: &RmiArgs) -> anyhow::Result<i32> {
    let mut failed = 0;
    for text in &args.images {
        match image::remove(root, text) {
            Ok(removed) => {
                for r in &removed.references {
                    let familiar = Reference::parse(r).map_or_else(|_| r.clone(), |r| r.familiar());
                    outln!("Untagged: {familiar}");
                }
                for digest in &removed.blobs {
                    outln!("Deleted: {digest}");
                }
            }
            Err(e) => {
                eprintln!("mvm: rmi {text}: {:#}", image_error(e));
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 { 0 } else { EXIT_FAILURE })
}

/// `mvm load`: prints `Loaded image: NAME` per name.
pub fn load(root: &Path, args: &LoadArgs) -> anyhow::Result<i32> {
    let loaded = image::load(root, &args.input, args.tag.as_deref()).map_err(|e| {
        if !e.is_bad_input() {
            return image_error(e);
        }
        // Archive parser messages can quote the input: keep one short line per source.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let msg = s.to_string();
            let msg: String = msg.lines().next().unwrap_or("").chars().take(120).collect();
            text.push_str(&format!(": {msg}"));
            source = s.source();
        }
        bad_input(text)
    })?;
    for reference in loaded {
        outln!("Loaded image: {}", reference.familiar());
    }
    Ok(0)
}
/// Seconds since the epoch for an RFC 3339 time (`2024-01-01T00:00:00Z`, `...+02:00`, with or
/// without fractions).
fn parse_rfc3339(text: &str) -> Option<i64> {
    let num = |s: &str| s.parse::<i64>().ok();
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let (y, mo, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let (clock, offset) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, o) = time.split_at(i);
        let (oh, om) = o[1..].split_once(':')?;
        let secs = num(oh)? * 3600 + num(om)? * 60;
        (c, if o.starts_with('-') { -secs } else { secs })
    };
    let clock = clock.split('.').next()?;
    let mut c = clock.split(':');
    let (h, mi, s) = (num(c.next()?)?, num(c.next()?)?, num(c.next()?)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + s - offset)
}

/// `3 days ago`, as Docker words it.
fn ago(now: u64, then: i64) -> String {
    let secs = i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(then);
    if secs < 0 {
        return "in the future".to_string();
    }
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit} ago")
        } else {
            format!("{n} {unit}s ago")
        }
    };
    match secs {
        0..60 => plural(secs, "second"),
        60..3600 => plural(secs / 60, "minute"),
        3600..172_800 => plural(secs / 3600, "hour"),
        172_800..1_209_600 => plural(secs / 86_400, "day"),
        1_209_600..5_184_000 => plural(secs / 604_800, "week"),
        5_184_000..63_072_000 => plural(secs / 2_592_000, "month"),
        _ => plural(secs / 31_536_000, "year"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00Z"), Some(1_704_067_200));
        assert_eq!(
            parse_rfc3339("2024-01-01T02:00:00.123456789+02:00"),
            Some(1_704_067_200)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T12:30:15-01:00"),
            Some(1_709_213_415)
        );
        for bad in ["", "2024-01-01", "2024-13-01T00:00:00Z", "yesterday"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn ages_read_like_dockers() {
        assert_eq!(ago(100, 99), "1 second ago");
        assert_eq!(ago(7200, 0), "2 hours ago");
        assert_eq!(ago(3 * 86_400, 0), "3 days ago");
        assert_eq!(ago(800 * 86_400, 0), "2 years ago");
        assert_eq!(ago(0, 10), "in the future");
    }
}
