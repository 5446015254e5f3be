//! The soak of scripts/soak.py for 30 seconds against the real binary on
//! SmolLM2: valid, malformed and vanishing clients at 32 concurrency with 64
//! slow half-open connections. The script checks its own criteria (no crash,
//! no failed valid request, a 4xx with an error body for every malformed one,
//! no sequence left, RSS flat over the second half); this test reads its
//! report and says which failed. The full run: scripts/soak.sh.

mod common;

use std::process::Command;

use serde_json::Value;

#[test]
fn thirty_seconds_of_hostile_and_valid_clients() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/soak.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--tofy", env!("CARGO_BIN_EXE_tofy")])
        .arg("--model")
        .arg(common::smollm2())
        .args(["--seconds", "30", "--threads", "1", "--json", "-"])
        .output()
        .expect("run python3 scripts/soak.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: no report\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("{report:#}");
    assert_eq!(report["failures"], Value::Array(Vec::new()), "{report:#}");
    assert_eq!(report["pass"], true);
    assert!(out.status.success());
    // The mix was exercised, not skipped.
    assert!(report["valid"]["ok"].as_u64().unwrap() >= 5, "{report:#}");
    assert!(
        report["malformed"]["count"].as_u64().unwrap() >= 1,
        "{report:#}"
    );
    assert!(report["half_open"]["connections"].as_u64().unwrap() == 64);
}
