//! How mvm starts itself again (the runner, the VMM process, `compare`'s measured child):
//! through `/proc/self/exe`, the very binary that is running, even where its file has been
//! replaced meanwhile (an upgrade, a rebuild). A parent and the child it hands a spec, a job or
//! a socket to are then always the same version. The child keeps mvm's `argv[0]`, and
//! [`name_self`] gives it mvm's process name back (an exec through `/proc/self/exe` names a
//! process `exe`).

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The running binary, whatever has become of its file.
pub const SELF_EXE: &str = "/proc/self/exe";

/// The name this process was started as (its `argv[0]`), for its child's `argv[0]`.
pub fn argv0() -> OsString {
    std::env::args_os()
        .next()
        .unwrap_or_else(|| OsString::from("mvm"))
}

/// A command that runs this very binary again, as `argv[0]`.
pub fn command() -> Command {
    let mut cmd = Command::new(SELF_EXE);
    cmd.arg0(argv0());
    cmd
}

/// `argv[0]` as a C string, for a raw execve of [`SELF_EXE`].
pub fn argv0_c() -> CString {
    CString::new(argv0().as_bytes()).unwrap_or_else(|_| c"mvm".to_owned())
}

/// Where this process was exec'd through [`SELF_EXE`] (its name is then `exe`), names it after
/// its `argv[0]` again, as `ps` and `top` show it. Call first thing in `main`.
pub fn name_self() {
    let comm = std::fs::read("/proc/self/comm").unwrap_or_default();
    if comm.strip_suffix(b"\n").unwrap_or(&comm) != b"exe" {
        return;
    }
    let arg0 = argv0();
    let base = std::path::Path::new(&arg0)
        .file_name()
        .map_or_else(|| b"mvm".to_vec(), |n| n.as_bytes().to_vec());
    // The kernel keeps 15 bytes of a name.
    let name: Vec<u8> = base.into_iter().filter(|b| *b != 0).take(15).collect();
    if let Ok(name) = CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    }
}
