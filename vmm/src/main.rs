//! `mvm`: run OCI images in KVM microVMs. A thin shell over the `vmm` library: parse the command
//! line, run the command, print one error line on failure and exit with the right code.

fn main() {
    std::process::exit(vmm::cli::main());
}
