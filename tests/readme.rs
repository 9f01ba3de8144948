//! README.md is a test: every ```sh / ```bash block runs, in order and as one shell session,
//! in a fresh folder (holding a copy of `docs/`, as a clone would), with the freshly built
//! `tms-gateway` on PATH instead of `cargo install`. The README uses the default ports
//! 8883 and 8080, as a newcomer would, so the test first checks that they are free. Blocks
//! fenced otherwise (```console, ```text) are shown, not run.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tms-gateway");
const README: &str = include_str!("../README.md");
const REGISTRATION: &str = include_str!("../docs/registration.json");

/// The whole README walk, including the simulated devices, takes well under a minute.
const DEADLINE: Duration = Duration::from_secs(300);

/// The bodies of the README's shell blocks, in order.
fn shell_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        let fence = line.trim_start();
        match &mut current {
            None => {
                if let Some(info) = fence.strip_prefix("```")
                    && matches!(info.trim(), "sh" | "bash")
                {
                    current = Some(String::new());
                }
            }
            Some(body) => {
                if fence.starts_with("```") {
                    blocks.push(std::mem::take(body));
                    current = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    assert!(current.is_none(), "README.md ends inside a code block");
    blocks
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn shell_blocks_are_the_sh_and_bash_fences_only() {
    let md = "a\n```sh\necho one\n```\n```console\nrm -rf /\n```\n```bash\necho two\necho three\n```\n```\ndiagram\n```\n";
    assert_eq!(
        shell_blocks(md),
        vec!["echo one\n", "echo two\necho three\n"]
    );
}

#[test]
fn every_shell_block_of_the_readme_runs_as_written() {
    let blocks = shell_blocks(README);
    assert!(
        blocks.iter().any(|b| b.contains("tms-gateway serve &")),
        "the README starts a gateway: {blocks:#?}"
    );
    for addr in ["127.0.0.1:8080", "0.0.0.0:8883"] {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            panic!(
                "the README uses the default ports and {addr} is taken ({e}): stop whatever \
                 listens there (another tms-gateway serve?) and run this test again"
            );
        }
    }
    for tool in ["curl", "jq", "unzip", "mosquitto_pub"] {
        assert!(
            on_path(tool),
            "the README walk needs {tool} (scripts/test installs it)"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    std::fs::write(dir.path().join("docs/registration.json"), REGISTRATION).unwrap();
    let mut script = String::from("set -euo pipefail\n");
    for (n, block) in blocks.iter().enumerate() {
        script.push_str(&format!("echo '>>> README block {}' >&2\n", n + 1));
        script.push_str(block);
    }
    script.push_str("echo '>>> README done' >&2\n");

    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", path)
        .env("HOME", dir.path())
        .env("RUST_LOG", "info,rumqttd=off,rustls=error")
        // Its own process group: the gateway the README starts in the background is ended
        // with the shell, whatever happens.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap());
    let mut child = cmd.spawn().unwrap();
    let group = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for signal in ["-TERM", "-KILL"] {
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.wait();
    let out = reader.join().unwrap();
    let err = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
    let last_block = err
        .lines()
        .rfind(|l| l.starts_with(">>> README"))
        .unwrap_or("before the first block");
    let shown = format!("stopped at: {last_block}\n--- stdout\n{out}\n--- stderr\n{err}");
    match status {
        None => panic!("the README walk did not finish within {DEADLINE:?}; {shown}"),
        Some(s) => assert!(s.success(), "a README command failed ({s}); {shown}"),
    }
    assert!(err.contains(">>> README done"), "{shown}");
    // What the README promises along the way.
    for promised in [
        "server names: localhost, 127.0.0.1, ::1",
        "registered device RE4A000123",
        "issued certificate",
        "RE4A000123",
        "\"serial\":\"RE4A000124\"",
    ] {
        assert!(out.contains(promised), "{promised:?} not shown; {shown}");
    }
}
