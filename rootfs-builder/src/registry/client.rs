//! HTTP for one repository on one registry: retries, the token dance, error bodies, manifests,
//! blob downloads and uploads.

// The request closures return `ureq::Error`, whose size is ureq's choice, not ours.
#![allow(clippy::result_large_err)]

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use super::auth::{parse_challenge, TokenResponse};
use super::progress::Progress;
use super::{PullOptions, RegistryError};
use crate::digest::{Digest, DigestWriter};
use crate::manifest::{Descriptor, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use crate::store::TempBlob;

/// Attempts per request for transient failures (connection refused, resets, 5xx, 429).
const ATTEMPTS: u32 = 4;
/// First backoff; doubled after each failed attempt (250 ms, 500 ms, 1 s).
const BACKOFF: Duration = Duration::from_millis(250);
const MAX_ERROR_BODY: u64 = 64 << 10;
const MAX_TOKEN_BODY: u64 = 1 << 20;

/// True when `registry` (`host[:port]`) is local: `localhost`, `127.0.0.0/8`, `[::1]`.
pub fn uses_plain_http(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        return rest.starts_with("::1]");
    } else {
        registry.split(':').next().unwrap_or(registry)
    };
    host == "localhost" || host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// A client for one repository on one registry.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    host: String,
    base: String,
    repository: String,
    actions: &'static str,
    token: RefCell<Option<String>>,
}

impl Client {
    /// A client for `repository` on `host` (`registry-1.docker.io`, `127.0.0.1:5000`); `push`
    /// asks for push rights when a token is needed.
    pub fn new(host: &str, repository: &str, opts: &PullOptions, push: bool) -> Self {
        let plain = uses_plain_http(host) || opts.insecure_registries.iter().any(|r| r == host);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .timeout_write(Duration::from_secs(60))
            .redirects(5)
            .user_agent(concat!("mvm/", env!("CARGO_PKG_VERSION")))
            .build();
        Client {
            agent,
            host: host.to_string(),
            base: format!(
                "{}://{host}/v2/{repository}",
                if plain { "http" } else { "https" }
            ),
            repository: repository.to_string(),
            actions: if push { "pull,push" } else { "pull" },
            token: RefCell::new(None),
        }
    }

    /// The registry host.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Sends a request built by `send` (given the Authorization value, if any), handling retries
    /// and the bearer-token challenge. Statuses in `ok` come back as responses, not errors.
    fn execute(
        &self,
        what: &str,
        ok: &[u16],
        mut send: impl FnMut(&ureq::Agent, Option<&str>) -> Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, RegistryError> {
        let mut attempt = 0;
        let mut authenticated = false;
        loop {
            let auth = self.token.borrow().as_ref().map(|t| format!("Bearer {t}"));
            let err = match send(&self.agent, auth.as_deref()) {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(code, resp)) if ok.contains(&code) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if !authenticated => {
                    authenticated = true;
                    let challenge = resp.header("www-authenticate").map(str::to_string);
                    self.authenticate(challenge.as_deref())?;
                    continue;
                }
                Err(ureq::Error::Status(code, resp)) => {
                    if (code >= 500 || code == 429) && attempt + 1 < ATTEMPTS {
                        log::debug!("{what}: status {code}, retrying");
                        backoff(attempt);
                        attempt += 1;
                        continue;
                    }
                    return Err(self.status_error(what, code, resp));
                }
                Err(ureq::Error::Transport(t)) => t,
            };
            let transient = matches!(
                err.kind(),
                ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Io | ureq::ErrorKind::Dns
            );
            if transient && attempt + 1 < ATTEMPTS {
                log::debug!("{what}: {err}, retrying");
                backoff(attempt);
                attempt += 1;
                continue;
            }
            return Err(RegistryError::Unreachable {
                host: self.host.clone(),
                source: err.into(),
            });
        }
    }

