//! Running host tools (sfdisk, mkfs.vfat, grub-mkrescue, cargo, ...) with errors that name the
//! command and show what it printed.

use std::fmt;
use std::io::Write;
use std::process::{Command, Stdio};

/// A host tool that could not run or failed.
#[derive(Debug)]
pub enum ToolError {
    /// The program could not be started (usually: not installed).
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// The program ran and exited unsuccessfully.
    Failed {
        command: String,
        status: String,
        output: String,
    },
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::Spawn { command, source } => write!(
                f,
                "cannot run `{command}`: {source} (is it installed? run scripts/setup.sh)"
            ),
            ToolError::Failed {
                command,
                status,
                output,
            } => write!(f, "`{command}` failed ({status}):\n{}", output.trim_end()),
        }
    }
}

impl std::error::Error for ToolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ToolError::Spawn { source, .. } => Some(source),
            ToolError::Failed { .. } => None,
        }
    }
}

/// The command line as a shell-like string, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with `stdin` as its input; returns its stdout.
pub fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Vec<u8>, ToolError> {
    let command = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ToolError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe; its exit status then tells what went wrong.
        let _ = pipe.write_all(data);
    }
    let out = child
        .wait_with_output()
        .map_err(|source| ToolError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(ToolError::Failed {
            command,
            status: out.status.to_string(),
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_returns_stdout() {
        let out = run(Command::new("cat").arg("-"), Some(b"hello")).unwrap();
        assert_eq!(out, b"hello");
    }

    #[test]
    fn failure_names_command_and_output() {
        let e = run(
            Command::new("sh").args(["-c", "echo oops >&2; exit 3"]),
            None,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("`sh -c echo oops >&2; exit 3` failed (exit status: 3)"),
            "{msg}"
        );
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn missing_program_is_named() {
        let e = run(&mut Command::new("/nonexistent/ally-tool"), None).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("cannot run `/nonexistent/ally-tool`"));
    }
}
