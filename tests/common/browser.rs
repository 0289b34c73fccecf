//! A real browser for tests: Debian's `chromium`, headless, run as root without its sandbox, with
//! a new empty profile and nothing that reaches the network on its own; and a small PNG reader
//! for its screenshots.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Chromium's flags for a headless run as root that stays off the network.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// The browser, or None (with the reason printed) where it is not installed.
pub fn chromium() -> Option<&'static str> {
    let ok = Command::new("chromium")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: no chromium (scripts/deps.sh installs it)");
        return None;
    }
    Some("chromium")
}

/// Runs chromium on `page` with `args`, a new empty profile in `scratch` and a time limit.
fn run(page: &Path, scratch: &Path, args: &[String]) -> Output {
    let profile = scratch.join(format!("profile-{}", args.len()));
    std::fs::create_dir_all(&profile).expect("profile dir");
    let out = Command::new("timeout")
        .arg("300")
        .arg("chromium")
        .args(FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The page's DOM after the browser parsed it.
pub fn dump_dom(page: &Path, scratch: &Path) -> String {
    String::from_utf8_lossy(&run(page, scratch, &["--dump-dom".into()]).stdout).into_owned()
}

/// A screenshot of the page's first `width` x `height` pixels.
pub fn screenshot(page: &Path, scratch: &Path, width: u32, height: u32) -> Image {
    let png = scratch.join("screenshot.png");
    run(
        page,
        scratch,
        &[
            format!("--window-size={width},{height}"),
            format!("--screenshot={}", png.display()),
        ],
    );
    decode_png(&std::fs::read(&png).expect("read the screenshot"))
}

/// Decoded pixels, RGB.
#[derive(Debug)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// `width * height` pixels, row by row.
    pub pixels: Vec<[u8; 3]>,
}

impl Image {
    /// How many pixels have exactly this colour.
    pub fn count(&self, rgb: [u8; 3]) -> usize {
        self.pixels.iter().filter(|p| **p == rgb).count()
    }
}

/// `#rrggbb` as bytes.
pub fn hex_color(text: &str) -> [u8; 3] {
    let h = text.trim_start_matches('#');
    let byte = |i: usize| u8::from_str_radix(&h[i..i + 2], 16).expect("hex colour");
    [byte(0), byte(2), byte(4)]
}

/// Decodes an 8-bit, non-interlaced RGB or RGBA PNG (what chromium writes).
pub fn decode_png(data: &[u8]) -> Image {
    assert_eq!(&data[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let mut pos = 8;
    let (mut width, mut height, mut channels) = (0usize, 0usize, 0usize);
    let mut idat = Vec::new();
    while pos + 8 <= data.len() {
        let len = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &data[pos + 4..pos + 8];
        let body = &data[pos + 8..pos + 8 + len];
        match kind {
            b"IHDR" => {
                width = u32::from_be_bytes(body[0..4].try_into().unwrap()) as usize;
                height = u32::from_be_bytes(body[4..8].try_into().unwrap()) as usize;
                assert_eq!(body[8], 8, "bit depth");
                channels = match body[9] {
                    2 => 3,
                    6 => 4,
                    t => panic!("PNG colour type {t}"),
                };
                assert_eq!(body[12], 0, "interlaced");
            }
            b"IDAT" => idat.extend_from_slice(body),
            b"IEND" => break,
            _ => {}
        }
        pos += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .expect("inflate");
    let stride = width * channels;
    assert_eq!(raw.len(), height * (stride + 1), "image data size");
    let mut prev = vec![0u8; stride];
    let mut pixels = Vec::with_capacity(width * height);
    for y in 0..height {
        let line = &raw[y * (stride + 1)..(y + 1) * (stride + 1)];
        let (filter, src) = (line[0], &line[1..]);
        let mut cur = vec![0u8; stride];
        for i in 0..stride {
            let a = if i >= channels { cur[i - channels] } else { 0 };
            let b = prev[i];
            let c = if i >= channels { prev[i - channels] } else { 0 };
            let predicted = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => u8::try_from((u16::from(a) + u16::from(b)) / 2).unwrap_or(u8::MAX),
                4 => paeth(a, b, c),
                f => panic!("PNG filter {f}"),
            };
            cur[i] = src[i].wrapping_add(predicted);
        }
        pixels.extend(cur.chunks(channels).map(|p| [p[0], p[1], p[2]]));
        prev = cur;
    }
    Image {
        width,
        height,
        pixels,
    }
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let (ia, ib, ic) = (i16::from(a), i16::from(b), i16::from(c));
    let p = ia + ib - ic;
    let (pa, pb, pc) = ((p - ia).abs(), (p - ib).abs(), (p - ic).abs());
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}
