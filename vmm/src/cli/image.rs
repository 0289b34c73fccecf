//! Image commands over the store in `<root>/images`: `mvm pull`, `images`, `rmi`, `load` and
//! `push`, and [`image_rootfs`], which `mvm run --image` uses to turn a reference into an
//! unpacked root filesystem (pulling it first when it is not stored, as `docker run` does).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use rootfs_builder::load::LoadError;
use rootfs_builder::reference::Reference;
use rootfs_builder::registry::{self, human_size, PullOptions};
use rootfs_builder::rootfs;
use rootfs_builder::store::{Image, Store, StoreError};
use rootfs_builder::unpack::LayerMediaType;

use super::bad_input;

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

fn parse_reference(text: &str) -> anyhow::Result<Reference> {
    Reference::parse(text).map_err(|e| bad_input(e.to_string()))
}

fn open_store(root: &Path) -> anyhow::Result<Store> {
    Ok(Store::open(root)?)
}

/// Where unpacked root filesystems are cached, one directory per manifest digest. Absolute, as
/// overlay lower directories must be.
pub fn rootfs_cache(root: &Path) -> PathBuf {
    std::path::absolute(root)
        .unwrap_or_else(|_| root.to_path_buf())
        .join("cache/rootfs")
}

/// The cache key of a manifest digest: `sha256-<hex>` (overlay options cannot hold a `:`).
fn rootfs_key(digest: &str) -> String {
    digest.replace(':', "-")
}

/// Registry options from the `--insecure-registry` and `--quiet` flags of pull and push.
fn registry_options(insecure: &[String], quiet: bool) -> PullOptions {
    PullOptions {
        insecure_registries: insecure.to_vec(),
        progress: !quiet,
        ..Default::default()
    }
}

/// `mvm pull`: prints the canonical reference on stdout when done.
pub fn pull(root: &Path, args: &PullArgs) -> anyhow::Result<i32> {
    let reference = parse_reference(&args.image)?;
    let store = open_store(root)?;
    let opts = registry_options(&args.insecure_registry, args.quiet);
    registry::pull(&store, &reference, &opts)
        .with_context(|| format!("pull {}", reference.familiar()))?;
    outln!("{reference}");
    Ok(0)
}

/// `mvm push`: prints the manifest digest on stdout when done.
pub fn push(root: &Path, args: &PushArgs) -> anyhow::Result<i32> {
    let reference = parse_reference(&args.image)?;
    let store = open_store(root)?;
    let opts = registry_options(&args.insecure_registry, args.quiet);
    let digest = registry::push(&store, &reference, &opts)
        .with_context(|| format!("push {}", reference.familiar()))?;
    outln!("{digest}");
    Ok(0)
}

/// `mvm images`.
pub fn images(root: &Path, args: &ImagesArgs) -> anyhow::Result<i32> {
    let store = open_store(root)?;
    let list = store.list()?;
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
    let mut rows = vec![[
        "REPOSITORY".to_string(),
        "TAG".to_string(),
        "DIGEST".to_string(),
        "SIZE".to_string(),
        "CREATED".to_string(),
    ]];
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
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        outln!("{}", line.join("   ").trim_end());
    }
    Ok(0)
}

/// `mvm rmi`: untags each image and deletes the blobs (and cached root filesystems) nothing
/// uses any more. Goes on after a failure and exits 1 if any image could not be removed.
pub fn rmi(root: &Path, args: &RmiArgs) -> anyhow::Result<i32> {
    let store = open_store(root)?;
    let mut failed = 0;
    for text in &args.images {
        let result = parse_reference(text).and_then(|r| Ok(store.remove(&r)?));
        match result {
            Ok(removed) => {
                for r in &removed.references {
                    let familiar = Reference::parse(r).map_or_else(|_| r.clone(), |r| r.familiar());
                    outln!("Untagged: {familiar}");
                }
                for digest in &removed.blobs {
                    outln!("Deleted: {digest}");
                    // Only manifest digests have cached root filesystems; others are no-ops.
                    if let Err(e) =
                        rootfs::remove_rootfs(&rootfs_cache(root), &rootfs_key(digest.as_str()))
                    {
                        log::warn!("{e:#}");
                    }
                    let disk = rootfs_builder::disk::rootfs_disk_path(
                        &super::run_vm::disk_cache(root),
                        &rootfs_key(digest.as_str()),
                        rootfs_builder::disk::DiskFormat::Ext4,
                    );
                    if let Err(e) = std::fs::remove_file(&disk) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            log::warn!("cannot remove {}: {e}", disk.display());
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("mvm: rmi {text}: {e:#}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 { 0 } else { super::EXIT_FAILURE })
}

/// `mvm load`: prints `Loaded image: NAME` per name.
pub fn load(root: &Path, args: &LoadArgs) -> anyhow::Result<i32> {
    let store = open_store(root)?;
    let loaded = rootfs_builder::load::load(&store, &args.input, args.tag.as_deref()).map_err(
        |e| match e {
            LoadError::Io { .. } | LoadError::Store(_) => anyhow::Error::new(e),
            other => {
                let mut text = format!("load {}: {other}", args.input.display());
                let mut source = std::error::Error::source(&other);
                while let Some(s) = source {
                    // Archive parser messages can quote the input: keep one short line.
                    let msg = s.to_string();
                    let msg: String = msg.lines().next().unwrap_or("").chars().take(120).collect();
                    text.push_str(&format!(": {msg}"));
                    source = s.source();
                }
                bad_input(text)
            }
        },
    )?;
    for image in loaded {
        outln!("Loaded image: {}", image.reference.familiar());
    }
    Ok(0)
}

/// The image `text` from the store, pulled first when it is not there.
pub fn find_or_pull(root: &Path, text: &str) -> anyhow::Result<Image> {
    let reference = parse_reference(text)?;
    let store = open_store(root)?;
    match store.resolve(&reference) {
        Ok(image) => Ok(image),
        Err(StoreError::NotFound(_)) => {
            eprintln!("Unable to find image '{}' locally", reference.familiar());
            let opts = PullOptions {
                progress: true,
                ..Default::default()
            };
            Ok(registry::pull(&store, &reference, &opts)
                .with_context(|| format!("pull {}", reference.familiar()))?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The unpacked root filesystem of `image`, cached by manifest digest under `<root>/cache/rootfs`.
pub fn image_rootfs(root: &Path, image: &Image) -> anyhow::Result<PathBuf> {
    let store = open_store(root)?;
    let layers = image
        .layers
        .iter()
        .map(|l| {
            Ok((
                store.blob_path(&l.digest),
                LayerMediaType::parse(&l.media_type)?,
            ))
        })
        .collect::<Result<Vec<_>, rootfs_builder::unpack::UnpackError>>()?;
    Ok(rootfs::prepare_rootfs(
        &layers,
        &rootfs_cache(root),
        &rootfs_key(&image.manifest_digest),
    )?)
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