    /// Answers a 401 challenge by fetching an anonymous bearer token.
    fn authenticate(&self, header: Option<&str>) -> Result<(), RegistryError> {
        let denied = || RegistryError::Denied {
            host: self.host.clone(),
            repository: self.repository.clone(),
        };
        // A second 401 with a token in hand means the token does not grant access.
        if self.token.borrow().is_some() {
            return Err(denied());
        }
        let challenge = header.and_then(parse_challenge).ok_or_else(denied)?;
        if challenge.scheme != "bearer" {
            return Err(RegistryError::UnsupportedAuth {
                host: self.host.clone(),
                scheme: challenge.scheme,
            });
        }
        let realm = challenge.realm().ok_or_else(denied)?.to_string();
        let token_err = |detail: String| RegistryError::Token {
            realm: realm.clone(),
            detail,
        };
        if !realm.starts_with("https://") && !realm.starts_with("http://") {
            return Err(token_err("the realm is not an http(s) URL".to_string()));
        }
        let default_scope = format!("repository:{}:{}", self.repository, self.actions);
        let scope = challenge.scope().map_or(default_scope, str::to_string);
        let mut attempt = 0;
        let resp = loop {
            let mut req = self.agent.get(&realm).query("scope", &scope);
            if let Some(service) = challenge.service() {
                req = req.query("service", service);
            }
            match req.call() {
                Ok(resp) => break resp,
                Err(ureq::Error::Status(code, _)) if code < 500 => {
                    return Err(token_err(format!("status {code}")));
                }
                Err(e) if attempt + 1 < ATTEMPTS => {
                    log::debug!("token request: {e}, retrying");
                    backoff(attempt);
                    attempt += 1;
                }
                Err(e) => return Err(token_err(e.to_string())),
            }
        };
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_TOKEN_BODY)
            .read_to_end(&mut body)
            .map_err(|e| token_err(e.to_string()))?;
        let token = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| token_err("the answer holds no token".to_string()))?;
        *self.token.borrow_mut() = Some(token);
        Ok(())
    }

    fn status_error(&self, what: &str, status: u16, resp: ureq::Response) -> RegistryError {
        #[derive(serde::Deserialize)]
        struct Body {
            errors: Vec<Item>,
        }
        #[derive(serde::Deserialize)]
        struct Item {
            code: Option<String>,
            message: Option<String>,
        }
        let mut body = Vec::new();
        let _ = resp
            .into_reader()
            .take(MAX_ERROR_BODY)
            .read_to_end(&mut body);
        let item = serde_json::from_slice::<Body>(&body)
            .ok()
            .and_then(|b| b.errors.into_iter().next());
        match status {
            404 => RegistryError::NotFound {
                what: what.to_string(),
                host: self.host.clone(),
                repository: self.repository.clone(),
            },
            401 | 403 => RegistryError::Denied {
                host: self.host.clone(),
                repository: self.repository.clone(),
            },
            _ => {
                let detail = match item {
                    Some(Item { code, message }) => {
                        let text: Vec<String> = code.into_iter().chain(message).collect();
                        format!(": {}", text.join(": "))
                    }
                    None => String::new(),
                };
                RegistryError::Status {
                    host: self.host.clone(),
                    what: what.to_string(),
                    status,
                    detail,
                }
            }
        }
    }

    /// GETs a manifest by tag or digest. Returns its bytes, digest and Content-Type. When
    /// `expected` is given the bytes must hash to it.
    pub fn get_manifest(
        &self,
        object: &str,
        expected: Option<&Digest>,
        what: &str,
    ) -> Result<(Vec<u8>, Digest, Option<String>), RegistryError> {
        let url = format!("{}/manifests/{object}", self.base);
        let resp = self.execute(what, &[], |agent, auth| {
            let mut req = agent.get(&url).set("Accept", MANIFEST_ACCEPT);
            if let Some(a) = auth {
                req = req.set("Authorization", a);
            }
            req.call()
        })?;
        let content_type = resp.header("content-type").map(str::to_string);
        let header_digest = resp
            .header("docker-content-digest")
            .and_then(|d| Digest::parse(d).ok());
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut body)
            .map_err(|source| self.read_error(what, source))?;
        if body.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge {
                what: what.to_string(),
                host: self.host.clone(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let actual = Digest::of_bytes(&body);
        for want in expected.into_iter().chain(header_digest.as_ref()) {
            if want != &actual {
                return Err(RegistryError::Verify {
                    what: what.to_string(),
                    host: self.host.clone(),
                    source: crate::digest::DigestError::Mismatch {
                        expected: want.clone(),
                        actual,
                    },
                });
            }
        }
        Ok((body, actual, content_type))
    }

    fn read_error(&self, what: &str, source: io::Error) -> RegistryError {
        RegistryError::Read {
            what: what.to_string(),
            host: self.host.clone(),
            source,
        }
    }

    /// Downloads the blob `desc` into `temp`, checking size and digest as it streams. A broken
    /// connection restarts the download (up to the retry limit); a mismatch fails at once.
    pub(crate) fn fetch_blob(
        &self,
        desc: &Descriptor,
        temp: &mut TempBlob,
        label: &str,
        progress: &mut Progress,
    ) -> Result<(), RegistryError> {
        let what = format!("blob {}", desc.digest);
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let temp_path = temp.path().to_path_buf();
        let local = |source| RegistryError::Io {
            path: temp_path.clone(),
            source,
        };
        let mut attempt = 0;
        loop {
            let file = temp.file();
            file.set_len(0).map_err(local)?;
            file.rewind().map_err(local)?;
            let resp = self.execute(&what, &[], |agent, auth| {
                let mut req = agent.get(&url);
                if let Some(a) = auth {
                    req = req.set("Authorization", a);
                }
                req.call()
            })?;
            let announced = resp
                .header("content-length")
                .and_then(|l| l.parse::<u64>().ok());
            if announced.is_some_and(|n| n > desc.size) {
                return Err(self.too_large(&what, desc.size));
            }
            let mut reader = resp.into_reader();
            let mut writer = DigestWriter::with_limit(&mut *file, desc.size);
            match copy_with_progress(&mut reader, &mut writer, |n| {
                progress.bytes(label, n, desc.size)
            }) {
                Ok(()) => {}
                Err(CopyError::Read(e)) if attempt + 1 < ATTEMPTS => {
                    log::debug!("{what}: {e}, restarting download");
                    backoff(attempt);
                    attempt += 1;
                    continue;
                }
                Err(CopyError::Read(e)) => return Err(self.read_error(&what, e)),
                Err(CopyError::Write(e)) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(self.too_large(&what, desc.size));
                }
                Err(CopyError::Write(e)) => return Err(local(e)),
            }
            writer
                .finish(&desc.digest, Some(desc.size))
                .map_err(|source| RegistryError::Verify {
                    what: what.clone(),
                    host: self.host.clone(),
                    source,
                })?;
            return Ok(());
        }
    }

    fn too_large(&self, what: &str, limit: u64) -> RegistryError {
        RegistryError::TooLarge {
            what: what.to_string(),
            host: self.host.clone(),
            limit,
        }
    }

    /// True if the registry already has the blob.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, RegistryError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.execute(&format!("HEAD blob {digest}"), &[404], |agent, auth| {
            let mut req = agent.head(&url);
            if let Some(a) = auth {
                req = req.set("Authorization", a);
            }
            req.call()
        })?;
        Ok(resp.status() == 200)
    }

    /// Uploads the file at `path` as blob `digest` (monolithic: POST, then PUT with the body).
    pub fn upload_blob(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<(), RegistryError> {
        let what = format!("upload of blob {digest}");
        let start = format!("{}/blobs/uploads/", self.base);
        let resp = self.execute(&what, &[], |agent, auth| {
            let mut req = agent.post(&start).set("Content-Length", "0");
            if let Some(a) = auth {
                req = req.set("Authorization", a);
            }
            req.call()
        })?;
        let location = resp
            .header("location")
            .ok_or_else(|| RegistryError::BadLocation {
                host: self.host.clone(),
            })?;
        let location = self.absolute(location)?;
        let size_text = size.to_string();
        self.execute(&what, &[], |agent, auth| {
            let file = File::open(path).map_err(ureq::Error::from)?;
            let mut req = agent
                .put(&location)
                .query("digest", digest.as_str())
                .set("Content-Type", "application/octet-stream")
                .set("Content-Length", &size_text);
            if let Some(a) = auth {
                req = req.set("Authorization", a);
            }
            req.send(file)
        })?;
        Ok(())
    }

    /// PUTs a manifest under `tag_or_digest`.
    pub fn put_manifest(
        &self,
        tag_or_digest: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<(), RegistryError> {
        let url = format!("{}/manifests/{tag_or_digest}", self.base);
        self.execute(
            &format!("manifest upload {tag_or_digest}"),
            &[],
            |agent, auth| {
                let mut req = agent.put(&url).set("Content-Type", media_type);
                if let Some(a) = auth {
                    req = req.set("Authorization", a);
                }
                req.send_bytes(body)
            },
        )?;
        Ok(())
    }

    /// Resolves an upload `Location` (absolute, or a path on the registry).
    fn absolute(&self, location: &str) -> Result<String, RegistryError> {
        if location.starts_with("http://") || location.starts_with("https://") {
            return Ok(location.to_string());
        }
        if location.starts_with('/') {
            let root_len = self.base.find("/v2/").unwrap_or(self.base.len());
            return Ok(format!("{}{location}", &self.base[..root_len]));
        }
        Err(RegistryError::BadLocation {
            host: self.host.clone(),
        })
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

fn copy_with_progress(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    mut tick: impl FnMut(u64),
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        writer.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
        tick(total);
    }
    writer.flush().map_err(CopyError::Write)
}

fn backoff(attempt: u32) {
    std::thread::sleep(BACKOFF * 2u32.pow(attempt));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_registries_use_plain_http() {
        for local in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(uses_plain_http(local), "{local}");
        }
        for remote in [
            "registry-1.docker.io",
            "10.0.0.1:5000",
            "quay.io",
            "localhost.example.com",
            "[::2]:80",
        ] {
            assert!(!uses_plain_http(remote), "{remote}");
        }
    }

    #[test]
    fn insecure_registry_option_switches_to_http() {
        let opts = PullOptions {
            insecure_registries: vec!["reg.lan:5000".to_string()],
            ..Default::default()
        };
        let c = Client::new("reg.lan:5000", "team/app", &opts, false);
        assert_eq!(c.base, "http://reg.lan:5000/v2/team/app");
        let c = Client::new("reg.lan", "app", &opts, false);
        assert_eq!(c.base, "https://reg.lan/v2/app");
    }

    #[test]
    fn upload_locations_resolve_against_registry() {
        let c = Client::new("127.0.0.1:5000", "app", &PullOptions::default(), true);
        assert_eq!(
            c.absolute("/v2/app/blobs/uploads/u1?_state=x").unwrap(),
            "http://127.0.0.1:5000/v2/app/blobs/uploads/u1?_state=x"
        );
        assert_eq!(c.absolute("https://cdn/x").unwrap(), "https://cdn/x");
        assert!(c.absolute("relative").is_err());
    }

    #[test]
    fn unreachable_registry_fails_after_retries() {
        // Bind then drop a listener to get a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let c = Client::new(&host, "app", &PullOptions::default(), false);
        let start = std::time::Instant::now();
        let err = c
            .get_manifest("latest", None, "tag \"latest\"")
            .unwrap_err();
        assert_eq!(err.to_string(), format!("registry {host} is not reachable"));
        assert!(
            start.elapsed() >= Duration::from_millis(1500),
            "retried with backoff"
        );
    }
}
