//! Tables generated from the kernel's headers (see `generate.sh`); never edited by hand.

mod syscalls_x86_64;

pub(crate) use syscalls_x86_64::SYSCALLS;
