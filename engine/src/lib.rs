//! The mvm container engine: everything between the command line and the hypervisor.
//!
//! A request is followed in one direction: the CLI builds a [`spec::RunSpec`] and hands it to
//! [`run::run`], which validates it once, resolves the image ([`image`]), registers the
//! container ([`state`], [`runner`]) and runs it in the isolation the spec asks for: a microVM
//! ([`microvm`] over the `vmm` crate, with the guest agent of `guest_agent` inside; published
//! ports through [`portfwd`], the guest's address from [`hostnet`]), a container on the host or
//! a plain process. [`lifecycle`] acts on registered containers from any shell. [`compare`] runs
//! one image in every isolation mode and measures them side by side.
//!
//! Nothing here parses command-line flags or prints tables; errors carry their exit code
//! ([`Error::exit_code`]).
#![deny(missing_docs)]

pub mod compare;
pub mod confine;
pub mod control;
pub mod copy;
pub mod dns;
pub mod error;
pub mod hostnet;
pub mod image;
pub mod lifecycle;
pub mod logs;
pub mod microvm;
pub mod portfwd;
pub mod restart;
pub mod run;
pub mod runner;
pub mod selfexec;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod stats;
pub mod template;
pub mod terminal;
pub mod units;

pub use error::{CommandExit, Error};
pub use run::{run, Exit, RunOutcome};
pub use spec::RunSpec;
