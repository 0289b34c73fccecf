//! Name resolution in the container: the /etc/resolv.conf, /etc/hosts and /etc/hostname mvm
//! writes into its writable layer (as docker does), unless the image's own are asked for
//! (`--dns none`, `--no-hosts`).
//!
//! - resolv.conf: a container in the host's network gets the host's file. Anywhere else the
//!   `--dns` servers, or the host's without its loopback ones (unreachable from the container);
//!   with none left, docker's fallback, Google's public resolvers. With `--network user` the
//!   guest's queries to them leave from the host through passt, so a resolver only the host
//!   reaches works, as long as it is not on a loopback address (`--dns` refuses one). passt's
//!   own forwarder (`--dns-forward`) is not used: the passt of Debian 12 never passes a query on
//!   through it (measured: the resolver saw nothing, while the same query sent to the resolver's
//!   address got its answer).
//! - hosts: localhost, the container's name (and hostname) on its address, and `--add-host`
//!   entries (`host-gateway` is the address that reaches the host).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use guest_agent::runtime::spec::EtcFile;
use serde::{Deserialize, Serialize};

use crate::error::{bad_input, Error};

/// docker's resolvers when the host has none a container can use.
const FALLBACK_RESOLVERS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];

/// `--dns`, `--add-host`, `--dns none`, `--no-hosts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Resolvers (`--dns IP`); the host's when empty.
    #[serde(default)]
    pub servers: Vec<IpAddr>,
    /// Keep the image's /etc/resolv.conf (`--dns none`).
    #[serde(default)]
    pub image_resolv_conf: bool,
    /// Extra /etc/hosts lines (`--add-host NAME:IP`).
    #[serde(default)]
    pub add_hosts: Vec<HostEntry>,
    /// Keep the image's /etc/hosts (`--no-hosts`).
    #[serde(default)]
    pub image_hosts: bool,
}

impl Dns {
    /// Checks what can be checked without the network.
    pub fn validate(&self) -> Result<(), Error> {
        if self.image_resolv_conf && !self.servers.is_empty() {
            return Err(bad_input("--dns none cannot be combined with resolvers"));
        }
        if self.image_hosts && !self.add_hosts.is_empty() {
            return Err(bad_input("--no-hosts cannot be combined with --add-host"));
        }
        Ok(())
    }

    /// Applies one `--dns` value: an address, or `none`.
    pub fn add_server(&mut self, text: &str) -> Result<(), Error> {
        if text == "none" {
            self.image_resolv_conf = true;
            return Ok(());
        }
        let ip = text
            .parse()
            .map_err(|_| bad_input(format!("invalid --dns {text:?}: use an IP address or none")))?;
        self.servers.push(ip);
        Ok(())
    }
}

/// One `--add-host NAME:ADDR` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// The host name.
    pub name: String,
    /// Its address.
    pub addr: HostAddr,
}

/// The address of an `--add-host` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HostAddr {
    /// An address as given.
    Ip(IpAddr),
    /// docker's `host-gateway`: the address at which the container reaches the host.
    HostGateway,
}

impl FromStr for HostEntry {
    type Err = Error;

    /// `NAME:IP` (or `NAME=IP`), IP an address or `host-gateway`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            bad_input(format!(
                "invalid --add-host {s:?}: use NAME:IP (IP an address or host-gateway)"
            ))
        };
        let (name, addr) = s.split_once(['=', ':']).ok_or_else(bad)?;
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !name_ok {
            return Err(bad());
        }
        let addr = if addr == "host-gateway" {
            HostAddr::HostGateway
        } else {
            // IPv6 in brackets, as docker accepts it.
            let a = addr.trim_start_matches('[').trim_end_matches(']');
            HostAddr::Ip(a.parse().map_err(|_| bad())?)
        };
        Ok(HostEntry {
            name: name.to_string(),
            addr,
        })
    }
}

impl fmt::Display for HostEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            HostAddr::Ip(ip) => write!(f, "{}:{ip}", self.name),
            HostAddr::HostGateway => write!(f, "{}:host-gateway", self.name),
        }
    }
}

