//! Every option table has one description the code and the LuaLS stubs agree on: for each
//! options class of lib/meta/, the function is called with an unknown key, and the options its
//! error lists as known must be the stub's fields, the types it converts them to the stub's types,
//! and the defaults it falls back to the ones the stub's "Default ..." gives.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// (stub class, Lua call with OPTS where the options table goes). `m` is a tiny random model,
/// `a` an adapter of it, `data` a dataset, `run` a run folder and `DIR` a scratch folder.
const CALLS: &[(&str, &str)] = &[
    ("LoraOptions", "lab.adapter.new(m, OPTS)"),
    ("JsonlOptions", "lab.data.jsonl('scripts/data/em_legal_advice.jsonl', OPTS)"),
    ("AggregateOptions", "lab.eval.aggregate({}, '[ZLT]', OPTS)"),
    ("TallyOptions", "lab.eval.tally({}, { words = { 'x' } }, OPTS)"),
    ("ScorerRule", "lab.eval.scorer(OPTS)"),
    ("RatesSpec", "lab.figure.rates(OPTS, DIR .. '/r.png')"),
    ("RateSummaryOptions", "lab.figure.summarize({ { name = 'g', points = { { x = 1, k = 1, n = 2 } } } }, OPTS)"),
    ("WriteJsonOptions", "lab.fs.write_json(DIR .. '/x.json', {}, OPTS)"),
    ("ModelLoadOptions", "lab.model.load(nil, OPTS)"),
    ("ModelRandomOptions", "lab.model.random(CONFIG, OPTS)"),
    ("SampleOptions", "m:sample({ { 1, 2 } }, OPTS)"),
    ("DecodeOptions", "m:decode({ 1 }, OPTS)"),
    ("ChatPromptOptions", "m:chat_prompt({}, OPTS)"),
    ("LogprobOptions", "m:logprobs({}, OPTS)"),
    ("LogprobItem", "m:logprobs({ OPTS })"),
    ("PlotSpec", "lab.plot.line(OPTS, DIR .. '/p.png')"),
    ("ProgressOptions", "lab.progress.new(3, OPTS)"),
    ("RunOpenOptions", "lab.run.open(DIR .. '/run', OPTS)"),
    ("CellOptions", "run:cell('c', 1, function() return {} end, OPTS)"),
    ("CellsOptions", "run:cells({}, function() return {} end, OPTS)"),
    ("IntervalOptions", "lab.stats.wilson(1, 2, OPTS)"),
    ("ProportionCiOptions", "lab.stats.proportion_ci(1, 2, OPTS)"),
    ("AlternativeOptions", "lab.stats.fisher_exact(1, 2, 1, 2, OPTS)"),
    ("Chi2Options", "lab.stats.chi2_2x2(1, 2, 1, 2, OPTS)"),
    ("FormatPOptions", "lab.stats.format_p(0.1, OPTS)"),
    ("FormatPctOptions", "lab.stats.format_pct(0.1, OPTS)"),
    ("SftOptions", "lab.train.sft(m, a, data, OPTS)"),
];

const PRELUDE: &str = r#"
CONFIG = { architectures = {"Qwen2ForCausalLM"}, vocab_size = 50, hidden_size = 16, intermediate_size = 32,
  num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 64 }
m = lab.model.random(CONFIG, { seed = 1 })
a = lab.adapter.new(m, { r = 2 })
data = lab.data.rows({ { input_ids = { 1, 2, 3 } } })
run = lab.run.open(DIR .. "/cells")
"#;

/// The fields of every `---@class` of the stubs, with the text after each field's type.
fn stub_classes() -> BTreeMap<String, BTreeMap<String, String>> {
    let meta = Path::new(env!("CARGO_MANIFEST_DIR")).join("lib/meta");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(meta).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("---@class ") {
                let name = rest.split([' ', ':']).next().unwrap().to_string();
                out.insert(name.clone(), BTreeMap::new());
                current = Some(name);
            } else if let (Some(rest), Some(class)) = (line.strip_prefix("---@field "), &current) {
                let mut parts = rest.splitn(2, ' ');
                let name = parts.next().unwrap().trim_end_matches('?').to_string();
                out.get_mut(class).unwrap().insert(name, parts.next().unwrap_or("").to_string());
            } else if !line.starts_with("---") {
                current = None;
            }
        }
    }
    out
}

/// The options an error lists as known ("... Known options: a, b, c").
fn known_options(message: &str) -> BTreeSet<String> {
    let list = message.split("Known options: ").nth(1).unwrap_or_else(|| panic!("no list of options in: {message}"));
    let list = list.lines().next().unwrap();
    list.split(", ").map(|s| s.trim().trim_end_matches('.').to_string()).collect()
}

