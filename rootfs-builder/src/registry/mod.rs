//! An OCI distribution (registry API v2) client: anonymous bearer tokens, manifests and indexes,
//! blob downloads checked against their digests, retries for transient failures, and monolithic
//! uploads for `push`.
//!
//! Registries on `localhost`, `127.0.0.0/8` and `[::1]` are spoken to over plain HTTP, as Docker
//! does; others over HTTPS unless listed in [`PullOptions::insecure_registries`].
//!
//! Progress (when [`PullOptions::progress`] is set) goes to stderr: one line per blob when it is
//! done or already present, and, only when stderr is a terminal, a byte counter for the blob being
//! downloaded, redrawn in place at most every 200 ms.

mod auth;
mod client;
mod progress;
mod pull;
mod push;

use std::io;
use std::path::PathBuf;

pub use auth::{parse_challenge, Challenge};
pub use client::{uses_plain_http, Client};
pub use progress::human as human_size;
pub use pull::pull;
pub use push::push;

use crate::digest::DigestError;
use crate::manifest::ManifestError;
use crate::store::StoreError;

/// Options for [`pull`] and [`push`].
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// Registries (`host` or `host:port`) to reach over plain HTTP even though they are not local.
    pub insecure_registries: Vec<String>,
    /// Print progress on stderr.
    pub progress: bool,
    /// Operating system to select from an index.
    pub os: String,
    /// Architecture to select from an index (Go name).
    pub architecture: String,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            progress: false,
            os: "linux".to_string(),
            architecture: "amd64".to_string(),
        }
    }
}

/// Why a connection failed, worded once (ureq's own message repeats its source).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(String);

impl From<ureq::Transport> for TransportError {
    fn from(t: ureq::Transport) -> Self {
        use std::error::Error;
        let text = match t.source() {
            Some(cause) => cause.to_string(),
            None => match t.message() {
                Some(m) => format!("{}: {m}", t.kind()),
                None => t.kind().to_string(),
            },
        };
        TransportError(text)
    }
}

/// Errors talking to a registry or storing what it sent.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Nothing answered (after retries).
    #[error("registry {host} is not reachable")]
    Unreachable {
        /// Registry host.
        host: String,
        /// The last transport error.
        #[source]
        source: TransportError,
    },
    /// The registry says the thing does not exist.
    #[error("{what} not found in {host}/{repository}")]
    NotFound {
        /// What was asked for: `tag "v1"`, `blob sha256:...`.
        what: String,
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
    },
    /// The registry wants credentials we do not have.
    #[error(
        "registry {host} denied access to {repository} (anonymous access only: the repository \
         may be private or may not exist)"
    )]
    Denied {
        /// Registry host.
        host: String,
        /// Repository.
        repository: String,
    },
    /// The registry asked for an authentication scheme other than anonymous bearer tokens.
    #[error("registry {host} requires {scheme} authentication, which mvm does not support")]
    UnsupportedAuth {
        /// Registry host.
        host: String,
        /// The scheme in its challenge.
        scheme: String,
    },
    /// The token endpoint failed.
    #[error("could not get an access token from {realm}: {detail}")]
    Token {
        /// The token URL.
        realm: String,
        /// What went wrong.
        detail: String,
    },
    /// Any other unexpected HTTP status.
    #[error("registry {host} answered {status} to {what}{detail}")]
    Status {
        /// Registry host.
        host: String,
        /// The request, in words.
        what: String,
        /// HTTP status.
        status: u16,
        /// `: <code>: <message>` from the registry's error body, or empty.
        detail: String,
    },
    /// Content did not match its digest or size.
    #[error("{what} from {host} failed verification")]
    Verify {
        /// What was downloaded.
        what: String,
        /// Registry host.
        host: String,
        /// The mismatch.
        #[source]
        source: DigestError,
    },
    /// More bytes than the manifest promised.
    #[error("{what} from {host} is larger than the {limit} bytes expected")]
    TooLarge {
        /// What was downloaded.
        what: String,
        /// Registry host.
        host: String,
        /// The size expected.
        limit: u64,
    },
    /// Reading a response failed (after retries).
    #[error("reading {what} from {host} failed")]
    Read {
        /// What was being read.
        what: String,
        /// Registry host.
        host: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A manifest we cannot use.
    #[error("{what} from {host} is unusable")]
    Manifest {
        /// Which manifest.
        what: String,
        /// Registry host.
        host: String,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// The image config does not parse.
    #[error("image config {digest} is malformed")]
    BadConfig {
        /// Config digest.
        digest: String,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// The upload location header is missing or odd.
    #[error("registry {host} gave no usable upload location")]
    BadLocation {
        /// Registry host.
        host: String,
    },
    /// A local file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
