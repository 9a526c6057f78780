//! Settings precedence and `.env` handling, driving the real binary.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// The binary in `dir`, with no inherited `TINYSCHEDULER_*` variables.
fn cmd(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tinyscheduler"));
    c.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("TINYSCHEDULER_") {
            c.env_remove(k);
        }
    }
    c
}

fn config_json(out: Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["settings"].clone()
}

fn setting(s: &Value, name: &str) -> (Value, String) {
    (
        s[name]["value"].clone(),
        s[name]["source"].as_str().unwrap().to_string(),
    )
}

#[test]
fn a_flag_beats_the_environment_which_beats_dotenv_which_beats_the_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "TINYSCHEDULER_MCP_ENDPOINT=http://dotenv:1\n\
         TINYSCHEDULER_LOOP_INTERVAL_SEC=7\n\
         export TINYSCHEDULER_HEARTBEAT_SEC=\"9\"\n\
         TINYSCHEDULER_STATE_DIR=from-dotenv # the state dir\n",
    )
    .unwrap();
    let s = config_json(
        cmd(dir.path())
            .args(["config", "--json"])
            .env("TINYSCHEDULER_MCP_ENDPOINT", "http://env:1")
            .env("TINYSCHEDULER_LOOP_INTERVAL_SEC", "8")
            .output()
            .unwrap(),
    );
    assert_eq!(
        setting(&s, "tinytask_endpoint"),
        ("http://env:1".into(), "env".into())
    );
    assert_eq!(setting(&s, "loop_interval"), (8.into(), "env".into()));
    assert_eq!(setting(&s, "heartbeat_sec"), (9.into(), ".env".into()));
    assert_eq!(
        setting(&s, "state_dir"),
        ("from-dotenv".into(), ".env".into())
    );
    assert_eq!(
        setting(&s, "max_runtime_sec"),
        (3600.into(), "default".into())
    );

    let s = config_json(
        cmd(dir.path())
            .args(["config", "--json", "--tinytask-endpoint", "http://flag:1"])
            .args(["--state-dir", "from-flag"])
            .env("TINYSCHEDULER_MCP_ENDPOINT", "http://env:1")
            .output()
            .unwrap(),
    );
    assert_eq!(
        setting(&s, "tinytask_endpoint"),
        ("http://flag:1".into(), "flag".into())
    );
    assert_eq!(
        setting(&s, "state_dir"),
        ("from-flag".into(), "flag".into())
    );
}

#[test]
fn an_env_file_flag_replaces_the_working_directory_dotenv() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "TINYSCHEDULER_GOOSE_BIN=/from/cwd\n",
    )
    .unwrap();
    let other = dir.path().join("prod.env");
    std::fs::write(&other, "TINYSCHEDULER_GOOSE_BIN=/from/prod\n").unwrap();
    let s = config_json(
        cmd(dir.path())
            .args(["--env-file", other.to_str().unwrap(), "config", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(
        setting(&s, "goose_bin"),
        ("/from/prod".into(), ".env".into())
    );
    let missing = cmd(dir.path())
        .args(["--env-file", "nope.env", "config"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.env"));
}

#[test]
fn a_bad_dotenv_line_is_an_error_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "# settings\nTINYSCHEDULER_DRY_RUN=true\nnot an assignment\n",
    )
    .unwrap();
    let out = cmd(dir.path()).args(["config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(".env:3: expected KEY=VALUE, got \"not an assignment\""),
        "{err}"
    );
}

#[test]
fn an_invalid_value_is_an_error_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = cmd(dir.path())
        .args(["config"])
        .env("TINYSCHEDULER_LOOP_INTERVAL_SEC", "abc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: TINYSCHEDULER_LOOP_INTERVAL_SEC: expected a positive integer, got \"abc\""
    );
    let out = cmd(dir.path())
        .args(["run", "--once"])
        .env("TINYSCHEDULER_LOOP_INTERVAL_SEC", "18446744073709551615")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: TINYSCHEDULER_LOOP_INTERVAL_SEC: 18446744073709551615 seconds is more than a \
         year (31536000 s), the most it takes"
    );
    assert!(!dir.path().join("state").exists(), "nothing was created");
    let out = cmd(dir.path())
        .args(["config"])
        .env("TINYSCHEDULER_AGENT_LIMITS", "{\"vaela\": \"two\"}")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("TINYSCHEDULER_AGENT_LIMITS: vaela"));
}

