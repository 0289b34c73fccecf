//! The VM of a template (see [`crate::template`] for the store and `crate::run` for who makes
//! and restores one): the run's VM, booted with `mvm.template=1` and nothing of the run, saved
//! by a jailed VMM through files created before its jail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::virtio::block::BlockLimits;
use devices::virtio::rate_limiter::Limit;
use guest_agent::guest::BootParams;
use guest_agent::protocol::AGENT_VSOCK_PORT;
use vmm::builder::VmBuilder;
use vmm::seccomp::{self, ThreadKind};
use vmm::snapshot::SnapshotFiles;
use vmm::virtio_devices::{self, DevicesConfig, NetworkMode};

use super::{
    error_chain, kvm_cannot, run_disks, vm_config, ConsoleTail, Launched, MicroVmError, MicroVmSpec,
};
use crate::template::{FileId, TemplateKey};

/// The template a run of `spec` restores.
pub fn template_key(spec: &MicroVmSpec) -> Result<TemplateKey, MicroVmError> {
    let id = |path: &Path| {
        FileId::of(path).map_err(|e| MicroVmError::Template("key".into(), e.to_string()))
    };
    Ok(TemplateKey {
        mvm_version: vmm::snapshot::mvm_version(),
        kernel: id(&spec.kernel)?,
        initrd: id(&spec.initrd)?,
        kernel_args: spec.kernel_args.trim().to_string(),
        mem_bytes: spec.mem_bytes,
        vcpus: spec.vcpus,
        disks: run_disks(spec)
            .iter()
            .map(|d| if d.read_only { "ro" } else { "rw" }.to_string())
            .collect(),
        network: match &spec.network {
            NetworkMode::None => "none",
            NetworkMode::User => "user",
            NetworkMode::Tap { .. } => "tap",
        }
        .to_string(),
    })
}

/// What the runner hands the VMM process that makes a template: the run's VM, and the
/// template's unfinished directory (`.tmp-...` under the templates; the runner renames it into
/// place once the VMM saved it, and removes it otherwise).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateJob {
    /// The run's VM (its shape: kernel, agent, memory, vCPUs, devices; nothing else of it is
    /// used).
    pub spec: MicroVmSpec,
    /// The template's directory, being made.
    pub dir: PathBuf,
    /// The template's id, for messages.
    pub id: String,
}

impl TemplateJob {
    /// Where the template VM's vsock socket is: in the run's directory, which its jail shows
    /// (the template's own directory is never in a jail).
    pub fn vsock_path(&self) -> PathBuf {
        self.spec.run_dir.join("template-vsock.sock")
    }

    /// The empty disk standing in for the run's disk `i` in the template.
    pub fn placeholder(&self, i: usize) -> PathBuf {
        self.dir.join(format!("placeholder-{i}.img"))
    }
}

/// A template's VM set up but not running: booted with `mvm.template=1` and nothing of the run
/// (empty placeholder disks), and the snapshot's files created in the template's directory, so
/// the jailed VMM writes the snapshot through them and opens nothing.
pub struct TemplateVm {
    builder: VmBuilder,
    files: SnapshotFiles,
    vsock: PathBuf,
    console: ConsoleTail,
    boot_timeout: Duration,
    id: String,
}

impl std::fmt::Debug for TemplateVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemplateVm")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl TemplateVm {
    /// Builds the template's VM and its devices and creates the snapshot's files (before the
    /// jail).
    pub fn prepare(job: &TemplateJob) -> Result<TemplateVm, MicroVmError> {
        let spec = &job.spec;
        let failed =
            |what: &str, e: String| MicroVmError::Template(job.id.clone(), format!("{what}: {e}"));
        let boot = BootParams {
            port: Some(AGENT_VSOCK_PORT),
            log: spec.boot.log.clone(),
            template: true,
            ..BootParams::default()
        };
        let console = job.dir.join("console.log");
        let mut builder = VmBuilder::new(vm_config(spec, &boot, console.clone()))?;
        let mut disks = run_disks(spec);
        for (i, disk) in disks.iter_mut().enumerate() {
            let placeholder = job.placeholder(i);
            std::fs::write(&placeholder, b"")
                .map_err(|e| failed("cannot create a placeholder disk", e.to_string()))?;
            disk.path = placeholder;
            disk.limits = BlockLimits::default();
        }
        let vsock = job.vsock_path();
        virtio_devices::attach(
            &mut builder,
            &DevicesConfig {
                disks,
                network: spec.network.clone(),
                vsock: Some(vsock.clone()),
                rng: true,
                net_limit: Limit::default(),
                // A run's resolvers are its own (crate::dns), written into its container.
                dns_forward: None,
                dns: Vec::new(),
            },
        )?;
        let files = SnapshotFiles::create(&job.dir)
            .map_err(|e| failed("cannot create it", error_chain(&e)))?;
        Ok(TemplateVm {
            builder,
            files,
            vsock,
            console: ConsoleTail::open(console),
            boot_timeout: spec.boot_timeout,
            id: job.id.clone(),
        })
    }

    /// The template VM's vsock socket (handed to the jail's user before the jail).
    pub fn vsock_path(&self) -> &Path {
        &self.vsock
    }

    /// Boots the guest to its agent, saves it while the agent waits for a run's setup, and
    /// ends it; returns how long the boot took, in milliseconds. Every thread is confined as in
    /// [`MicroVm::start`].
    pub fn boot_and_save(mut self) -> Result<u64, MicroVmError> {
        let t0 = Instant::now();
        let vm = Launched::new(self.builder.start()?)?;
        seccomp::confine(ThreadKind::Runner).map_err(|e| vm.stop_with(e.into()))?;
        vm.release.release();
        // The agent answers: it is ready and waits for a setup. Save it as it is.
        let client = vm
            .agent(&self.vsock, &mut self.console, self.boot_timeout)
            .map_err(|e| {
                MicroVmError::Template(self.id.clone(), format!("booting it: {}", error_chain(&e)))
            })?;
        let boot_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let saved = vm.controller.snapshot(self.files);
        drop(client);
        vm.stop_and_wait();
        let report = saved.map_err(|e| match e {
            e if kvm_cannot(&e) => {
                MicroVmError::HostCannotSnapshot(format!("save a VM: {}", error_chain(&e)))
            }
            e => MicroVmError::Template(
                self.id.clone(),
                format!("cannot save it: {}", error_chain(&e)),
            ),
        })?;
        log::debug!(
            "template {}: booted in {boot_ms} ms, saved in {} ms ({} pages of data)",
            self.id,
            report.paused_for.as_millis(),
            report.data_pages
        );
        Ok(boot_ms)
    }
}
