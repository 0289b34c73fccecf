//! What the host and the guest agent agree on besides the [`crate::protocol`]: the boot
//! parameters the host puts on the guest kernel's command line ([`BootParams`]), and the paths and
//! ids inside the guest both sides name.
//!
//! The host writes the parameters with [`BootParams::to_cmdline`]; the agent, as PID 1, reads
//! them back from `/proc/cmdline` with [`BootParams::parse`]. Words that do not start with `mvm.`
//! are the kernel's and are ignored here.

use std::fmt;
use std::net::Ipv4Addr;

use crate::protocol::AGENT_VSOCK_PORT;

/// The block device that holds the image's root filesystem (the VM's first disk).
pub const ROOTFS_DEVICE: &str = "/dev/vda";
/// Where the agent mounts the image's root filesystem, read-only: the container's lower layer.
pub const ROOTFS_DIR: &str = "/mnt/rootfs";
/// The container's writable layer inside the guest (on the guest's `/run` tmpfs).
pub const UPPER_DIR: &str = "/run/mvm/upper";
/// The overlay work directory next to [`UPPER_DIR`].
pub const WORK_DIR: &str = "/run/mvm/work";
/// Where the agent mounts the volume disks named by `mvm.volume=<dev>[:ro]`: at `<dir>/<dev>`,
/// for containers to bind-mount.
pub const VOLUMES_DIR: &str = "/mnt/volumes";
/// The agent's own binary in the guest: the initramfs's `/init`.
pub const AGENT_BINARY: &str = "/init";
/// Where a container finds mvm's static agent when its spec asks for it (read-only, bind-mounted
/// from the host or, in a VM, from [`AGENT_BINARY`]): `mvm compare` runs its probe from there.
pub const AGENT_IN_CONTAINER: &str = "/.mvm-agent";
/// The id of the one container the host creates in a VM's agent.
pub const MAIN_CONTAINER: &str = "main";
/// The stream id of a container's first process in the agent protocol.
pub const MAIN_STREAM: u32 = 1;

/// A boot parameter the agent cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid mvm.{key}={value}")]
pub struct BootParamsError {
    /// The parameter, without `mvm.`.
    pub key: String,
    /// Its value as given.
    pub value: String,
}

/// Everything the host tells the agent on the kernel command line (`mvm.<key>=<value>` words).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootParams {
    /// `mvm.rootfs=`: the device to mount read-only on [`ROOTFS_DIR`] (an ext4 disk).
    pub rootfs: Option<String>,
    /// `mvm.port=`: the vsock port the agent serves ([`AGENT_VSOCK_PORT`] when absent).
    pub port: Option<u32>,
    /// `mvm.ports=`: guest TCP ports the agent relays from the vsock port of the same number
    /// (published ports).
    pub ports: Vec<u16>,
    /// `mvm.net=`: the IPv4 settings of the guest's interface (the agent has no DHCP client).
    pub net: Option<NetConfig>,
    /// `mvm.volume=` (once per volume): disks the agent mounts at [`VOLUMES_DIR`]`/<dev>`.
    pub volumes: Vec<VolumeParam>,
    /// `mvm.log=`: the agent's log level (`error`, `warn`, `info`, `debug`, `trace`).
    pub log: Option<String>,
    /// `mvm.template=1`: the guest boots to be saved as a template. The agent mounts nothing
    /// and configures no network at boot: it waits for [`crate::protocol::Request::Setup`],
    /// which carries the parameters of the run (each VM restored from the template gets its
    /// own).
    pub template: bool,
}

/// One `mvm.volume=<dev>[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParam {
    /// The device name under /dev (`vdb`).
    pub dev: String,
    /// Mounted read-only.
    pub readonly: bool,
}

impl BootParams {
    /// The vsock port the agent serves.
    pub fn agent_port(&self) -> u32 {
        self.port.unwrap_or(AGENT_VSOCK_PORT)
    }

    /// The parameters as kernel command-line words, space-separated (empty when none is set).
    pub fn to_cmdline(&self) -> String {
        let mut words = Vec::new();
        if let Some(dev) = &self.rootfs {
            words.push(format!("mvm.rootfs={dev}"));
        }
        if let Some(port) = self.port {
            words.push(format!("mvm.port={port}"));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            words.push(format!("mvm.ports={}", ports.join(",")));
        }
        if let Some(net) = &self.net {
            words.push(format!("mvm.net={net}"));
        }
        for v in &self.volumes {
            let ro = if v.readonly { ":ro" } else { "" };
            words.push(format!("mvm.volume={}{ro}", v.dev));
        }
        if let Some(level) = &self.log {
            words.push(format!("mvm.log={level}"));
        }
        if self.template {
            words.push("mvm.template=1".to_string());
        }
        words.join(" ")
    }

    /// Reads the `mvm.` words of a kernel command line. A parameter given twice keeps its last
    /// value (volumes add up); unknown `mvm.` keys are ignored.
    pub fn parse(cmdline: &str) -> Result<BootParams, BootParamsError> {
        let mut p = BootParams::default();
        for (key, value) in agent_params(cmdline) {
            let bad = || BootParamsError {
                key: key.clone(),
                value: value.clone(),
            };
            match key.as_str() {
                "rootfs" if !value.is_empty() => p.rootfs = Some(value.clone()),
                "rootfs" => return Err(bad()),
                "port" => p.port = Some(value.parse().map_err(|_| bad())?),
                "ports" => p.ports = parse_ports(&value),
                "net" => p.net = Some(NetConfig::parse(&value).ok_or_else(bad)?),
                "volume" => {
                    let (dev, readonly) = match value.split_once(':') {
                        Some((d, "ro")) => (d, true),
                        Some(_) => return Err(bad()),
                        None => (value.as_str(), false),
                    };
                    if dev.is_empty() || dev.contains('/') {
                        return Err(bad());
                    }
                    p.volumes.push(VolumeParam {
                        dev: dev.to_string(),
                        readonly,
                    });
                }
                "log" => p.log = Some(value.clone()),
                "template" => p.template = value == "1",
                _ => {}
            }
        }
        Ok(p)
    }
}

