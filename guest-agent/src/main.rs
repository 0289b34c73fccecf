//! `mvm-agent`: PID 1 of the mvm guest.
fn main() {}
