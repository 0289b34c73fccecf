//! VM templates of `mvm run` under the VMM's jail (see [`crate::template`] for the store and
//! [`crate::microvm::TemplateVm`] for the VM).
//!
//! The runner, privileged, decides: a run of a shape that has a template restores it (its
//! VMM opens the template's files before entering its jail); a run of a shape that has none
//! first has one made by a VMM process of its own, jailed and filtered like any other: the
//! runner creates the template's `.tmp-...` directory, that VMM creates the snapshot's files
//! in it before its jail and writes them through their descriptors once the guest's agent
//! answers, and the runner renames the directory into place only once the VMM said it saved
//! it (so no half-written template is ever listed), then starts the run's VMM to restore it.
//! Where this host's KVM cannot save or restore a VM, the runner says so in one line, notes it
//! in the store and runs the VM cold.

use std::path::Path;

use super::context::Run;
use crate::confine::{self, JailPlan, VmmCgroup, VmmEvent, VmmExit, VmmRequest};
use crate::error::{CommandExit, Error, EXIT_FAILURE};
use crate::microvm::{self, MicroVm, MicroVmError, MicroVmSpec, Restore, TemplateJob, TemplateVm};
use crate::spec::RunSpec;
use crate::template::{TemplateInfo, TemplateStore};

/// The VMM job kind that makes a template (the value of [`confine::VMM_ENV`]).
pub const TEMPLATE_JOB: &str = "template";

/// Where the VM's template is kept, unless the run boots cold: with `--cold` and where
/// `MVM_TEMPLATES=0`.
pub(super) fn store(root: &Path, spec: &RunSpec) -> Result<Option<TemplateStore>, Error> {
    if spec.cold || std::env::var("MVM_TEMPLATES").is_ok_and(|v| v == "0") {
        return Ok(None);
    }
    Ok(Some(TemplateStore::open(root)?))
}

/// Says once that this host cannot keep templates, and notes it in the store.
pub(super) fn host_cannot(store: &TemplateStore, why: &str) {
    eprintln!("mvm: note: this host's KVM cannot {why}; booting cold (templates stay off here until `mvm template prune -a`)");
    store.mark_unsupported(why);
}

/// The template the run of `vm_spec` restores: the one of its shape, made first (by a VMM of
/// its own, in `plan`'s jail and `cgroup`) where there is none; `None` where this host cannot
/// keep templates.
pub(super) fn pick(
    run: &mut Run<'_>,
    store: &TemplateStore,
    vm_spec: &MicroVmSpec,
    plan: &JailPlan,
    cgroup: Option<&VmmCgroup>,
) -> Result<Option<Restore>, Error> {
    if let Some(why) = store.unsupported() {
        log::info!("no template: this host's KVM cannot {why}; booting cold");
        return Ok(None);
    }
    let key = microvm::template_key(vm_spec)?;
    let id = key.id();
    if let Some(dir) = store.find(&key) {
        return Ok(Some(Restore { dir, id }));
    }
    let tmp = store.begin(&key)?;
    let job = TemplateJob {
        spec: vm_spec.clone(),
        dir: tmp.clone(),
        id: id.clone(),
    };
    let made = make(run, &job, plan, cgroup);
    // What the template VM left that is no part of the template.
    let _ = std::fs::remove_file(job.vsock_path());
    for i in 0..=vm_spec.volumes.len() {
        let _ = std::fs::remove_file(job.placeholder(i));
    }
    let outcome = match made {
        Ok(Made::Saved { boot_ms }) => {
            let info = TemplateInfo {
                key,
                created: crate::state::now(),
                boot_ms,
            };
            // Only now, complete, is it moved where `ls` lists it and runs find it.
            return Ok(Some(Restore {
                dir: store.commit(&tmp, &info)?,
                id,
            }));
        }
        Ok(Made::HostCannot(why)) => {
            host_cannot(store, &why);
            Ok(None)
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&tmp);
    outcome
}

/// How a template VMM ended.
enum Made {
    Saved { boot_ms: u64 },
    HostCannot(String),
}

/// Starts the VMM that makes `job`'s template and waits for it.
fn make(
    run: &mut Run<'_>,
    job: &TemplateJob,
    plan: &JailPlan,
    cgroup: Option<&VmmCgroup>,
) -> Result<Made, Error> {
    let vmm = confine::spawn(
        TEMPLATE_JOB,
        job,
        plan.clone(),
        run.spec.vmm.seccomp,
        cgroup,
    )
    .map_err(super::vm::confine_error)?;
    let dirs = cgroup.map(|c| c.dirs().to_vec()).unwrap_or_default();
    run.guard.vmm(vmm.pid(), dirs)?;
    let (mut saved, mut cannot) = (None, None);
    let exit = vmm
        .wait(|event| match event {
            VmmEvent::TemplateSaved { boot_ms } => saved = Some(boot_ms),
            VmmEvent::HostCannotSnapshot(why) => cannot = Some(why),
            _ => {}
        })
        .map_err(super::vm::confine_error)?;
    match (exit, saved, cannot) {
        (VmmExit::Code(0), Some(boot_ms), _) => Ok(Made::Saved { boot_ms }),
        (VmmExit::Code(_), _, Some(why)) => Ok(Made::HostCannot(why)),
        // The VMM said why on stderr, which is the user's (or the -d client's).
        (VmmExit::Code(code), ..) => Err(CommandExit(code.max(1), String::new()).into()),
        (VmmExit::Signal(libc::SIGSYS), ..) => Err(CommandExit(EXIT_FAILURE, String::new()).into()),
        (VmmExit::Signal(sig), ..) => Err(Error::Failed(format!(
            "the VMM process making template {} was killed by signal {sig}",
            job.id
        ))),
    }
}

/// The VMM process that makes a template (see the module): builds the template's VM and
/// creates the snapshot's files, enters its jail, boots the guest to its agent and saves it.
pub fn vmm_main(req: &VmmRequest) -> Result<i32, Error> {
    vmm::signals::install();
    req.send(&VmmEvent::Started);
    let job: TemplateJob = req.job().map_err(super::vm::confine_error)?;
    let vm = TemplateVm::prepare(&job)?;
    confine::hand_over(req.jail(), &[vm.vsock_path()]).map_err(super::vm::confine_error)?;
    req.confine().map_err(super::vm::confine_error)?;
    if let Some(sig) = vmm::signals::received() {
        let msg = format!("stopped by signal {sig} before the template's VM started");
        return Err(CommandExit(128 + sig, msg).into());
    }
    match vm.boot_and_save() {
        Ok(boot_ms) => {
            req.send(&VmmEvent::TemplateSaved { boot_ms });
            Ok(0)
        }
        Err(MicroVmError::HostCannotSnapshot(why)) => {
            req.send(&VmmEvent::HostCannotSnapshot(why));
            Ok(EXIT_FAILURE)
        }
        Err(e) => Err(e.into()),
    }
}

/// Prepares the run's VM (restoring its template, if it has one); where this host's KVM turns
/// out unable to restore it, tells the supervisor and returns `None` (the VMM then exits and
/// the supervisor starts it again, cold).
pub(super) fn prepare_run(
    req: &VmmRequest,
    spec: &MicroVmSpec,
) -> Result<Option<microvm::PreparedVm>, Error> {
    match MicroVm::prepare(spec) {
        Ok(prepared) => Ok(Some(prepared)),
        Err(MicroVmError::HostCannotSnapshot(why)) => {
            req.send(&VmmEvent::HostCannotSnapshot(why));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
