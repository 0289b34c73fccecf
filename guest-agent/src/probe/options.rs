//! The command line of `mvm-agent probe`. Parsed by hand: the agent is a lean static binary.

use std::path::PathBuf;

use crate::runtime::spec::parse_size;

/// Shortest nonce accepted: a short one could match by chance.
pub const MIN_NONCE_LEN: usize = 8;

/// Usage text of `mvm-agent probe`.
pub const USAGE: &str = "\
usage: mvm-agent probe [--json] [--pretty] [OPTIONS]
Prints one JSON report of what this process sees and can do.
Host identity (each probe whose input is missing reports `error`, \"not given\"):
  --marker-cmdline NONCE   a host process has NONCE in its command line
  --marker-pid PID         its pid on the host (a hint; the nonce decides)
  --secret-file PATH       a root-only host file ...
  --secret NONCE           ... that holds NONCE
  --loopback-port PORT     a TCP server on the host's 127.0.0.1 ...
  --loopback-nonce NONCE   ... that sends NONCE to whoever connects
  --kmsg-nonce NONCE       NONCE was written to the host's kernel log
  --host-disk MAJ:MIN      the host's disk
  --host-disk-size BYTES   its size, so that a guest disk with the same numbers is not taken for it
  --state-dir PATH         mvm's state directory on the host ...
  --state-nonce NONCE      ... which has an entry named NONCE
  --vsock-host             also look for an agent at vsock CID 2 (pass it in a VM, where CID 2
                           is mvm; on a host that is itself a VM it is that VM's hypervisor)
Limits to check (\"not-set\" when missing):
  --mem SIZE               memory limit (bytes, or with k, m, g: 256M)
  --pids N                 pids limit
  --cpus X                 CPU limit, in CPUs (0.5, 2)
Workload (what `mvm compare` times; the report follows it):
  -- CMD ARGS...           run CMD first, with this process's stdin, stdout and stderr, and wait
  --mark TOKEN             then print a line \"TOKEN CODE\" (CMD's exit code, `-` without CMD),
                           starting on a new line of its own
  --hold-ms N              then wait N milliseconds before probing (the host measures memory)
Other:
  --dir PATH               where to write temporary files (default: $TMPDIR, /tmp, /var/tmp, .)
  --hello                  print one line (hostname, kernel, pid) and exit 0: a workload for any
                           image, with or without a shell
  --cpu-loop               print the nanoseconds of the compute loop of the cost measurements
                           (best of three) and exit: a baseline on the host
  --noop                   exit 0 at once (the fork+exec measurement runs this)";

/// Longest `--hold-ms`: the hold is a pause for the host, not a way to park the probe.
pub const MAX_HOLD_MS: u64 = 60_000;

/// The options that take a value.
const VALUE_OPTIONS: [&str; 17] = [
    "--marker-cmdline",
    "--marker-pid",
    "--secret-file",
    "--secret",
    "--loopback-port",
    "--loopback-nonce",
    "--kmsg-nonce",
    "--host-disk",
    "--host-disk-size",
    "--state-dir",
    "--state-nonce",
    "--mem",
    "--pids",
    "--cpus",
    "--dir",
    "--mark",
    "--hold-ms",
];

/// Errors in the arguments of `mvm-agent probe`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptionsError {
    /// An option this probe does not know.
    #[error("unknown option {0:?}")]
    Unknown(String),
    /// An option without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("invalid value {value:?} for {option}")]
    BadValue {
        /// The option.
        option: String,
        /// What was given.
        value: String,
    },
    /// A nonce short enough to match by chance.
    #[error("the nonce for {0} is too short: use at least {MIN_NONCE_LEN} characters")]
    ShortNonce(String),
    /// One option of a pair given without the other.
    #[error("{0} needs {1} as well")]
    Incomplete(&'static str, &'static str),
}

/// Inputs of a probe run; see [`USAGE`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Indent the JSON.
    pub pretty: bool,
    /// Nonce in the command line of the host's marker process.
    pub marker: Option<String>,
    /// The marker's pid on the host (a hint).
    pub marker_pid: Option<i32>,
    /// A root-only host file ...
    pub secret_file: Option<PathBuf>,
    /// ... and the nonce it holds.
    pub secret: Option<String>,
    /// Port of a TCP server on the host's 127.0.0.1 ...
    pub loopback_port: Option<u16>,
    /// ... and the nonce it sends.
    pub loopback_nonce: Option<String>,
    /// Nonce written to the host's kernel log.
    pub kmsg_nonce: Option<String>,
    /// Major and minor number of the host's disk.
    pub host_disk: Option<(u32, u32)>,
    /// Size of the host's disk in bytes.
    pub host_disk_size: Option<u64>,
    /// mvm's state directory on the host ...
    pub state_dir: Option<PathBuf>,
    /// ... and the name of an entry in it.
    pub state_nonce: Option<String>,
    /// Also try vsock CID 2 (the host, from inside a VM).
    pub vsock_host: bool,
    /// Memory limit to check, bytes.
    pub mem: Option<u64>,
    /// Pids limit to check.
    pub pids: Option<u64>,
    /// CPU limit to check, CPUs.
    pub cpus: Option<f64>,
    /// Directory for temporary files.
    pub dir: Option<PathBuf>,
    /// The workload run before the probe (`-- CMD ARGS...`).
    pub workload: Vec<String>,
    /// The token of the line printed once the workload is done.
    pub mark: Option<String>,
    /// Milliseconds to wait after that line, before probing.
    pub hold_ms: u64,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run the probe.
    Probe(Box<Options>),
    /// Exit at once (`--noop`).
    Noop,
    /// Print one line about this process and exit (`--hello`).
    Hello,
    /// Print the compute loop's time and exit (`--cpu-loop`).
    CpuLoop,
    /// Print the usage.
    Help,
}

fn nonce(option: &str, value: String) -> Result<String, OptionsError> {
    if value.chars().count() < MIN_NONCE_LEN {
        return Err(OptionsError::ShortNonce(option.to_string()));
    }
    Ok(value)
}

fn number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T, OptionsError> {
    value.parse().map_err(|_| OptionsError::BadValue {
        option: option.to_string(),
        value: value.to_string(),
    })
}

fn device(option: &str, value: &str) -> Result<(u32, u32), OptionsError> {
    let (maj, min) = value
        .split_once(':')
        .ok_or_else(|| OptionsError::BadValue {
            option: option.to_string(),
            value: value.to_string(),
        })?;
    Ok((number(option, maj)?, number(option, min)?))
}

/// Parses the arguments after `probe`.
pub fn parse(args: &[String]) -> Result<Command, OptionsError> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        match flag {
            "--" => {
                o.workload = it.by_ref().cloned().collect();
                if o.workload.is_empty() {
                    return Err(OptionsError::MissingValue("--".into()));
                }
                break;
            }
            "--noop" => return Ok(Command::Noop),
            "--hello" => return Ok(Command::Hello),
            "--cpu-loop" => return Ok(Command::CpuLoop),
            "-h" | "--help" => return Ok(Command::Help),
            "--json" => continue,
            "--pretty" => {
                o.pretty = true;
                continue;
            }
            "--vsock-host" => {
                o.vsock_host = true;
                continue;
            }
            f if !VALUE_OPTIONS.contains(&f) => return Err(OptionsError::Unknown(arg.clone())),
            _ => {}
        }
        let value = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| OptionsError::MissingValue(flag.to_string()))?,
        };
        match flag {
            "--marker-cmdline" => o.marker = Some(nonce(flag, value)?),
            "--marker-pid" => o.marker_pid = Some(number(flag, &value)?),
            "--secret-file" => o.secret_file = Some(PathBuf::from(value)),
            "--secret" => o.secret = Some(nonce(flag, value)?),
            "--loopback-port" => o.loopback_port = Some(number(flag, &value)?),
            "--loopback-nonce" => o.loopback_nonce = Some(nonce(flag, value)?),
            "--kmsg-nonce" => o.kmsg_nonce = Some(nonce(flag, value)?),
            "--host-disk" => o.host_disk = Some(device(flag, &value)?),
            "--host-disk-size" => o.host_disk_size = Some(number(flag, &value)?),
            "--state-dir" => o.state_dir = Some(PathBuf::from(value)),
            "--state-nonce" => o.state_nonce = Some(nonce(flag, value)?),
            "--mem" => {
                o.mem = Some(parse_size(&value).map_err(|_| OptionsError::BadValue {
                    option: flag.to_string(),
                    value: value.clone(),
                })?);
            }
            "--pids" => {
                o.pids = Some(number(flag, &value)?).filter(|n| *n > 0);
                if o.pids.is_none() {
                    return Err(OptionsError::BadValue {
                        option: flag.to_string(),
                        value,
                    });
                }
            }
            "--cpus" => {
                let x: f64 = number(flag, &value)?;
                if !(x.is_finite() && x > 0.0) {
                    return Err(OptionsError::BadValue {
                        option: flag.to_string(),
                        value,
                    });
                }
                o.cpus = Some(x);
            }
            "--dir" => o.dir = Some(PathBuf::from(value)),
            "--mark" => o.mark = Some(nonce(flag, value)?),
            "--hold-ms" => {
                o.hold_ms = number(flag, &value)?;
                if o.hold_ms > MAX_HOLD_MS {
                    return Err(OptionsError::BadValue {
                        option: flag.to_string(),
                        value,
                    });
                }
            }
            _ => return Err(OptionsError::Unknown(arg.clone())),
        }
    }
    // (given, missing, option given, option it needs)
    let pairs = [
        (
            o.secret_file.is_some(),
            o.secret.is_none(),
            "--secret-file",
            "--secret",
        ),
        (
            o.secret.is_some(),
            o.secret_file.is_none(),
            "--secret",
            "--secret-file",
        ),
        (
            o.loopback_port.is_some(),
            o.loopback_nonce.is_none(),
            "--loopback-port",
            "--loopback-nonce",
        ),
        (
            o.loopback_nonce.is_some(),
            o.loopback_port.is_none(),
            "--loopback-nonce",
            "--loopback-port",
        ),
        (
            o.state_nonce.is_some(),
            o.state_dir.is_none(),
            "--state-nonce",
            "--state-dir",
        ),
        (
            o.host_disk_size.is_some(),
            o.host_disk.is_none(),
            "--host-disk-size",
            "--host-disk",
        ),
        (
            o.marker_pid.is_some(),
            o.marker.is_none(),
            "--marker-pid",
            "--marker-cmdline",
        ),
    ];
    if let Some((_, _, a, b)) = pairs
        .into_iter()
        .find(|(given, missing, ..)| *given && *missing)
    {
        return Err(OptionsError::Incomplete(a, b));
    }
    Ok(Command::Probe(Box::new(o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn opts(s: &str) -> Options {
        match parse(&args(s)) {
            Ok(Command::Probe(o)) => *o,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn no_arguments_is_a_probe_with_nothing_given() {
        assert_eq!(opts(""), Options::default());
        assert_eq!(opts("--json"), Options::default());
    }

    #[test]
    fn every_option_parses() {
        let o = opts(
            "--pretty --marker-cmdline m-123456 --marker-pid 42 --secret-file /run/s \
             --secret s-123456 --loopback-port 8080 --loopback-nonce l-123456 \
             --kmsg-nonce k-123456 --host-disk 254:1 --host-disk-size 1024 \
             --state-dir /var/lib/mvm --state-nonce d-123456 --mem 64M --pids 32 --cpus 0.5 \
             --dir /scratch --vsock-host",
        );
        assert!(o.pretty);
        assert!(o.vsock_host);
        assert_eq!(o.marker.as_deref(), Some("m-123456"));
        assert_eq!(o.marker_pid, Some(42));
        assert_eq!(o.secret_file, Some(PathBuf::from("/run/s")));
        assert_eq!(o.secret.as_deref(), Some("s-123456"));
        assert_eq!(o.loopback_port, Some(8080));
        assert_eq!(o.loopback_nonce.as_deref(), Some("l-123456"));
        assert_eq!(o.kmsg_nonce.as_deref(), Some("k-123456"));
        assert_eq!(o.host_disk, Some((254, 1)));
        assert_eq!(o.host_disk_size, Some(1024));
        assert_eq!(o.state_dir, Some(PathBuf::from("/var/lib/mvm")));
        assert_eq!(o.state_nonce.as_deref(), Some("d-123456"));
        assert_eq!(o.mem, Some(64 << 20));
        assert_eq!(o.pids, Some(32));
        assert_eq!(o.cpus, Some(0.5));
        assert_eq!(o.dir, Some(PathBuf::from("/scratch")));
    }

    #[test]
    fn a_workload_follows_the_double_dash() {
        let o = opts("--mark m-123456 --hold-ms 250 --mem 64M -- sh -c --mem");
        assert_eq!(o.workload, ["sh", "-c", "--mem"]);
        assert_eq!(o.mark.as_deref(), Some("m-123456"));
        assert_eq!((o.hold_ms, o.mem), (250, Some(64 << 20)));
        let err = |s: &str| parse(&args(s)).expect_err(s);
        assert_eq!(err("--"), OptionsError::MissingValue("--".into()));
        assert_eq!(err("--mark m"), OptionsError::ShortNonce("--mark".into()));
        assert!(matches!(
            err("--hold-ms 600000"),
            OptionsError::BadValue { .. }
        ));
        assert_eq!(parse(&args("--hello")), Ok(Command::Hello));
        assert_eq!(parse(&args("--cpu-loop")), Ok(Command::CpuLoop));
    }

    #[test]
    fn inline_values_are_accepted() {
        let o = opts("--mem=1G --cpus=2");
        assert_eq!((o.mem, o.cpus), (Some(1 << 30), Some(2.0)));
    }

    #[test]
    fn noop_and_help_win() {
        assert_eq!(parse(&args("--noop")), Ok(Command::Noop));
        assert_eq!(parse(&args("--mem 1G --help")), Ok(Command::Help));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let err = |s: &str| parse(&args(s)).expect_err(s);
        assert_eq!(err("--bogus"), OptionsError::Unknown("--bogus".into()));
        assert_eq!(err("--mem"), OptionsError::MissingValue("--mem".into()));
        assert!(matches!(err("--mem lots"), OptionsError::BadValue { .. }));
        assert!(matches!(err("--pids 0"), OptionsError::BadValue { .. }));
        assert!(matches!(err("--cpus -1"), OptionsError::BadValue { .. }));
        assert!(matches!(err("--cpus NaN"), OptionsError::BadValue { .. }));
        assert!(matches!(
            err("--host-disk 8"),
            OptionsError::BadValue { .. }
        ));
        assert!(matches!(
            err("--loopback-port 70000 --loopback-nonce l-123456"),
            OptionsError::BadValue { .. }
        ));
        assert_eq!(
            err("--marker-cmdline short"),
            OptionsError::ShortNonce("--marker-cmdline".into())
        );
    }

    #[test]
    fn paired_options_need_each_other() {
        let err = |s: &str| parse(&args(s)).expect_err(s);
        assert_eq!(
            err("--secret-file /x"),
            OptionsError::Incomplete("--secret-file", "--secret")
        );
        assert_eq!(
            err("--secret s-123456"),
            OptionsError::Incomplete("--secret", "--secret-file")
        );
        assert_eq!(
            err("--loopback-nonce l-123456"),
            OptionsError::Incomplete("--loopback-nonce", "--loopback-port")
        );
        assert_eq!(
            err("--state-nonce d-123456"),
            OptionsError::Incomplete("--state-nonce", "--state-dir")
        );
        assert_eq!(
            err("--host-disk-size 5"),
            OptionsError::Incomplete("--host-disk-size", "--host-disk")
        );
        assert_eq!(
            err("--marker-pid 7"),
            OptionsError::Incomplete("--marker-pid", "--marker-cmdline")
        );
        // The optional half of a pair may be left out.
        assert!(parse(&args("--state-dir /s")).is_ok());
        assert!(parse(&args("--host-disk 8:0")).is_ok());
    }
}