/// The host's /etc/resolv.conf (empty when it has none).
pub fn host_resolv_conf() -> String {
    std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
}

/// What the container's network is, as far as its name files care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A VM with `--network user`: passt forwards DNS; `gateway` reaches the host.
    User {
        /// The guest's address.
        addr: Option<Ipv4Addr>,
        /// Its gateway (passt maps it to the host).
        gateway: Option<Ipv4Addr>,
    },
    /// A VM on a tap device.
    Tap {
        /// The guest's address.
        addr: Option<Ipv4Addr>,
        /// The host's side of the tap.
        gateway: Option<Ipv4Addr>,
    },
    /// A container in the host's network namespace.
    Host,
    /// No network but loopback.
    None,
}

/// The /etc files of a container named `name` with hostname `hostname`, given its network.
/// `host_resolv_conf` is the host's /etc/resolv.conf.
pub fn etc_files(
    dns: &Dns,
    name: &str,
    hostname: &str,
    reach: Reach,
    host_resolv_conf: &str,
) -> Result<Vec<EtcFile>, Error> {
    let mut files = vec![EtcFile {
        name: "hostname".into(),
        content: format!("{hostname}\n"),
    }];
    if !dns.image_resolv_conf {
        files.push(EtcFile {
            name: "resolv.conf".into(),
            content: resolv_conf(dns, reach, host_resolv_conf),
        });
    }
    if !dns.image_hosts {
        files.push(EtcFile {
            name: "hosts".into(),
            content: hosts(dns, name, hostname, reach)?,
        });
    }
    Ok(files)
}

fn resolv_conf(dns: &Dns, reach: Reach, host: &str) -> String {
    let mut out = String::from("# written by mvm\n");
    if !dns.servers.is_empty() {
        for s in &dns.servers {
            out.push_str(&format!("nameserver {s}\n"));
        }
        return out;
    }
    if reach == Reach::Host {
        return host.to_string();
    }
    let mut servers = 0;
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
                    continue;
                };
                if !ip.is_loopback() {
                    out.push_str(&format!("nameserver {ip}\n"));
                    servers += 1;
                }
            }
            Some("search" | "domain" | "options") => {
                out.push_str(line.trim());
                out.push('\n');
            }
            _ => {}
        }
    }
    if servers == 0 {
        for s in FALLBACK_RESOLVERS {
            out.push_str(&format!("nameserver {s}\n"));
        }
    }
    out
}