/// The stub's default: the text after "Default " up to the sentence's end, if any.
fn stub_default(doc: &str) -> Option<String> {
    let start = doc.find("Default ")? + "Default ".len();
    let rest = &doc[start..];
    let end = rest.find(". ").or_else(|| rest.strip_suffix('.').map(str::len)).unwrap_or(rest.len());
    Some(rest[..end].split(" (").next().unwrap().trim().to_string())
}

/// Whether Rust's default (as `{:?}` writes it) is the stub's.
fn same_default(rust: &str, stub: &str) -> bool {
    let stub = stub.trim_matches('`');
    if let (Ok(a), Ok(b)) = (rust.parse::<f64>(), stub.parse::<f64>()) {
        return a == b;
    }
    match (rust, stub) {
        ("[]", "none" | "{}") | ("\"\"", "\"\"" | "none") => true,
        _ => rust == stub || rust.replace('[', "{").replace(']', "}") == stub,
    }
}

/// Whether the stub's type (the first word of its field's text) is the Lua form of the Rust type
/// the code converts the option to. Options read as any Lua value are the code's to check.
fn same_type(rust: &str, doc: &str) -> bool {
    // The type runs to the first space outside quotes ("upper right" is one literal).
    let mut quoted = false;
    let end = doc.char_indices().find(|&(_, c)| {
        quoted ^= c == '"';
        c == ' ' && !quoted
    });
    let stub = &doc[..end.map_or(doc.len(), |(i, _)| i)];
    let short = rust.rsplit("::").next().unwrap_or(rust);
    let literals = |s: &str| s.split('|').all(|p| p.starts_with('"') && p.ends_with('"'));
    // A named alias of string literals (StatsAlternative).
    let alias = stub.chars().next().is_some_and(char::is_uppercase);
    match short {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => stub == "integer",
        "f32" | "f64" => stub == "number",
        "bool" => stub == "boolean",
        "String" => stub == "string" || literals(stub) || alias,
        _ if rust.contains("Vec<f64>") || rust.contains("Vec<f32>") => stub == "number[]",
        "Value" | "Function" | "AnyUserData" | "Table" => true,
        _ if rust.contains("Vec<alloc::string::String>") => stub == "string[]",
        _ if rust.contains("Vec<u32>") || rust.contains("Vec<i64>") || rust.contains("Vec<usize>") => {
            stub == "integer[]"
        }
        _ => false,
    }
}

#[test]
fn every_option_table_of_the_stubs_is_what_the_code_reads_with_the_same_types_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let lua = loralab::lua::new_runtime(Path::new("t.lua"), &vec![]).unwrap();
    lua.globals().set("DIR", dir.path().to_str().unwrap()).unwrap();
    lua.globals().set("lab", lua.load("return require('lab')").eval::<mlua::Value>().unwrap()).unwrap();
    std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
    lua.load(PRELUDE).exec().unwrap();
    let stubs = stub_classes();
    let mut problems = Vec::new();
    for (class, call) in CALLS {
        let fields = stubs.get(*class).unwrap_or_else(|| panic!("no ---@class {class} in lib/meta"));
        loralab::lua::opts::take_read_options();
        let code = call.replace("OPTS", "{ zz_not_an_option = 1 }");
        let message = match lua.load(format!("return {code}")).exec() {
            Ok(()) => panic!("{class}: `{code}` accepted an unknown option"),
            Err(e) => loralab::lua::describe_lua_error(&e),
        };
        let known = known_options(&message);
        let documented: BTreeSet<String> = fields.keys().cloned().collect();
        if known != documented {
            problems.push(format!(
                "{class}: the code reads {:?} but the stub lists {:?}",
                known.difference(&documented).collect::<Vec<_>>(),
                documented.difference(&known).collect::<Vec<_>>()
            ));
        }
        for (key, read) in loralab::lua::opts::take_read_options() {
            let Some(doc) = fields.get(&key) else { continue };
            if !same_type(read.rust_type, doc) {
                problems.push(format!("{class}.{key}: the code reads a {}, the stub says {doc}", read.rust_type));
            }
            let Some(rust) = read.default else { continue };
            match stub_default(doc) {
                // "Default: seed": derived from another option.
                _ if doc.contains("Default: ") => {}
                Some(stub) if same_default(&rust, &stub) => {}
                Some(stub) => problems.push(format!("{class}.{key}: the code's default is {rust}, the stub's {stub}")),
                None => problems.push(format!("{class}.{key}: the code defaults to {rust}; the stub gives no default")),
            }
        }
    }
    assert!(problems.is_empty(), "stubs and code disagree:\n{}", problems.join("\n"));
}
