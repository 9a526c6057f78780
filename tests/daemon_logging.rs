//! Logging as the binary does it: stderr only, JSON lines when stderr is not a terminal, the level
//! from TINYSCHEDULER_LOG_LEVEL or --log-level (Python-era names accepted).

use std::process::{Command, Output};

fn tinyscheduler(args: &[&str], level: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tinyscheduler"));
    c.args(args)
        .env_remove("TINYSCHEDULER_LOG_LEVEL")
        .env_remove("TINYSCHEDULER_LOG_FORMAT");
    if let Some(l) = level {
        c.env("TINYSCHEDULER_LOG_LEVEL", l);
    }
    c.output().unwrap()
}

fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[test]
fn off_a_terminal_logs_are_json_lines_on_stderr_and_stdout_stays_clean() {
    let out = tinyscheduler(&["version"], Some("DEBUG"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tinyscheduler "));
    let lines = json_lines(&out.stderr);
    let start = lines
        .iter()
        .find(|l| l["message"] == "starting")
        .expect("a debug line about starting");
    assert_eq!(start["level"], "DEBUG");
    assert_eq!(start["command"], "version");
    assert!(start["timestamp"].is_string());
}

#[test]
fn the_default_level_is_info_and_warning_hides_debug() {
    for level in [None, Some("WARNING"), Some("warn")] {
        let out = tinyscheduler(&["version"], level);
        assert!(out.status.success());
        assert!(
            out.stderr.is_empty(),
            "{level:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_flag_beats_the_environment_and_filters_by_module() {
    let out = tinyscheduler(
        &["--log-level", "warn,tinyscheduler::cli=debug", "version"],
        Some("error"),
    );
    assert!(out.status.success());
    assert!(json_lines(&out.stderr)
        .iter()
        .any(|l| l["message"] == "starting"));
}

#[test]
fn human_format_can_be_forced() {
    let out = tinyscheduler(&["--log-format", "human", "version"], Some("debug"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEBUG") && err.contains("starting"), "{err}");
    assert!(!err.trim_start().starts_with('{'), "{err}");
}

#[test]
fn an_invalid_level_is_a_clear_error_and_exit_1() {
    let out = tinyscheduler(&["version"], Some("verbose"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid log level \"verbose\""), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn with_stderr_on_the_journal_each_line_carries_its_priority_and_otherwise_none() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let run = |journal_stream: &str| {
        let err = std::fs::File::create(&log).unwrap();
        let st = err.metadata().unwrap();
        let stream = match journal_stream {
            "this" => format!("{}:{}", st.dev(), st.ino()),
            other => other.to_string(),
        };
        let status = Command::new(env!("CARGO_BIN_EXE_tinyscheduler"))
            .args(["--log-level", "debug", "version"])
            .env("JOURNAL_STREAM", stream)
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read_to_string(&log).unwrap()
    };
    let journal = run("this");
    assert!(!journal.is_empty());
    for line in journal.lines() {
        let json = line
            .strip_prefix("<7>")
            .unwrap_or_else(|| panic!("a debug line without <7>: {line:?}"));
        assert!(
            serde_json::from_str::<serde_json::Value>(json).is_ok(),
            "{line}"
        );
    }
    // Redirected elsewhere, as systemd.exec(5) warns: JOURNAL_STREAM names another file.
    let elsewhere = run("1:1");
    assert!(!elsewhere.is_empty());
    json_lines(elsewhere.as_bytes());
}

#[test]
fn an_error_that_ends_the_program_is_marked_an_error_on_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let err = std::fs::File::create(&log).unwrap();
    let st = err.metadata().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_tinyscheduler"))
        .args(["--state-dir"])
        .arg(dir.path().join("state"))
        .args(["get", "nosuchkind"])
        .env("JOURNAL_STREAM", format!("{}:{}", st.dev(), st.ino()))
        .env_remove("TINYSCHEDULER_LOG_LEVEL")
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.starts_with("<3>error: "), "{text:?}");
    }
}
