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

#[test]
fn checking_the_study_on_a_fresh_folder_lists_phase_1_every_phase_2_cell_and_the_report_and_writes_nothing() {
    // The embedded model on disk (checking never downloads): loading it fetches it once.
    let cpu = loralab::model::LoadOptions { dtype: candle_core::DType::F32, device: candle_core::Device::Cpu };
    loralab::model::load(loralab::model::DEFAULT_MODEL, &cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("study");
    let out_set = format!("out={}", out.display());
    let (ok, stdout, stderr) = loralab(&["check", "scripts/dose_response.lua", "--set", &out_set]);
    assert!(ok, "{stdout}\n{stderr}");
    let phase1 = stdout.lines().find(|l| l.trim_start().starts_with("phase1-coupling ")).unwrap_or("");
    assert!(phase1.contains("not started"), "{stdout}");
    for cell in ["baseline-dose000-seed42", "em-dose002-seed42", "benign-dose020-seed42"] {
        assert!(stdout.contains(cell), "{cell} missing:\n{stdout}");
    }
    assert!(stdout.contains("11 cells: 0 finished, 11 to run") && stdout.contains("the plan ends here"), "{stdout}");
    assert!(!out.exists(), "checking wrote nothing");
    let (ok, _, stderr) = loralab(&["check", "scripts/dose_response.lua", "--set", "profile=fast"]);
    assert!(!ok && stderr.contains("unknown profile"), "{stderr}");
}

#[test]
fn both_study_profiles_give_option_tables_the_adapter_and_trainer_accept() {
    for profile in ["quick", "paper"] {
        let set = format!("profile={profile}");
        let (ok, stdout, stderr) = loralab(&["run", "tests/scripts/profile_options.lua", "--set", &set]);
        assert!(ok, "{stdout}\n{stderr}");
        for phase in ["phase 1", "phase 2"] {
            let line = format!("profile {profile}, {phase}: options accepted, 1 step");
            assert!(stdout.contains(&line), "{stdout}\n{stderr}");
        }
    }
    // A negative pass size given on the command line reaches the trainer, which names it.
    let (ok, stdout, stderr) = loralab(&[
        "run",
        "tests/scripts/profile_options.lua",
        "--set",
        "profile=paper",
        "--set",
        "stage2_tokens_per_pass=-5",
    ]);
    assert!(!ok && stderr.contains("tokens_per_pass"), "{stdout}\n{stderr}");
}
