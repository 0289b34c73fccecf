//! Snapshots of a whole microVM: its vCPUs, its in-kernel interrupt controllers, PIT and clock,
//! every device, and its memory; and the format they are kept in.
//!
//! A snapshot is a directory of two files:
//!
//! - `memory`: guest RAM, the regions one after the other, sparse ([`memory`]). Restored VMs
//!   map it `MAP_PRIVATE`, so every VM restored from it shares its pages until it writes them.
//! - `state`: everything else ([`SnapshotState`]), in this layout:
//!
//! | bytes | what |
//! | --- | --- |
//! | 0..8 | magic `MVMSNAP\0` |
//! | 8..12 | format version, u32 little endian ([`FORMAT_VERSION`]) |
//! | 12..20 | length N of the body, u64 little endian |
//! | 20..20+N | the body: [`SnapshotState`] as JSON (sections: `mvm_version`, `cpu`, `machine`, `memory`, `vcpus`, `vm`, `devices`) |
//! | 20+N..24+N | CRC-32 of every byte before it, little endian |
//!
//! Reading refuses, each with one line: a file that is not a snapshot, another format version,
//! a snapshot of another mvm version, a checksum that does not match (corrupted or truncated),
//! a snapshot taken on another CPU or CPU template, and a memory file whose length or checksum
//! does not match the state (checked by [`SnapshotState::verify_memory`]).
//!
//! The VM is saved with its vCPUs parked outside KVM_RUN and its event loop busy saving (so no
//! device moves); see [`crate::builder::RunningVm`] for how a snapshot is requested and
//! [`crate::builder::VmBuilder::restore`] for the way back.

pub mod cpu;
pub mod memory;
pub mod take;
pub mod vmstate;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cpu::{CpuStateError, VcpuState};
pub use memory::{MemoryFileError, MemoryInfo};
pub use vmstate::VmState;

use crate::device_manager::{DeviceManagerError, DevicesState};

/// First bytes of a state file.
pub const MAGIC: &[u8; 8] = b"MVMSNAP\0";
/// Version of the state file layout and of every state it holds; bumped on any change a
/// reader of the previous version could misread.
pub const FORMAT_VERSION: u32 = 1;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state file mvm reads (a VM with 32 vCPUs needs well under 2 MiB).
const MAX_STATE_LEN: u64 = 16 << 20;
const HEADER_LEN: usize = 20;

/// The version of mvm that writes snapshots (a snapshot of another version is refused).
pub fn mvm_version() -> String {
    format!("{}+format{FORMAT_VERSION}", env!("CARGO_PKG_VERSION"))
}

/// Why a snapshot could not be taken, read or restored. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading or writing a snapshot file failed.
    #[error("snapshot file {0}")]
    Io(String, #[source] std::io::Error),
    /// Not an mvm snapshot (or its first bytes are damaged).
    #[error("{0} is not an mvm snapshot")]
    NotASnapshot(String),
    /// Another format version.
    #[error("snapshot format {0} cannot be read by this mvm (format {FORMAT_VERSION}): take the snapshot again")]
    Format(u32),
    /// Written by another mvm version.
    #[error("snapshot was taken by mvm {0}, this is mvm {1}: take the snapshot again")]
    Version(String, String),
    /// The state file is damaged or cut short.
    #[error("snapshot state {0} is corrupted or truncated")]
    Corrupted(String),
    /// Taken on another CPU or with another CPU template.
    #[error("snapshot was taken on another CPU or CPU template ({saved}; this host: {now})")]
    Cpu {
        /// The snapshot's.
        saved: String,
        /// This host's.
        now: String,
    },
    /// The memory file does not match the state.
    #[error(transparent)]
    Memory(#[from] MemoryFileError),
    /// A vCPU could not be saved or restored.
    #[error("vCPU {0}")]
    Vcpu(u8, #[source] CpuStateError),
    /// The VM's interrupt controllers, PIT or clock.
    #[error("VM state")]
    Vm(#[source] CpuStateError),
    /// A device.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// The VM ended, or its vCPUs did not stop in time.
    #[error("{0}")]
    Stopped(String),
    /// The snapshot is for another machine shape.
    #[error("snapshot is of a VM with {saved}; this VM has {now}")]
    Machine {
        /// The snapshot's.
        saved: String,
        /// This VM's.
        now: String,
    },
}

impl SnapshotError {
    /// Whether the snapshot itself (or the way it is used) is at fault, not the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SnapshotError::NotASnapshot(_)
                | SnapshotError::Format(_)
                | SnapshotError::Version(..)
                | SnapshotError::Corrupted(_)
                | SnapshotError::Cpu { .. }
                | SnapshotError::Memory(
                    MemoryFileError::Size { .. } | MemoryFileError::Checksum { .. }
                )
                | SnapshotError::Machine { .. }
                | SnapshotError::Devices(DeviceManagerError::Layout(_))
        )
    }
}

/// What a snapshot may only be restored on: the CPU (vendor, family, model, stepping), what
/// serves /dev/kvm, and mvm's CPU template for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFingerprint {
    /// CPUID vendor string.
    pub vendor: String,
    /// CPUID leaf 1 eax (family, model, stepping).
    pub signature: u32,
    /// vmx, svm or pvm.
    pub virtualization: String,
    /// The CPU template mvm applies on this host.
    pub template: String,
}

impl std::fmt::Display for CpuFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:#x}, {}, template {}",
            self.vendor, self.signature, self.virtualization, self.template
        )
    }
}

