//! From an image's config and the user's overrides to the command, environment, working
//! directory and user of a container, following Docker's rules.
//!
//! - `--entrypoint E` replaces the image's Entrypoint and drops its Cmd.
//! - Arguments given after `--` replace the image's Cmd.
//! - The command is Entrypoint followed by Cmd.
//! - `-e K=V` adds or replaces `K`; `-e K` copies `K` from the caller's environment if set.
//! - `PATH` gets Docker's default when the image does not set it.

use serde::{Deserialize, Serialize};

use super::spec::Process;

/// Docker's default `PATH` for containers whose image does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The parts of an OCI image config that decide how a container starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, `KEY=VALUE` each.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`; empty or absent means `/`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `User`; empty or absent means root.
    #[serde(default)]
    pub user: Option<String>,
}

/// What the user gave on the command line to override the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// `--entrypoint`: `Some("")` clears the Entrypoint.
    #[serde(default)]
    pub entrypoint: Option<String>,
    /// Arguments after `--`: replace the image's Cmd when not empty.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `-e` entries in order: `KEY=VALUE`, or `KEY` to copy from the caller's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// `-w`: the working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// `--user`.
    #[serde(default)]
    pub user: Option<String>,
}

/// Applies Docker's rules to an image config and the user's overrides. `caller_env` answers
/// `-e KEY` without a value (normally `std::env::var`).
pub fn resolve(
    image: &ImageConfig,
    over: &Overrides,
    caller_env: impl Fn(&str) -> Option<String>,
) -> Process {
    let (entrypoint, image_cmd) = match &over.entrypoint {
        Some(e) if e.is_empty() => (Vec::new(), Vec::new()),
        Some(e) => (vec![e.clone()], Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd = if over.cmd.is_empty() {
        image_cmd
    } else {
        over.cmd.clone()
    };
    let mut args = entrypoint;
    args.extend(cmd);

    let mut env: Vec<String> = Vec::new();
    let mut set = |entry: String| {
        let key = entry.split('=').next().unwrap_or_default().to_string();
        match env
            .iter_mut()
            .find(|e| e.split('=').next() == Some(key.as_str()))
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    };
    for e in &image.env {
        set(e.clone());
    }
    for e in &over.env {
        if e.contains('=') {
            set(e.clone());
        } else if let Some(v) = caller_env(e) {
            set(format!("{e}={v}"));
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }

    let cwd = over
        .workdir
        .clone()
        .or_else(|| image.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".to_string());
    let user = over
        .user
        .clone()
        .or_else(|| image.user.clone())
        .filter(|u| !u.is_empty());
    Process {
        args,
        env,
        cwd,
        user,
    }
}

/// The value of `key` in a `KEY=VALUE` list.
pub fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter().find_map(|e| {
        let (k, v) = e.split_once('=')?;
        (k == key).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "NGINX_VERSION=1.25".into()],
            working_dir: Some("/srv".into()),
            user: Some("nginx".into()),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn image_entrypoint_and_cmd_are_used_without_overrides() {
        let p = resolve(&image(), &Overrides::default(), no_env);
        assert_eq!(
            p.args,
            ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"]
        );
        assert_eq!(p.cwd, "/srv");
        assert_eq!(p.user.as_deref(), Some("nginx"));
        assert_eq!(p.env, ["PATH=/usr/bin:/bin", "NGINX_VERSION=1.25"]);
    }

    #[test]
    fn args_after_dashdash_replace_cmd_only() {
        let over = Overrides {
            cmd: vec!["sh".into()],
            ..Default::default()
        };
        let p = resolve(&image(), &over, no_env);
        assert_eq!(p.args, ["/docker-entrypoint.sh", "sh"]);
    }

    #[test]
    fn entrypoint_flag_replaces_entrypoint_and_drops_cmd() {
        let over = Overrides {
            entrypoint: Some("/bin/ls".into()),
            ..Default::default()
        };
        assert_eq!(resolve(&image(), &over, no_env).args, ["/bin/ls"]);
        let over = Overrides {
            entrypoint: Some("/bin/ls".into()),
            cmd: vec!["-l".into()],
            ..Default::default()
        };
        assert_eq!(resolve(&image(), &over, no_env).args, ["/bin/ls", "-l"]);
        let over = Overrides {
            entrypoint: Some(String::new()),
            cmd: vec!["echo".into(), "x".into()],
            ..Default::default()
        };
        assert_eq!(resolve(&image(), &over, no_env).args, ["echo", "x"]);
    }

    #[test]
    fn env_flags_merge_over_image_env() {
        let over = Overrides {
            env: vec![
                "NGINX_VERSION=2".into(),
                "NEW=x=y".into(),
                "FROM_CALLER".into(),
                "UNSET".into(),
            ],
            ..Default::default()
        };
        let p = resolve(&image(), &over, |k| {
            (k == "FROM_CALLER").then(|| "c".to_string())
        });
        assert_eq!(
            p.env,
            [
                "PATH=/usr/bin:/bin",
                "NGINX_VERSION=2",
                "NEW=x=y",
                "FROM_CALLER=c"
            ]
        );
        assert_eq!(env_value(&p.env, "NEW"), Some("x=y"));
    }

    #[test]
    fn missing_path_gets_docker_default_and_workdir_flag_wins() {
        let over = Overrides {
            cmd: vec!["true".into()],
            workdir: Some("/tmp".into()),
            user: Some("1000:1000".into()),
            ..Default::default()
        };
        let p = resolve(&ImageConfig::default(), &over, no_env);
        assert_eq!(p.env, [format!("PATH={DEFAULT_PATH}")]);
        assert_eq!(p.cwd, "/tmp");
        assert_eq!(p.user.as_deref(), Some("1000:1000"));
        let p = resolve(&ImageConfig::default(), &Overrides::default(), no_env);
        assert!(p.args.is_empty());
        assert_eq!(p.cwd, "/");
    }
}