/// `mvm.<key>=<value>` words of a kernel command line, in order.
pub fn agent_params(cmdline: &str) -> Vec<(String, String)> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("mvm."))
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses `80,443` into ports; entries that are not ports are skipped.
pub fn parse_ports(text: &str) -> Vec<u16> {
    text.split(',')
        .filter_map(|p| p.trim().parse().ok())
        .filter(|p| *p != 0)
        .collect()
}

/// Longest interface name the kernel takes (IFNAMSIZ less the NUL).
const MAX_IFNAME: usize = 15;

/// The IPv4 settings of one interface, `mvm.net=<dev>,<ip>/<prefix>[,<gateway>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface name.
    pub dev: String,
    /// Address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
}

impl NetConfig {
    /// Parses `<dev>,<ip>/<prefix>[,<gateway>]`.
    pub fn parse(text: &str) -> Option<NetConfig> {
        let mut parts = text.split(',');
        let dev = parts
            .next()
            .filter(|d| !d.is_empty() && d.len() <= MAX_IFNAME)?;
        let (addr, prefix) = parts.next()?.split_once('/')?;
        let gateway = parts.next().map(str::parse).transpose().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
        if parts.next().is_some() {
            return None;
        }
        Some(NetConfig {
            dev: dev.to_string(),
            addr: addr.parse().ok()?,
            prefix,
            gateway,
        })
    }
}

impl fmt::Display for NetConfig {
    /// The `mvm.net=` value: `<dev>,<ip>/<prefix>[,<gateway>]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}/{}", self.dev, self.addr, self.prefix)?;
        if let Some(gw) = self.gateway {
            write!(f, ",{gw}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_params_round_trip_through_the_command_line() {
        let params = BootParams {
            rootfs: Some(ROOTFS_DEVICE.into()),
            port: Some(AGENT_VSOCK_PORT),
            ports: vec![80, 8443],
            net: Some(NetConfig {
                dev: "eth0".into(),
                addr: Ipv4Addr::new(192, 0, 2, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(192, 0, 2, 1)),
            }),
            volumes: vec![
                VolumeParam {
                    dev: "vdb".into(),
                    readonly: false,
                },
                VolumeParam {
                    dev: "vdc".into(),
                    readonly: true,
                },
            ],
            log: Some("debug".into()),
            template: true,
        };
        let line = params.to_cmdline();
        assert_eq!(
            line,
            "mvm.rootfs=/dev/vda mvm.port=1024 mvm.ports=80,8443 \
             mvm.net=eth0,192.0.2.2/24,192.0.2.1 mvm.volume=vdb mvm.volume=vdc:ro mvm.log=debug \
             mvm.template=1"
        );
        // Among the kernel's own words, as the agent reads them from /proc/cmdline.
        let cmdline = format!("console=ttyS0 quiet {line} mvm.unknown=1 panic=1\n");
        assert_eq!(BootParams::parse(&cmdline), Ok(params));
        assert_eq!(
            BootParams::parse("").map(|p| p.to_cmdline()),
            Ok(String::new())
        );
        assert_eq!(BootParams::default().agent_port(), AGENT_VSOCK_PORT);
    }

    #[test]
    fn bad_boot_params_are_refused_by_name() {
        for (word, key) in [
            ("mvm.port=x", "port"),
            ("mvm.net=eth0", "net"),
            ("mvm.volume=a/b", "volume"),
            ("mvm.volume=vdb:rw", "volume"),
            ("mvm.rootfs=", "rootfs"),
        ] {
            let err = BootParams::parse(word).unwrap_err();
            assert_eq!(err.key, key, "{word}");
            assert_eq!(format!("mvm.{}={}", err.key, err.value), word);
            assert_eq!(err.to_string(), format!("invalid {word}"));
        }
    }

    #[test]
    fn agent_parameters_come_from_mvm_prefixed_words() {
        let p = agent_params("console=ttyS0 mvm.port=1024 quiet mvm.rootfs=/dev/vda mvm.bogus");
        assert_eq!(
            p,
            vec![
                ("port".to_string(), "1024".to_string()),
                ("rootfs".to_string(), "/dev/vda".to_string())
            ]
        );
    }

    #[test]
    fn port_lists_parse_and_skip_junk() {
        assert_eq!(parse_ports("80,443"), [80, 443]);
        assert_eq!(parse_ports("80,x,0,70000, 8080"), [80, 8080]);
        assert!(parse_ports("").is_empty());
    }

    #[test]
    fn net_parameters_parse_and_bad_ones_are_refused() {
        let n = NetConfig::parse("eth0,192.0.2.2/24,192.0.2.1").unwrap();
        assert_eq!(n.dev, "eth0");
        assert_eq!(n.addr, std::net::Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(n.prefix, 24);
        assert_eq!(n.gateway, Some(std::net::Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(NetConfig::parse("eth0,10.0.0.2/30").unwrap().gateway, None);
        for bad in [
            "",
            "eth0",
            "eth0,10.0.0.2",
            "eth0,10.0.0.2/33",
            "eth0,1.2.3/8",
            "eth0,1.2.3.4/8,x",
            "eth0,1.2.3.4/8,1.1.1.1,z",
        ] {
            assert!(NetConfig::parse(bad).is_none(), "{bad}");
        }
    }
}