fn hosts(dns: &Dns, name: &str, hostname: &str, reach: Reach) -> Result<String, Error> {
    let mut out = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    let (addr, gateway) = match reach {
        Reach::User { addr, gateway } | Reach::Tap { addr, gateway } => (addr, gateway),
        Reach::Host => (None, Some(Ipv4Addr::LOCALHOST)),
        Reach::None => (None, None),
    };
    let names = if name == hostname {
        name.to_string()
    } else {
        format!("{hostname} {name}")
    };
    // Without an address of its own the name is on a loopback address, as Debian does.
    let own = addr.unwrap_or(Ipv4Addr::new(127, 0, 1, 1));
    out.push_str(&format!("{own}\t{names}\n"));
    for h in &dns.add_hosts {
        let ip = match h.addr {
            HostAddr::Ip(ip) => ip,
            HostAddr::HostGateway => IpAddr::V4(gateway.ok_or_else(|| {
                bad_input(format!(
                    "--add-host {h}: this container's network has no address that reaches the host"
                ))
            })?),
        };
        out.push_str(&format!("{ip}\t{}\n", h.name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str =
        "# host\nnameserver 127.0.0.53\nnameserver 10.1.1.1\nsearch lan\noptions edns0\n";

    fn file<'a>(files: &'a [EtcFile], name: &str) -> Option<&'a str> {
        files
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.content.as_str())
    }

    #[test]
    fn user_networking_resolves_through_the_hosts_or_the_given_resolvers() {
        let mut dns = Dns::default();
        let reach = Reach::User {
            addr: Some(Ipv4Addr::new(192, 168, 1, 20)),
            gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
        };
        let files = etc_files(&dns, "web", "web", reach, HOST).unwrap();
        assert_eq!(
            file(&files, "resolv.conf"),
            Some("# written by mvm\nnameserver 10.1.1.1\nsearch lan\noptions edns0\n")
        );
        dns.add_server("10.53.0.1").unwrap();
        let given = etc_files(&dns, "web", "web", reach, HOST).unwrap();
        assert_eq!(
            file(&given, "resolv.conf"),
            Some("# written by mvm\nnameserver 10.53.0.1\n")
        );
        let hosts = file(&files, "hosts").unwrap();
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.ends_with("192.168.1.20\tweb\n"), "{hosts}");
        assert_eq!(file(&files, "hostname"), Some("web\n"));
    }

    #[test]
    fn other_networks_get_the_hosts_resolvers_without_loopback_or_the_given_ones() {
        let mut dns = Dns::default();
        let files = etc_files(&dns, "c", "c", Reach::None, HOST).unwrap();
        assert_eq!(
            file(&files, "resolv.conf"),
            Some("# written by mvm\nnameserver 10.1.1.1\nsearch lan\noptions edns0\n")
        );
        let only_local = "nameserver 127.0.0.53\n";
        let files = etc_files(&dns, "c", "c", Reach::None, only_local).unwrap();
        assert!(file(&files, "resolv.conf")
            .unwrap()
            .contains("nameserver 8.8.8.8\nnameserver 8.8.4.4\n"));
        let files = etc_files(&dns, "c", "c", Reach::Host, HOST).unwrap();
        assert_eq!(file(&files, "resolv.conf"), Some(HOST));
        dns.add_server("9.9.9.9").unwrap();
        let files = etc_files(&dns, "c", "box", Reach::Host, HOST).unwrap();
        assert_eq!(
            file(&files, "resolv.conf"),
            Some("# written by mvm\nnameserver 9.9.9.9\n")
        );
        assert!(file(&files, "hosts")
            .unwrap()
            .contains("127.0.1.1\tbox c\n"));
    }

    #[test]
    fn add_host_and_the_images_own_files() {
        let mut dns = Dns {
            add_hosts: vec![
                "db:10.0.0.7".parse().unwrap(),
                "host.docker.internal:host-gateway".parse().unwrap(),
            ],
            ..Dns::default()
        };
        let reach = Reach::Tap {
            addr: Some(Ipv4Addr::new(172, 30, 0, 2)),
            gateway: Some(Ipv4Addr::new(172, 30, 0, 1)),
        };
        let files = etc_files(&dns, "c", "c", reach, HOST).unwrap();
        let hosts = file(&files, "hosts").unwrap();
        assert!(
            hosts.contains("10.0.0.7\tdb\n")
                && hosts.contains("172.30.0.1\thost.docker.internal\n")
        );
        assert!(etc_files(&dns, "c", "c", Reach::None, HOST)
            .unwrap_err()
            .is_bad_input());
        dns.add_hosts.clear();
        dns.image_hosts = true;
        dns.add_server("none").unwrap();
        let files = etc_files(&dns, "c", "c", Reach::None, HOST).unwrap();
        assert_eq!(files.len(), 1, "only the hostname: {files:?}");
        for bad in ["nocolon", ":1.2.3.4", "a b:1.2.3.4", "x:999.1.1.1"] {
            assert!(bad.parse::<HostEntry>().is_err(), "{bad}");
        }
        assert_eq!(
            "v6:[::1]".parse::<HostEntry>().unwrap().addr,
            HostAddr::Ip("::1".parse().unwrap())
        );
        assert!(Dns {
            image_resolv_conf: true,
            servers: vec!["1.1.1.1".parse().unwrap()],
            ..Dns::default()
        }
        .validate()
        .is_err());
    }
}
