//! The repository's documents say what is built: every name
//! docs/architecture.md gives exists, the README's error and settings tables
//! are the installed extension's, and nothing points outside the repository.
use pm_e2e::Value1;
use pm_e2e::{eventually, pg, repo_root, Emulator, Sidecar, TestDb};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const SKIP_DIRS: [&str; 4] = ["target", ".git", ".pm", "node_modules"];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if !SKIP_DIRS.contains(&name.as_str()) {
                walk(&p, out);
            }
        } else {
            out.push(p);
        }
    }
}

fn repo_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&repo_root(), &mut out);
    out
}

fn sources(exts: &[&str]) -> String {
    repo_files()
        .iter()
        .filter(|p| p.extension().is_some_and(|e| exts.iter().any(|x| e == *x)))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `quoted` names of a Markdown text, outside fenced blocks.
fn backquoted(md: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 1 && !part.is_empty() {
                out.insert(part.to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn every_file_and_function_named_in_the_architecture_page_exists() {
    let (_db, c) = TestDb::with_admin().await;
    let md = std::fs::read_to_string(repo_root().join("docs/architecture.md")).unwrap();
    let objects: BTreeSet<String> = c
        .column::<String>(
            "SELECT p.proname::text FROM pg_proc p WHERE p.pronamespace = 'meter'::regnamespace
             UNION SELECT c.relname::text FROM pg_class c WHERE c.relnamespace = 'meter'::regnamespace",
        )
        .await
        .into_iter()
        .collect();
    let files = repo_files();
    let rust = sources(&["rs"]);
    let code = sources(&["rs", "sql", "spec", "sh"]);
    let mut checked = 0;
    let mut missing = Vec::new();
    for name in backquoted(&md) {
        let ok =
            if name.contains(char::is_whitespace) || name.contains('*') || name.starts_with('.') {
                continue; // an endpoint, a pattern or a file extension, not a name
            } else if let Some(object) = name.strip_prefix("meter.") {
                objects.contains(object.trim_end_matches("()"))
            } else if let Some(f) = name.strip_suffix("()") {
                rust.contains(&format!("fn {f}(")) || rust.contains(&format!("fn {f}<"))
            } else if name.contains('/') {
                repo_root().join(name.trim_end_matches('/')).exists()
            } else if name.contains('.') {
                files
                    .iter()
                    .any(|p| p.file_name().is_some_and(|f| f == name.as_str()))
            } else if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                code.contains(&name)
            } else {
                continue;
            };
        checked += 1;
        if !ok {
            missing.push(name);
        }
    }
    // A function named on a line that also names source files is defined in
    // one of those files, not merely somewhere.
    let mut scoped = 0;
    for line in md.lines() {
        let names = backquoted(line);
        let files: Vec<String> = names
            .iter()
            .filter(|n| n.contains('/') && (n.ends_with(".rs") || n.ends_with(".sql")))
            .filter_map(|n| std::fs::read_to_string(repo_root().join(n)).ok())
            .collect();
        if files.is_empty() {
            continue;
        }
        for f in names.iter().filter_map(|n| n.strip_suffix("()")) {
            if f.contains('.') {
                continue;
            }
            scoped += 1;
            let defined = files.iter().any(|text| {
                text.contains(&format!("fn {f}(")) || text.contains(&format!("fn {f}<"))
            });
            if !defined {
                missing.push(format!("{f}() is not in the files its line names: {line}"));
            }
        }
    }
    assert!(
        checked > 80 && scoped > 30,
        "the page names many things ({checked} checked, {scoped} in their files)"
    );
    assert!(
        missing.is_empty(),
        "docs/architecture.md names what does not exist: {missing:?}"
    );
}

#[test]
fn nothing_in_the_repository_points_outside_it() {
    let mut offenders = Vec::new();
    for p in repo_files() {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            // One exception: where the Citus tests find the Citus source.
            let citus_default = line.contains("CITUS_SRC") && line.contains("../shared/citus");
            let points_out = line.contains("../shared")
                || line.contains("POLAR-API.md")
                || line.contains("DESIGN.md")
                || line.contains("STYLE.md");
            if points_out && !citus_default && !p.ends_with("tests/e2e/tests/docs.rs") {
                offenders.push(format!(
                    "{}:{}",
                    p.strip_prefix(repo_root()).unwrap().display(),
                    n + 1
                ));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "these point at files users do not have: {offenders:?}"
    );
}

#[tokio::test]
async fn the_readme_error_and_settings_tables_are_the_extensions() {
    let (_db, c) = TestDb::with_admin().await;
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let lines: BTreeSet<&str> = readme.lines().collect();
    let errors: Vec<String> = c
        .column(
            "SELECT format('| %s | %s | `%s` | %s |', sqlstate, http_status, problem_type, cause)
             FROM meter.error_codes() ORDER BY sqlstate",
        )
        .await;
    let in_readme: Vec<&str> = readme.lines().filter(|l| l.starts_with("| PM")).collect();
    assert_eq!(
        in_readme,
        errors.iter().map(String::as_str).collect::<Vec<_>>(),
        "README.md's error table differs from meter.error_codes()"
    );
    let settings: Vec<String> = c
        .column("SELECT format('| `%s` | %s | %s |', name, default_value, description) FROM meter.settings() ORDER BY name").await;
    for row in &settings {
        assert!(
            lines.contains(row.as_str()),
            "README.md's settings table lacks or differs on: {row}"
        );
    }
}

/// The README's "First steps" block, run as written against a fresh stack
/// (only its addresses changed to this test's).
#[tokio::test]
async fn the_readme_first_steps_run_as_written() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let after = readme
        .split("<!-- first-steps -->")
        .nth(1)
        .expect("the first-steps block");
    let block = after
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block after the marker");
    let db = TestDb::new().await;
    let emu = Emulator::start(&[]).await;
    let side = Sidecar::start_with(&db, &emu.sidecar_env()).await;
    let script = block
        .replace("-p 54329", &format!("-p {}", pg::port()))
        .replace(
            "-U postgres polar_meter",
            &format!("-U postgres {}", db.name),
        )
        .replace("http://127.0.0.1:8787", &side.url(""))
        .replace("http://127.0.0.1:8788", &emu.base);
    assert_ne!(script, block, "the block names the default addresses");
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""status":"recorded""#), "{stdout}");
    // What the block promises: the customer and the event, once, at Polar.
    let customer = eventually(30, "acme's customer at Polar", || async {
        emu.customers()
            .await
            .into_iter()
            .find(|c| c["external_id"] == "acme")
    })
    .await;
    assert_eq!(customer["type"], "team");
    let events = eventually(30, "the event at Polar", || async {
        let v = emu.events().await;
        let items = v["events"].as_array().cloned().unwrap_or_default();
        (!items.is_empty()).then_some(items)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["external_customer_id"], "acme");
    assert_eq!(events[0]["name"], "api.request");
}

#[test]
fn every_alert_kind_has_a_runbook_entry() {
    let runbook = std::fs::read_to_string(repo_root().join("docs/runbook.md")).unwrap();
    let sql = sources(&["sql"]);
    // `_alert('kind', ...)`; dead letters raise event_<kind> for dropped and rejected.
    let mut kinds: BTreeSet<String> = sql
        .split("_alert('")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .filter(|k| !k.ends_with('_'))
        .map(str::to_string)
        .collect();
    kinds.extend(["event_dropped".to_string(), "event_rejected".to_string()]);
    assert!(kinds.len() >= 9, "{kinds:?}");
    for kind in kinds {
        assert!(
            runbook.contains(&format!("### `{kind}`")),
            "docs/runbook.md has no entry for {kind}"
        );
    }
}
