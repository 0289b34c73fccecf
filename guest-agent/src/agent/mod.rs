//! The agent: PID 1 duties in the guest ([`init`]), vsock sockets ([`vsock`]), the protocol
//! server that runs containers for the host ([`server`]) and the host's client ([`client`]).

pub mod client;
pub mod init;
pub mod poll;
pub mod portfwd;
pub mod restored;
pub mod server;
pub mod vsock;
