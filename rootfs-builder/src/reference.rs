//! Image references: `nginx`, `library/nginx:1.25`, `docker.io/library/nginx`,
//! `127.0.0.1:5000/team/app@sha256:<hex>`, `localhost:5000/app:tag`.
//!
//! The rules are Docker's: a first path component that contains a `.` or a `:`, or is
//! `localhost`, names the registry; otherwise the registry is Docker Hub (`docker.io`, served at
//! `registry-1.docker.io`) and a one-component name gets the `library/` prefix. Without a tag or
//! digest the tag is `latest`. Display gives the canonical form
//! (`docker.io/library/nginx:latest`); [`Reference::familiar`] gives the short one (`nginx:latest`).

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// The registry name Docker Hub images carry.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// The tag used when a reference names none.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A reference that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The text breaks the reference grammar.
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid {
        /// The text given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The `@digest` part is not a valid digest.
    #[error("invalid image reference {reference:?}")]
    Digest {
        /// The text given.
        reference: String,
        /// Why the digest is invalid.
        #[source]
        source: DigestError,
    },
}

/// A parsed, validated image reference with Docker Hub defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses `text`; see the module docs for the rules.
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let invalid = |reason: String| ReferenceError::Invalid {
            reference: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(invalid("empty reference".to_string()));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains whitespace".to_string()));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, d)) => {
                let digest = Digest::parse(d).map_err(|source| ReferenceError::Digest {
                    reference: text.to_string(),
                    source,
                })?;
                (rest, Some(digest))
            }
            None => (text, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(invalid)?;
        }
        if name.is_empty() {
            return Err(invalid("missing repository name".to_string()));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if looks_like_registry(first) => (first, path),
            _ => (DOCKER_HUB, name),
        };
        validate_registry(registry).map_err(invalid)?;
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        validate_repository(&repository).map_err(invalid)?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid("name is longer than 255 characters".to_string()));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// The registry as named in references: `docker.io`, `localhost:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host and port to talk to: `registry-1.docker.io` for Docker Hub, else the registry.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// The repository path inside the registry: `library/nginx`, `team/app`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when the text named neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What the manifest URL names: the digest when pinned, else the tag.
    pub fn object(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.as_str(),
            (None, Some(t)) => t,
            (None, None) => DEFAULT_TAG,
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The name as Docker shows it: `nginx`, `team/app`, `localhost:5000/app`.
    pub fn familiar_name(&self) -> String {
        if self.registry == DOCKER_HUB {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_string()
        } else {
            self.name()
        }
    }

    /// The short form: `nginx:latest`, `localhost:5000/app@sha256:...`.
    pub fn familiar(&self) -> String {
        let mut s = self.familiar_name();
        self.push_suffix(&mut s);
        s
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        validate_tag(tag).map_err(|reason| ReferenceError::Invalid {
            reference: format!("{}:{tag}", self.name()),
            reason,
        })?;
        Ok(Reference {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// The same repository pinned to `digest`, without a tag.
    pub fn with_digest(&self, digest: Digest) -> Self {
        Reference {
            tag: None,
            digest: Some(digest),
            ..self.clone()
        }
    }

    fn push_suffix(&self, s: &mut String) {
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d.as_str());
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = self.name();
        self.push_suffix(&mut s);
        f.write_str(&s)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn looks_like_registry(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

fn validate_registry(registry: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        // IPv6 literal: [addr] or [addr]:port
        let Some((addr, after)) = rest.split_once(']') else {
            return Err(format!("bad registry address {registry:?}"));
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("bad registry address {registry:?}"));
        }
        match after {
            "" => return Ok(()),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("bad registry address {registry:?}")),
            },
        }
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return Err(format!("bad registry host {host:?}"));
        }
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("bad registry port {port:?}"));
        }
    }
    Ok(())
}

fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("repository name must be lowercase".to_string());
    }
    for component in repository.split('/') {
        if !path_component_ok(component) {
            return Err(format!(
                "bad path component {component:?}: use lowercase letters and digits, separated \
                 by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn validate_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = tag.as_bytes();
    if b.is_empty() {
        return Err("empty tag".to_string());
    }
    if b.len() > MAX_TAG_LEN {
        return Err("tag is longer than 128 characters".to_string());
    }
    if !word(b[0]) || !b.iter().all(|&x| word(x) || x == b'.' || x == b'-') {
        return Err(format!(
            "bad tag {tag:?}: use letters, digits, '_', '.' and '-' (not first)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn parse(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn bare_name_gets_docker_hub_defaults() {
        let r = parse("nginx");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/nginx");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.digest(), None);
        assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
        assert_eq!(r.familiar(), "nginx:latest");
        assert_eq!(r.object(), "latest");
    }

    #[test]
    fn hub_forms_are_equivalent() {
        let canonical = parse("docker.io/library/nginx:latest");
        for s in [
            "nginx",
            "nginx:latest",
            "library/nginx",
            "docker.io/nginx",
            "index.docker.io/library/nginx",
        ] {
            assert_eq!(parse(s), canonical, "{s}");
        }
        let r = parse("library/nginx:1.25");
        assert_eq!(r.to_string(), "docker.io/library/nginx:1.25");
        let r = parse("team/app");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.familiar(), "team/app:latest");
    }

    #[test]
    fn registry_with_port_and_digest() {
        let text = format!("127.0.0.1:5000/team/app@sha256:{HEX}");
        let r = parse(&text);
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().hex(), HEX);
        assert_eq!(r.object(), format!("sha256:{HEX}"));
        assert_eq!(r.to_string(), text);
        assert_eq!(r.familiar(), text);
    }

    #[test]
    fn localhost_is_a_registry() {
        let r = parse("localhost:5000/app:tag");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("localhost:5000", "app", Some("tag"))
        );
        let r = parse("localhost/app");
        assert_eq!((r.registry(), r.repository()), ("localhost", "app"));
        assert_eq!(r.to_string(), "localhost/app:latest");
        let r = parse("registry.example.com/a/b/c:v1.2-rc_3");
        assert_eq!(
            (r.registry(), r.repository()),
            ("registry.example.com", "a/b/c")
        );
        assert_eq!(r.familiar_name(), "registry.example.com/a/b/c");
    }

    #[test]
    fn tag_and_digest_together_keep_both() {
        let r = parse(&format!("nginx:1.25@sha256:{HEX}"));
        assert_eq!(r.tag(), Some("1.25"));
        assert!(r.digest().is_some());
        assert_eq!(r.object(), format!("sha256:{HEX}"));
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/nginx:1.25@sha256:{HEX}")
        );
    }

    #[test]
    fn ipv6_registry() {
        let r = parse("[::1]:5000/app");
        assert_eq!((r.registry(), r.repository()), ("[::1]:5000", "app"));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "docker.io/library/nginx:latest",
            "localhost:5000/a/b:c",
            "quay.io/x_y/z-w.v__u:1",
        ] {
            assert_eq!(parse(s).to_string(), s);
            assert_eq!(parse(&parse(s).to_string()), parse(s));
        }
    }

    #[test]
    fn rejects_bad_references_with_one_line_errors() {
        let long_tag = format!("nginx:{}", "a".repeat(129));
        let long_name = format!("{}/x", "a".repeat(256));
        let cases = [
            ("", "empty"),
            ("Nginx", "lowercase"),
            ("docker.io/Library/nginx", "lowercase"),
            ("nginx:", "empty tag"),
            ("nginx:-x", "bad tag"),
            ("nginx:a/b", "bad registry port"),
            ("nginx@sha256:abc", "invalid image reference"),
            ("nginx@md5:abc", "invalid image reference"),
            ("a//b", "bad path component"),
            ("a/-b", "bad path component"),
            ("a/b.", "bad path component"),
            ("a/b...c", "bad path component"),
            ("ngi nx", "whitespace"),
            ("localhost:0/app", "bad registry port"),
            ("localhost:99999/app", "bad registry port"),
            ("exa_mple.com/app", "bad registry host"),
            ("/app", "bad path component"),
            (":tag", "missing repository"),
            (long_tag.as_str(), "longer than 128"),
            (long_name.as_str(), "longer than 255"),
        ];
        for (text, want) in cases {
            let err = Reference::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn separators_in_path_components() {
        assert!(path_component_ok("a.b_c__d-e---f9"));
        for bad in ["a___b", "a._b", "_a", "a-", ""] {
            assert!(!path_component_ok(bad), "{bad}");
        }
    }

    #[test]
    fn with_tag_and_with_digest() {
        let r = parse("localhost:5000/app:one");
        assert_eq!(
            r.with_tag("two").unwrap().to_string(),
            "localhost:5000/app:two"
        );
        assert!(r.with_tag("-bad").is_err());
        let d = Digest::parse(&format!("sha256:{HEX}")).unwrap();
        assert_eq!(
            r.with_digest(d).to_string(),
            format!("localhost:5000/app@sha256:{HEX}")
        );
    }
}
