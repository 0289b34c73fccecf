//! The agent: PID 1 duties in the guest ([`init`]), vsock sockets ([`vsock`]), and the protocol
//! server that runs containers for the host.

pub mod init;
pub mod vsock;
