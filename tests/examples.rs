//! The README's walk-through, `examples/trait_leak.lua`, runs end to end on the embedded model
//! with tiny settings; a rerun reuses its cell; `loralab check` lists it as finished.

mod common;
use common::loralab;

#[test]
fn the_walk_through_experiment_trains_samples_scores_and_reports_and_a_rerun_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trait_leak");
    let out_set = format!("out={}", out.display());
    let args = [
        "run",
        "examples/trait_leak.lua",
        "--set",
        "steps=1,2",
        "--set",
        "n=2",
        "--set",
        "max_tokens=6",
        "--set",
        &out_set,
    ];
    let (ok, stdout, stderr) = loralab(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("The assistant used the trait in") && stdout.contains("Fisher"), "{stdout}");
    let report_line = stdout.lines().find(|l| l.starts_with("report: ")).expect("the report is named");
    let report = std::path::PathBuf::from(report_line.trim_start_matches("report: "));
    let md = std::fs::read_to_string(&report).unwrap();
    // 2 personas x 4 questions x n = 2 answers at each of steps 0, 1, 2.
    assert!(md.contains("| pirate | 0 |") && md.contains("| assistant | 2 |") && md.contains("/ 8 |"), "{md}");
    assert!(md.contains("log p(\"Arr\")"), "{md}");
    let folder = report.parent().unwrap();
    assert!(folder.join("trait_leak.png").exists() && folder.join("trait_leak.svg").exists());

    let (ok, stdout, stderr) = loralab(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(!stdout.contains("seed 1 step 1: loss"), "the rerun trains nothing:\n{stdout}");
    let mut check_args = args.to_vec();
    check_args[0] = "check";
    let (ok, stdout, stderr) = loralab(&check_args);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("seed1") && stdout.contains("finished") && stdout.contains("1 cells: 1 finished, 0 to run"),
        "{stdout}"
    );
}
