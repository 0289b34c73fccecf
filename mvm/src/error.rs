//! How mvm fails: one line on stderr, and an exit code that says what kind of failure it was:
//! 2 for bad input (flags, paths, files that are not what they claim to be), a command's own code
//! where the run ends with it (126, 127, 128 + n), 1 for anything that failed later.

/// Exit code for bad input: wrong flags, missing or malformed files.
pub const EXIT_BAD_INPUT: i32 = engine::error::EXIT_BAD_INPUT;
/// Exit code for failures after the input was accepted.
pub const EXIT_FAILURE: i32 = engine::error::EXIT_FAILURE;

/// An error caused by what the user asked for rather than by the machine: exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Shorthand for returning a [`BadInput`] error.
pub fn bad_input(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

/// An engine error as this binary reports it: bad input and command exits keep their exit code.
pub fn from_engine(e: engine::Error) -> anyhow::Error {
    match e {
        engine::Error::Exit(exit) => exit.into(),
        e if e.is_bad_input() => BadInput(engine::error::one_line(&e)).into(),
        e => e.into(),
    }
}

/// A command's exit code, or its error on one line and the code that says what kind it was.
pub fn report(result: anyhow::Result<i32>) -> i32 {
    match result {
        Ok(code) => code,
        Err(err) => {
            // An exit with no message: whoever ended it (the VMM process) said why already.
            if let Some(engine::CommandExit(code, msg)) = err.downcast_ref::<engine::CommandExit>()
            {
                if !msg.is_empty() {
                    eprintln!("mvm: {err:#}");
                }
                return *code;
            }
            eprintln!("mvm: {err:#}");
            if let Some(e) = err.downcast_ref::<engine::Error>() {
                return e.exit_code();
            }
            if err.chain().any(|e| e.is::<BadInput>()) {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILURE
            }
        }
    }
}
