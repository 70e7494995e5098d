//! `loralab check SCRIPT`: runs a script without loading weights, training or sampling, to
//! resolve its settings and list the cells it would run.
//!
//! While checking, `lab.model.load` and `lab.model.random` return a [`LuaModelPlan`] (config,
//! tokenizer and provenance, no weights), adapters made or loaded for it are [`LuaAdapterPlan`]s,
//! `lab.run.open` writes nothing, and a cell group reports each cell's state instead of running
//! it: a finished cell gives its stored result (so the script goes on as a rerun would), any
//! other gives an error carrying [`NOT_RUN`]. Work that needs weights outside a cell (sampling,
//! training) stops the script with [`NOT_RUN`] too; the plan then lists the cells seen so far and
//! says where it stopped. Anything else that goes wrong (an unknown setting, a misspelt option,
//! a missing file) is an error, as in a real run.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use mlua::{LuaSerdeExt, UserData, UserDataMethods, Value};

use crate::model::load::ModelPlan;

/// In every error of work that checking does not do: the script stopped because of checking,
/// not because it is wrong.
pub const NOT_RUN: &str = "not run by loralab check";

static CHECKING: AtomicBool = AtomicBool::new(false);
static CELLS: Mutex<Vec<CheckedCell>> = Mutex::new(Vec::new());
static RUNS: Mutex<Vec<CheckedRun>> = Mutex::new(Vec::new());

/// One cell the script asked for, as found on disk.
#[derive(Debug, Clone)]
pub struct CheckedCell {
    pub group: String,
    pub name: String,
    pub dir: PathBuf,
    /// "finished", "failed", "running", "interrupted" or "not started".
    pub state: &'static str,
    /// Who runs it, or the error it failed with.
    pub detail: Option<String>,
}

/// A run folder the script opened, and whether it exists yet.
#[derive(Debug, Clone)]
pub struct CheckedRun {
    pub dir: PathBuf,
    pub exists: bool,
    /// Settings sets recorded in its run.json other than the one checked.
    pub other_settings: usize,
}

pub fn start() {
    CHECKING.store(true, Ordering::SeqCst);
}

pub fn checking() -> bool {
    CHECKING.load(Ordering::SeqCst)
}

pub fn record_cell(cell: CheckedCell) {
    CELLS.lock().unwrap().push(cell);
}

pub fn record_run(run: CheckedRun) {
    RUNS.lock().unwrap().push(run);
}

pub fn cells() -> Vec<CheckedCell> {
    CELLS.lock().unwrap().clone()
}

pub fn runs() -> Vec<CheckedRun> {
    RUNS.lock().unwrap().clone()
}

/// The error of work that checking skips.
pub fn not_run(what: &str) -> mlua::Error {
    mlua::Error::runtime(format!("{what}: {NOT_RUN}"))
}

/// A model described, not loaded: what checking gives for `lab.model.load`.
#[derive(Clone)]
pub struct LuaModelPlan(pub Rc<ModelPlan>);

/// An adapter made or loaded for a model plan.
#[derive(Clone)]
pub struct LuaAdapterPlan {
    pub model_id: String,
}

impl UserData for LuaModelPlan {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, this, ()| {
            let c = &this.0.config;
            Ok(format!(
                "Model({}: {}, {} layers, d {}; described, not loaded)",
                this.0.id,
                c.architectures.first().map(String::as_str).unwrap_or("?"),
                c.num_hidden_layers,
                c.hidden_size
            ))
        });
        methods.add_method("info", |lua, this, ()| {
            let t = lua.create_table()?;
            t.set("id", this.0.id.clone())?;
            t.set("config", lua.to_value(&this.0.config)?)?;
            t.set("provenance", lua.to_value(&this.0.provenance)?)?;
            t.set("weights_id", crate::model::weights_id(&this.0.provenance))?;
            t.set("checking", true)?;
            Ok(t)
        });
        super::model::add_tokenizer_methods(methods, |this: &Self| &this.0.tokenizer);
        methods.add_method("merge", |_, this, adapter: mlua::AnyUserData| {
            adapter
                .borrow::<LuaAdapterPlan>()
                .map_err(|_| mlua::Error::runtime("model:merge: argument must be an adapter from lab.adapter"))?;
            let plan = ModelPlan {
                id: format!("{}+merged", this.0.id),
                config: this.0.config.clone(),
                tokenizer: this.0.tokenizer.clone(),
                provenance: this.0.provenance.clone(),
            };
            Ok(LuaModelPlan(Rc::new(plan)))
        });
        for name in ["sample", "logprobs", "next_token_logprobs"] {
            methods.add_method(name, move |_, _, _: mlua::MultiValue| -> mlua::Result<()> {
                Err(not_run(&format!("model:{name}")))
            });
        }
    }
}

impl UserData for LuaAdapterPlan {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, this, ()| Ok(format!("Adapter(for {}; planned)", this.model_id)));
        methods.add_method("save", |_, _, _: Value| -> mlua::Result<()> { Err(not_run("adapter:save")) });
        methods.add_method("num_parameters", |_, _, ()| -> mlua::Result<()> { Err(not_run("adapter:num_parameters")) });
    }
}

/// Prints the plan: each run folder, each cell with its state, totals, and where the script
/// stopped if it did.
pub fn print_plan(stopped_at: Option<&str>) {
    for run in runs() {
        let state = if run.exists { "exists" } else { "new, not created by checking" };
        println!("run folder {} ({state})", run.dir.display());
        if run.other_settings > 0 {
            println!("  it also holds results of {} other settings set(s) (run.json history)", run.other_settings);
        }
    }
    let cells = cells();
    let width = cells.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut last_group = None;
    let (mut finished, mut to_run) = (0, 0);
    for c in &cells {
        if last_group.as_deref() != Some(c.group.as_str()) {
            println!("{}:", c.group);
            last_group = Some(c.group.clone());
        }
        let folder = c.dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        println!("  {:width$}  {:<12} {folder}", c.name, c.state);
        if let Some(detail) = &c.detail {
            println!("  {:width$}  {}", "", detail.lines().next().unwrap_or(""));
        }
        if c.state == "finished" {
            finished += 1;
        } else {
            to_run += 1;
        }
    }
    println!("{} cells: {finished} finished, {to_run} to run", cells.len());
    if let Some(why) = stopped_at {
        println!(
            "the plan ends here ({}): what follows needs a result or work that checking does not \
             produce; its cells are listed once that has run",
            why.lines().next().unwrap_or("")
        );
    }
}