#[test]
fn a_base_path_puts_the_default_state_dir_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = config_json(
        cmd(dir.path())
            .args(["config", "--json"])
            .env("TINYSCHEDULER_BASE_PATH", "/srv/calypso")
            .env("TINYSCHEDULER_AGENT_LIMITS", "vaela:2,damien:1")
            .output()
            .unwrap(),
    );
    assert_eq!(
        setting(&s, "state_dir"),
        ("/srv/calypso/state".into(), "base-path".into())
    );
    assert_eq!(
        s["agent_limits"]["value"],
        serde_json::json!({"vaela": 2, "damien": 1})
    );
}

#[test]
fn the_config_table_lists_every_setting_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = cmd(dir.path())
        .args(["config"])
        .env("TINYSCHEDULER_DRY_RUN", "yes")
        .env("TINYSCHEDULER_RUNNING_DIR", "/old")
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    let dry = table.lines().find(|l| l.starts_with("dry_run")).unwrap();
    assert!(dry.contains("true") && dry.contains(" env "), "{dry}");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("TINYSCHEDULER_RUNNING_DIR is set but has no effect"));
}

#[test]
fn config_shows_the_log_and_http_settings_with_the_flag_or_file_that_set_them() {
    let dir = tempfile::tempdir().unwrap();
    let unset = config_json(cmd(dir.path()).args(["config", "--json"]).output().unwrap());
    for name in ["log_level", "log_format", "http_addr"] {
        assert_eq!(
            setting(&unset, name),
            (Value::Null, "default".into()),
            "{name}"
        );
    }
    std::fs::write(
        dir.path().join(".env"),
        "TINYSCHEDULER_HTTP_ADDR=127.0.0.1:9464\n\
         TINYSCHEDULER_LOG_FORMAT=json\n\
         TINYSCHEDULER_LOG_LEVEL=debug\n",
    )
    .unwrap();
    let s = config_json(
        cmd(dir.path())
            .args(["--log-level", "WARNING", "config", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(setting(&s, "log_level"), ("warn".into(), "flag".into()));
    assert_eq!(setting(&s, "log_format"), ("json".into(), ".env".into()));
    assert_eq!(
        setting(&s, "http_addr"),
        ("127.0.0.1:9464".into(), ".env".into())
    );
    assert_eq!(s["http_addr"]["flag"], "run --http");
}

#[test]
fn an_empty_variable_counts_as_unset_also_for_the_flags_it_backs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "TINYSCHEDULER_LOG_LEVEL=\n").unwrap();
    let out = cmd(dir.path())
        .args(["run", "--once"])
        .env("TINYSCHEDULER_STATE_DIR", "")
        .env("TINYSCHEDULER_LOG_FORMAT", "")
        .env("TINYSCHEDULER_DRY_RUN", "")
        .env("TINYSCHEDULER_HTTP_ADDR", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a dry run, in the default state directory.
    assert!(dir.path().join("state/objects").is_dir());
}

#[test]
fn dry_run_from_the_environment_takes_every_spelling_of_a_boolean() {
    for (value, dry) in [
        ("1", true),
        ("yes", true),
        ("on", true),
        ("TRUE", true),
        ("0", false),
        ("no", false),
        ("off", false),
        ("false", false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = cmd(dir.path())
            .args(["run", "--once"])
            .env("TINYSCHEDULER_DRY_RUN", value)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            !dir.path().join("state").exists(),
            dry,
            "TINYSCHEDULER_DRY_RUN={value}: a dry run creates nothing"
        );
    }
}

#[test]
fn the_retry_delays_and_kill_grace_are_listed_with_their_sources() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "TINYSCHEDULER_KILL_GRACE_SEC=2.5\n",
    )
    .unwrap();
    let s = config_json(
        cmd(dir.path())
            .args(["config", "--json"])
            .env("TINYSCHEDULER_RETRY_BASE_SEC", "0.5")
            .output()
            .unwrap(),
    );
    assert_eq!(setting(&s, "retry_base_sec"), (0.5.into(), "env".into()));
    assert_eq!(setting(&s, "retry_max_sec"), (600.into(), "default".into()));
    assert_eq!(setting(&s, "kill_grace_sec"), (2.5.into(), ".env".into()));
    assert_eq!(
        s["kill_grace_sec"]["env"].as_str(),
        Some("TINYSCHEDULER_KILL_GRACE_SEC")
    );
}

