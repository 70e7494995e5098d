//! `lab.train`: supervised fine-tuning of an adapter.

use mlua::{Function, Lua, LuaSerdeExt, Table, Value};

use super::adapter::LuaAdapter;
use super::data::LuaDataset;
use super::model::LuaModel;
use super::opts::Opts;
use crate::data::{tokenize, tokenize_counting_cut, Example, LossMask};
use crate::train::{self, Schedule, TrainConfig};

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("sft", lua.create_function(sft)?)?;
    Ok(m)
}

/// The loss mask option: a name, or a Lua function returning token spans.
enum MaskChoice {
    Named(LossMask),
    Function(Function),
}

fn sft(
    lua: &Lua,
    (model, adapter, data, opts): (mlua::AnyUserData, mlua::AnyUserData, mlua::AnyUserData, Value),
) -> mlua::Result<Table> {
    let ctx = "lab.train.sft";
    if model.borrow::<super::check::LuaModelPlan>().is_ok() {
        return Err(super::check::not_run(ctx));
    }
    let model = model
        .borrow::<LuaModel>()
        .map_err(|_| mlua::Error::runtime(format!("{ctx}: argument 1 must be a model")))?
        .clone();
    let adapter = adapter
        .borrow::<LuaAdapter>()
        .map_err(|_| mlua::Error::runtime(format!("{ctx}: argument 2 must be an adapter")))?
        .clone();
    let data = data
        .borrow::<LuaDataset>()
        .map_err(|_| mlua::Error::runtime(format!("{ctx}: argument 3 must be a dataset from lab.data")))?
        .clone();
    let mut o = Opts::new(ctx, opts)?;
    let d = TrainConfig::default();
    let schedule_name: String = o.get_or(lua, "lr_scheduler_type", d.lr_scheduler_type.name().to_string())?;
    let seed: u64 = o.get_or(lua, "seed", d.seed)?;
    let cfg = TrainConfig {
        max_steps: o.get(lua, "max_steps")?,
        num_train_epochs: o.get_or(lua, "num_train_epochs", d.num_train_epochs)?,
        learning_rate: o.get_or(lua, "learning_rate", d.learning_rate)?,
        lr_scheduler_type: Schedule::from_name(&schedule_name).ok_or_else(|| {
            o.bad_value(
                "lr_scheduler_type",
                format!("must be linear, cosine, constant or constant_with_warmup, got \"{schedule_name}\""),
            )
        })?,
        warmup_steps: o.get(lua, "warmup_steps")?,
        warmup_ratio: o.get_or(lua, "warmup_ratio", d.warmup_ratio)?,
        weight_decay: o.get_or(lua, "weight_decay", d.weight_decay)?,
        adam_beta1: o.get_or(lua, "adam_beta1", d.adam_beta1)?,
        adam_beta2: o.get_or(lua, "adam_beta2", d.adam_beta2)?,
        adam_epsilon: o.get_or(lua, "adam_epsilon", d.adam_epsilon)?,
        max_grad_norm: o.get_or(lua, "max_grad_norm", d.max_grad_norm)?,
        per_device_train_batch_size: o.get_or(lua, "per_device_train_batch_size", d.per_device_train_batch_size)?,
        gradient_accumulation_steps: o.get_or(lua, "gradient_accumulation_steps", d.gradient_accumulation_steps)?,
        seed,
        data_seed: o.get_or(lua, "data_seed", seed)?,
        shuffle: o.get_or(lua, "shuffle", d.shuffle)?,
        gradient_checkpointing: o.get_or(lua, "gradient_checkpointing", d.gradient_checkpointing)?,
        skip_nonfinite_steps: o.get_or(lua, "skip_nonfinite_steps", d.skip_nonfinite_steps)?,
        tokens_per_pass: o.get_or(lua, "tokens_per_pass", d.tokens_per_pass)?,
    };
    let max_length: usize = o.get_or(lua, "max_length", 1024)?;
    let marker: Option<String> = o.get(lua, "marker")?;
    let mask = match o.get::<Value>(lua, "loss_mask")? {
        None => MaskChoice::Named(LossMask::LastAssistant),
        Some(Value::Function(f)) => MaskChoice::Function(f),
        Some(Value::String(s)) => MaskChoice::Named(match &*s.to_str()? {
            "last_assistant" => LossMask::LastAssistant,
            "all_assistant" => LossMask::AllAssistant,
            "completion" => LossMask::Completion,
            "all" => LossMask::All,
            "marker_only" => LossMask::MarkerOnly {
                marker: marker.clone().ok_or_else(|| o.bad_value("marker", "is required with loss_mask = \"marker_only\""))?,
            },
            other => {
                return Err(o.bad_value(
                    "loss_mask",
                    format!("must be last_assistant, all_assistant, completion, marker_only, all or a function, got \"{other}\""),
                ))
            }
        }),
        Some(other) => return Err(o.bad_value("loss_mask", format!("must be a name or a function, got {}", crate::lua::a_type(other.type_name())))),
    };
    let on_step: Option<Function> = o.get(lua, "on_step")?;
    let saves = read_save_steps(lua, &mut o)?;
    let output_dir: Option<String> = o.get(lua, "output_dir")?;
    let on_save: Option<Function> = o.get(lua, "on_save")?;
    if saves.is_none() && (output_dir.is_some() || on_save.is_some()) {
        return Err(o.bad_value(
            "save_steps",
            "is needed with output_dir or on_save: when to save (every N steps, or a list of steps)",
        ));
    }
    o.finish()?;
    if max_length < 2 {
        return Err(mlua::Error::runtime(format!("{ctx}: option 'max_length' must be >= 2")));
    }
    cfg.validate().map_err(|e| mlua::Error::runtime(format!("{ctx}: {e}")))?;

    let examples = tokenize_all(lua, &model, &data, &mask, max_length)?;
    let empty = examples.iter().filter(|e| e.num_targets() == 0).count();
    if empty > 0 {
        eprintln!(
            "{ctx}: {empty} of {} rows have no trained token (after truncation to {max_length}); they add nothing",
            examples.len()
        );
    }
    let started = std::time::Instant::now();
    let adapter_ref = adapter.0.borrow();
    let log = super::guarded(ctx, || {
        train::train(&model.0.decoder, &adapter_ref, &examples, &cfg, |rec| {
            if let Some(f) = &on_step {
                let t = lua.to_value(rec).map_err(|e| anyhow::anyhow!("{e}"))?;
                f.call::<()>(t).map_err(|e| anyhow::anyhow!("on_step: {}", super::describe_lua_error(&e)))?;
            }
            if saves.as_ref().is_some_and(|s| s.includes(rec.step)) {
                checkpoint(lua, &adapter, rec, output_dir.as_deref(), on_save.as_ref())?;
            }
            Ok(())
        })
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let out = lua.create_table()?;
    let mut seen = 0usize;
    for (i, rec) in log.iter().enumerate() {
        seen += rec.seen_tokens;
        out.raw_set(i + 1, lua.to_value(rec)?)?;
    }
    out.set("rows", examples.len())?;
    out.set("rows_without_targets", empty)?;
    out.set("skipped_steps", cfg.checked_total_steps(examples.len()).unwrap_or(log.len()) - log.len())?;
    out.set("seconds", seconds)?;
    out.set("tokens_per_second", seen as f64 / seconds.max(1e-9))?;
    Ok(out)
}

/// When to save during training: every N steps, or at the listed steps.
enum SaveSteps {
    Every(usize),
    At(Vec<usize>),
}

impl SaveSteps {
    fn includes(&self, step: usize) -> bool {
        match self {
            SaveSteps::Every(n) => step.is_multiple_of(*n),
            SaveSteps::At(list) => list.contains(&step),
        }
    }
}

fn read_save_steps(lua: &Lua, o: &mut Opts) -> mlua::Result<Option<SaveSteps>> {
    match o.get::<Value>(lua, "save_steps")? {
        None => Ok(None),
        Some(Value::Integer(n)) if n >= 1 => Ok(Some(SaveSteps::Every(n as usize))),
        Some(v @ Value::Table(_)) => {
            let list = <Vec<i64> as mlua::FromLua>::from_lua(v, lua)
                .map_err(|_| o.bad_value("save_steps", "must be a whole number >= 1 or a list of steps"))?;
            if list.iter().any(|&s| s < 1) {
                return Err(o.bad_value("save_steps", format!("lists steps from 1 on, got {list:?}")));
            }
            Ok(Some(SaveSteps::At(list.into_iter().map(|s| s as usize).collect())))
        }
        Some(other) => {
            Err(o.bad_value("save_steps", format!("must be a whole number >= 1 or a list of steps, got {other:?}")))
        }
    }
}

/// A checkpoint after step `rec.step`: the adapter saved to `output_dir/checkpoint-STEP` (as the
/// transformers Trainer names them), then `on_save(adapter, step, step_record)` with the adapter as it
/// is now (training goes on after the callback returns).
fn checkpoint(
    lua: &Lua,
    adapter: &LuaAdapter,
    rec: &train::StepLog,
    output_dir: Option<&str>,
    on_save: Option<&Function>,
) -> anyhow::Result<()> {
    if let Some(dir) = output_dir {
        let path = std::path::Path::new(dir).join(format!("checkpoint-{}", rec.step));
        adapter
            .0
            .borrow()
            .save(&path, &super::adapter::peft_base_model(&adapter.1))
            .map_err(|e| anyhow::anyhow!("saving the checkpoint {}: {e:#}", path.display()))?;
    }
    if let Some(f) = on_save {
        let record = lua.to_value(rec).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ud = lua.create_userdata(adapter.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        f.call::<()>((ud, rec.step, record))
            .map_err(|e| anyhow::anyhow!("on_save: {}", super::describe_lua_error(&e)))?;
    }
    Ok(())
}

fn tokenize_all(
    lua: &Lua,
    model: &LuaModel,
    data: &LuaDataset,
    mask: &MaskChoice,
    max_length: usize,
) -> mlua::Result<Vec<Example>> {
    let tok = &model.0.tokenizer;
    let mut out = Vec::with_capacity(data.0.rows.len());
    let (mut rows_cut, mut targets_cut) = (0usize, 0usize);
    for (i, row) in data.0.rows.iter().enumerate() {
        let where_ = || format!("lab.train.sft: {} row {}", data.0.source, i + 1);
        let ex = match mask {
            MaskChoice::Named(m) => {
                let (ex, cut) = tokenize_counting_cut(tok, row, m, max_length)
                    .map_err(|e| mlua::Error::runtime(format!("{}: {e}", where_())))?;
                if cut > 0 {
                    rows_cut += 1;
                    targets_cut += cut;
                }
                ex
            }
            MaskChoice::Function(f) => {
                let mut ex = tokenize(tok, row, &LossMask::All, max_length)
                    .map_err(|e| mlua::Error::runtime(format!("{}: {e}", where_())))?;
                let info = lua.create_table()?;
                info.set("ids", ex.ids.clone())?;
                info.set("row", lua.to_value(row)?)?;
                info.set("index", i + 1)?;
                let spans: Table = f.call(info)?;
                ex.target = vec![false; ex.ids.len()];
                for span in spans.sequence_values::<Table>() {
                    let span = span?;
                    let (a, b): (usize, usize) = (span.get(1)?, span.get(2)?);
                    if a < 1 || b < a || b > ex.ids.len() {
                        return Err(mlua::Error::runtime(format!(
                            "{}: loss_mask function returned span {{{a}, {b}}} outside 1..{}",
                            where_(),
                            ex.ids.len()
                        )));
                    }
                    ex.target[a - 1..b].iter_mut().for_each(|t| *t = true);
                }
                ex
            }
        };
        out.push(ex);
    }
    if rows_cut > 0 {
        eprintln!(
            "lab.train.sft: max_length = {max_length} cut {rows_cut} of {} rows of {}, losing {targets_cut} trained tokens; \
             raise max_length to keep them",
            out.len(),
            data.0.source
        );
    }
    Ok(out)
}
