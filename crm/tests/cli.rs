//! The `crm` command line: token issuing reads the same secret `serve` uses.

use std::process::Command;

fn crm() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_crm"));
    command
        .env_remove("CRM_TOKEN_SECRET")
        .env_remove("CRM_DATA_DIR");
    command
}

#[test]
fn token_issue_prints_only_the_token_and_keeps_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let issue = || {
        crm()
            .args([
                "token",
                "issue",
                "--actor",
                "alice",
                "--role",
                "sales",
                "--data-dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let first = issue();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let token = String::from_utf8(first.stdout).unwrap();
    assert_eq!(
        token.trim().split('.').count(),
        3,
        "a JWT and nothing else: {token:?}"
    );
    assert_eq!(token.lines().count(), 1);
    let secret = std::fs::read_to_string(dir.path().join("token-secret")).unwrap();
    assert!(issue().status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("token-secret")).unwrap(),
        secret,
        "the secret is made once"
    );
}

#[test]
fn an_unknown_role_is_refused_with_the_allowed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let output = crm()
        .args([
            "token",
            "issue",
            "--actor",
            "eve",
            "--role",
            "emperor",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("admin, sales, support, viewer, auditor"),
        "{stderr}"
    );
}

#[test]
fn a_configured_secret_signs_without_touching_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let output = crm()
        .env("CRM_TOKEN_SECRET", "0123456789abcdef0123456789abcdef")
        .args([
            "token",
            "issue",
            "--actor",
            "ops",
            "--role",
            "admin",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(!dir.path().join("token-secret").exists());
}

#[test]
fn a_worker_group_that_cannot_name_leases_and_consumers_is_refused() {
    // Dots and wildcards would change JetStream consumer names; refused
    // before anything connects.
    for bad in ["a.b", "crm>", "", &"x".repeat(41)] {
        let output = crm()
            .args([
                "projection-service",
                "--database-url",
                "postgres://unused",
                "--token-secret",
            ])
            .arg("0123456789abcdef0123456789abcdef")
            .args(["--group", bad])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{bad:?} accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--group"), "{stderr}");
        assert!(stderr.contains("1-40 characters"), "{stderr}");
    }
}
