//! The extension's SQL agrees with the rules declared here: every SQLSTATE it
//! raises is in the error table and every code in the table is raised
//! somewhere, and the constants SQL shares with Rust are read from Rust, not
//! restated. Scans the installed SQL sources (not the frozen upgrade scripts).
use polar_meter_rules::{backoff, keys, sqlstate, validate};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn extension_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path, ext: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The SQL the install script is made of.
fn install_sql() -> Vec<(String, String)> {
    let mut all = files(&extension_dir().join("src"), "sql");
    for f in ["schema.sql", "grants.sql"] {
        let p = extension_dir().join("sql").join(f);
        all.push((
            p.display().to_string(),
            std::fs::read_to_string(&p).unwrap(),
        ));
    }
    assert!(all.len() > 10, "found the SQL sources");
    all
}

/// Every `'PMnnn'` literal: what SQL raises (ERRCODE = '...') or returns as a
/// per-item sqlstate. Codes named in COMMENT prose are not quoted this way.
fn quoted_codes(sql: &str) -> BTreeSet<String> {
    let b = sql.as_bytes();
    (0..b.len().saturating_sub(6))
        .filter(|&i| {
            b[i] == b'\''
                && &b[i + 1..i + 3] == b"PM"
                && b[i + 3..i + 6].iter().all(u8::is_ascii_digit)
                && b[i + 6] == b'\''
        })
        .map(|i| sql[i + 1..i + 6].to_string())
        .collect()
}

#[test]
fn every_code_the_sql_raises_is_declared() {
    for (file, sql) in install_sql() {
        for code in quoted_codes(&sql) {
            assert!(
                sqlstate::lookup(&code).is_some(),
                "{file} raises {code}, which extension/rules/src/sqlstate.rs does not declare"
            );
        }
    }
}

#[test]
fn every_declared_code_is_raised_somewhere() {
    let sql_codes: BTreeSet<String> = install_sql()
        .iter()
        .flat_map(|(_, s)| quoted_codes(s))
        .collect();
    // Rust rules raise by constant: sqlstate::NAME in a Violation.
    let rust: String = files(&extension_dir().join("rules/src"), "rs")
        .into_iter()
        .chain(files(&extension_dir().join("src"), "rs"))
        .filter(|(f, _)| !f.ends_with("sqlstate.rs"))
        .map(|(_, s)| s)
        .collect();
    for c in sqlstate::ALL {
        let in_rust = rust.contains(&format!("sqlstate::{}", c.name));
        assert!(
            sql_codes.contains(c.code) || in_rust,
            "{} ({}) is declared but nothing raises it",
            c.code,
            c.name
        );
    }
}

#[test]
fn constants_shared_with_rust_are_not_restated_in_sql() {
    let sql = install_sql();
    let all: String = sql.iter().map(|(_, s)| s.as_str()).collect();
    // Read from meter._reserved_metadata_key() and meter._api_key_start().
    for literal in [
        format!("'{}'", validate::RESERVED_METADATA_KEY),
        format!("'{}'", keys::PREFIX),
        format!(", {})", keys::START_LEN),
    ] {
        for (file, s) in &sql {
            assert!(
                !s.lines()
                    .filter(|l| !l.trim_start().starts_with("--") && !l.contains("COMMENT ON"))
                    .any(|l| l.contains(&literal)),
                "{file} restates {literal}: read it from its meter._* helper"
            );
        }
    }
    assert!(
        all.contains("meter._max_attempts()"),
        "delivery reads the attempt limit ({}) from Rust",
        backoff::MAX_ATTEMPTS
    );
    // The table's CHECKs guard what Rust validates first; they must agree.
    let schema = &sql
        .iter()
        .find(|(f, _)| f.ends_with("schema.sql"))
        .unwrap()
        .1;
    for check in [
        format!("length(id) BETWEEN 1 AND {}", validate::ORG_ID_MAX),
        format!("length(name) BETWEEN 1 AND {}", validate::ORG_NAME_MAX),
    ] {
        assert!(schema.contains(&check), "schema.sql has {check}");
    }
}