impl CpuFingerprint {
    /// This host's.
    pub fn host(kvm: &kvm_ioctls::Kvm) -> Self {
        let (leaf0, leaf1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        let virt = crate::host::virtualization();
        let template = crate::vcpu::cpu_template(kvm, virt);
        Self {
            vendor: String::from_utf8_lossy(&vendor).into_owned(),
            signature: leaf1.eax,
            virtualization: format!("{virt:?}").to_lowercase(),
            template: format!(
                "hide_unemulated={},tsc_deadline={}",
                template.hide_unemulated, template.tsc_deadline
            ),
        }
    }
}

/// The shape of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} MiB and {} vCPU(s)", self.mem_bytes >> 20, self.vcpus)
    }
}

/// Everything but the memory.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// [`mvm_version`] of the mvm that took it.
    pub mvm_version: String,
    /// Where it may be restored.
    pub cpu: CpuFingerprint,
    /// Memory size and vCPUs.
    pub machine: Machine,
    /// The memory file's length and checksum.
    pub memory: MemoryInfo,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Every device.
    pub devices: DevicesState,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Io(path.display().to_string(), e)
}

/// The state file of snapshot directory `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// The memory file of snapshot directory `dir`.
pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_FILE)
}

/// The two files of a snapshot about to be taken, created (empty) before it is asked for: a
/// confined VMM opens no file by path, so its supervisor's setup creates them, and the save
/// only writes through the descriptors. An interrupted save leaves an empty or short state
/// file, which reads as corrupted or truncated.
#[derive(Debug)]
pub struct SnapshotFiles {
    dir: PathBuf,
    memory: std::fs::File,
    state: std::fs::File,
}

impl SnapshotFiles {
    /// Creates the state and memory files in directory `dir` (neither may exist yet).
    pub fn create(dir: &Path) -> Result<Self, SnapshotError> {
        let new = |path: PathBuf| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io(&path))
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            memory: new(memory_path(dir))?,
            state: new(state_path(dir))?,
        })
    }

    /// The state and memory files of a snapshot into `dir`, created (empty, writable) by
    /// another process and handed over (a running VM's snapshot, asked for on its control
    /// socket by `mvm snapshot create`).
    pub fn from_files(dir: PathBuf, memory: std::fs::File, state: std::fs::File) -> Self {
        Self { dir, memory, state }
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The memory file, to be written.
    pub(crate) fn memory_file(&self) -> &std::fs::File {
        &self.memory
    }
}

impl SnapshotState {
    /// The state file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let body = serde_json::to_vec(self)
            .map_err(|e| SnapshotError::Io("state".into(), std::io::Error::other(e)))?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses and checks a state file's bytes (`name` for messages): magic, format, checksum,
    /// mvm version. The CPU is checked by [`SnapshotState::check_host`].
    pub fn decode(bytes: &[u8], name: &str) -> Result<Self, SnapshotError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot(name.into()));
        }
        let corrupted = || SnapshotError::Corrupted(name.into());
        let header = bytes.get(..HEADER_LEN).ok_or_else(corrupted)?;
        let format = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&header[12..20]);
        let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| corrupted())?;
        let end = HEADER_LEN.checked_add(len).ok_or_else(corrupted)?;
        if bytes.len() != end + 4 {
            return Err(corrupted());
        }
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[end..]);
        if crc32fast::hash(&bytes[..end]) != u32::from_le_bytes(crc) {
            return Err(corrupted());
        }
        if format != FORMAT_VERSION {
            return Err(SnapshotError::Format(format));
        }
        let state: SnapshotState =
            serde_json::from_slice(&bytes[HEADER_LEN..end]).map_err(|_| corrupted())?;
        if state.mvm_version != mvm_version() {
            return Err(SnapshotError::Version(state.mvm_version, mvm_version()));
        }
        if state.vcpus.len() != usize::from(state.machine.vcpus) || state.vcpus.is_empty() {
            return Err(corrupted());
        }
        if state.memory.size != state.machine.mem_bytes {
            return Err(corrupted());
        }
        Ok(state)
    }

    /// Writes the state file of `files` (the memory file is already written), synced.
    pub fn write(&self, files: &mut SnapshotFiles) -> Result<(), SnapshotError> {
        let path = state_path(&files.dir);
        let bytes = self.encode()?;
        files.state.write_all(&bytes).map_err(io(&path))?;
        files.state.sync_all().map_err(io(&path))
    }

    /// Reads and checks the state file of snapshot directory `dir` (not the memory file).
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let path = state_path(dir);
        let len = std::fs::metadata(&path).map_err(io(&path))?.len();
        let name = dir.display().to_string();
        if len > MAX_STATE_LEN {
            return Err(SnapshotError::Corrupted(name));
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        Self::decode(&bytes, &name)
    }

    /// Refuses a snapshot taken on another CPU or CPU template.
    pub fn check_host(&self, kvm: &kvm_ioctls::Kvm) -> Result<(), SnapshotError> {
        let now = CpuFingerprint::host(kvm);
        if now != self.cpu {
            return Err(SnapshotError::Cpu {
                saved: self.cpu.to_string(),
                now: now.to_string(),
            });
        }
        Ok(())
    }

    /// Checks the memory file of `dir` against the state: length and checksum.
    pub fn verify_memory(&self, dir: &Path) -> Result<(), SnapshotError> {
        Ok(memory::verify(&memory_path(dir), &self.memory)?)
    }
}

#[cfg(test)]
mod tests;