#[test]
fn a_bad_kill_grace_stops_run_with_an_error_naming_it_and_creates_nothing() {
    for bad in ["soon", "-1", "1e30", "NaN"] {
        let dir = tempfile::tempdir().unwrap();
        let out = cmd(dir.path())
            .args(["run", "--once"])
            .env("TINYSCHEDULER_KILL_GRACE_SEC", bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{bad}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            format!(
                "error: TINYSCHEDULER_KILL_GRACE_SEC: expected a number of seconds, got {bad:?}"
            )
        );
        assert!(!dir.path().join("state").exists(), "{bad}: nothing created");
    }
}

#[test]
fn settings_read_outside_the_table_are_checked_and_named_too() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("TINYSCHEDULER_RETRY_BASE_SEC", "0")],
            "error: TINYSCHEDULER_RETRY_BASE_SEC: must be at least 0.1 (a failed task is never \
             retried at once), got 0",
        ),
        (
            &[
                ("TINYSCHEDULER_RETRY_BASE_SEC", "30"),
                ("TINYSCHEDULER_RETRY_MAX_SEC", "5"),
            ],
            "error: TINYSCHEDULER_RETRY_MAX_SEC: must be at least TINYSCHEDULER_RETRY_BASE_SEC \
             (30), got 5",
        ),
        (
            &[("TINYSCHEDULER_QUICK_EXIT_MS", "abc")],
            "error: TINYSCHEDULER_QUICK_EXIT_MS: expected a whole number of milliseconds, got \
             \"abc\"",
        ),
        (
            &[("TINYSCHEDULER_SHIM_LAUNCHER", "maybe")],
            "error: TINYSCHEDULER_SHIM_LAUNCHER: expected true or false (1/0, yes/no, on/off), \
             got \"maybe\"",
        ),
        (
            &[("TINYSCHEDULER_SHIM_EXE", "/nonexistent/tinyscheduler")],
            "error: TINYSCHEDULER_SHIM_EXE: \"/nonexistent/tinyscheduler\" is not an executable \
             file",
        ),
        (
            &[("TINYSCHEDULER_WORKERS", "0")],
            "error: TINYSCHEDULER_WORKERS: expected a whole number from 1 to 64, got \"0\"",
        ),
        (
            &[("TINYSCHEDULER_WORKERS", "65")],
            "error: TINYSCHEDULER_WORKERS: expected a whole number from 1 to 64, got \"65\"",
        ),
        (
            &[("TINYSCHEDULER_HTTP_ADDR", "bogus")],
            "error: TINYSCHEDULER_HTTP_ADDR: invalid HTTP listen address \"bogus\": want \
             HOST:PORT, e.g. 127.0.0.1:9464",
        ),
    ];
    for (vars, error) in cases {
        for command in [&["run", "--once"][..], &["validate-config"]] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = cmd(dir.path());
            c.args(command).envs(vars.iter().copied());
            let out = c.output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{vars:?} {command:?}: {out:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(error), "{vars:?} {command:?}: {stderr}");
            assert!(
                !dir.path().join("state").exists(),
                "{vars:?}: nothing created"
            );
        }
    }
}

#[test]
fn a_python_era_setting_that_has_no_effect_is_warned_about_by_run_and_validate_config() {
    for command in [&["run", "--once"][..], &["validate-config"]] {
        let dir = tempfile::tempdir().unwrap();
        let out = cmd(dir.path())
            .args(command)
            .env("TINYSCHEDULER_LOCK_FILE", "/tmp/x.lock")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("TINYSCHEDULER_LOCK_FILE is set but has no effect"),
            "{command:?}: {stderr}"
        );
    }
}

#[test]
fn a_dotenv_file_that_starts_with_a_byte_order_mark_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "\u{feff}TINYSCHEDULER_KILL_GRACE_SEC=2.5\n",
    )
    .unwrap();
    let s = config_json(cmd(dir.path()).args(["config", "--json"]).output().unwrap());
    assert_eq!(setting(&s, "kill_grace_sec"), (2.5.into(), ".env".into()));
}

#[test]
fn config_shows_the_tinytask_endpoint_as_it_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let s = config_json(
        cmd(dir.path())
            .args(["config", "--json"])
            .env(
                "TINYSCHEDULER_MCP_ENDPOINT",
                "http://tasks.internal:3000/mcp/",
            )
            .output()
            .unwrap(),
    );
    assert_eq!(
        setting(&s, "tinytask_endpoint"),
        ("http://tasks.internal:3000".into(), "env".into())
    );
}

#[test]
fn a_bad_log_format_in_the_environment_is_named_as_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = cmd(dir.path())
        .args(["config"])
        .env("TINYSCHEDULER_LOG_FORMAT", "bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: TINYSCHEDULER_LOG_FORMAT: expected human or json, got \"bogus\""
    );
}
