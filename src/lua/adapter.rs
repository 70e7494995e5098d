//! `lab.adapter`: LoRA adapters from Lua.

use std::cell::RefCell;
use std::rc::Rc;

use mlua::{Lua, Table, UserData, UserDataMethods, Value};

use super::check::{LuaAdapterPlan, LuaModelPlan};
use super::model::LuaModel;
use super::opts::Opts;
use crate::adapter::{Adapter, LoraConfig, Target};

/// The Lua handle of an adapter; training updates it in place.
#[derive(Clone)]
pub struct LuaAdapter(pub Rc<RefCell<Adapter>>, pub String);

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "new",
        lua.create_function(|lua, (model_ud, opts): (mlua::AnyUserData, Value)| {
            let mut o = Opts::new("lab.adapter.new", opts)?;
            let r: usize = o.get_or(lua, "r", 8)?;
            let lora_alpha: f64 = o.get_or(lua, "lora_alpha", 8.0)?;
            let lora_dropout: f64 = o.get_or(lua, "lora_dropout", 0.0)?;
            let names: Vec<String> =
                o.get_or(lua, "target_modules", vec!["q_proj".to_string(), "v_proj".to_string()])?;
            let use_rslora: bool = o.get_or(lua, "use_rslora", false)?;
            let seed: u64 = o.get_or(lua, "seed", 0)?;
            let mut targets = Vec::new();
            for n in &names {
                let all: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
                let expanded: Vec<&str> = if n == "all-linear" { all.clone() } else { vec![n.as_str()] };
                for e in expanded {
                    let t = Target::from_name(e).ok_or_else(|| {
                        o.bad_value(
                            "target_modules",
                            format!("has unknown module '{n}'; known: {}, all-linear", all.join(", ")),
                        )
                    })?;
                    if !targets.contains(&t) {
                        targets.push(t);
                    }
                }
            }
            o.finish()?;
            if r == 0 {
                return Err(mlua::Error::runtime("lab.adapter.new: option 'r' must be >= 1"));
            }
            if let Ok(plan) = model_ud.borrow::<LuaModelPlan>() {
                return lua.create_userdata(LuaAdapterPlan { model_id: plan.0.id.clone() }).map(Value::UserData);
            }
            let model = model_ud
                .borrow::<LuaModel>()
                .map_err(|_| mlua::Error::runtime("lab.adapter.new: first argument must be a model"))?
                .clone();
            let cfg = LoraConfig { r, lora_alpha, lora_dropout, target_modules: targets, use_rslora };
            let a = Adapter::new(&model.0.decoder, cfg, seed)
                .map_err(|e| mlua::Error::runtime(format!("lab.adapter.new: {e}")))?;
            lua.create_userdata(LuaAdapter(Rc::new(RefCell::new(a)), model.0.id.clone())).map(Value::UserData)
        })?,
    )?;
    m.set(
        "load",
        lua.create_function(|lua, (model, dir): (mlua::AnyUserData, String)| {
            if let Ok(plan) = model.borrow::<LuaModelPlan>() {
                // Checking: the folder must hold an adapter; its weights are not read.
                let config = std::path::Path::new(&dir).join("adapter_config.json");
                if !config.is_file() {
                    return Err(mlua::Error::runtime(format!(
                        "lab.adapter.load: {dir} holds no adapter (no adapter_config.json)"
                    )));
                }
                return lua.create_userdata(LuaAdapterPlan { model_id: plan.0.id.clone() }).map(Value::UserData);
            }
            let model = model
                .borrow::<LuaModel>()
                .map_err(|_| mlua::Error::runtime("lab.adapter.load: first argument must be a model"))?
                .clone();
            let a = Adapter::load(std::path::Path::new(&dir), &model.0.decoder).map_err(mlua::Error::external)?;
            lua.create_userdata(LuaAdapter(Rc::new(RefCell::new(a)), model.0.id.clone())).map(Value::UserData)
        })?,
    )?;
    Ok(m)
}

impl UserData for LuaAdapter {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, this, ()| {
            let a = this.0.borrow();
            let c = &a.config;
            Ok(format!(
                "Adapter(r {}, lora_alpha {}, scale {:.4}{}, {} projections, {} parameters)",
                c.r,
                c.lora_alpha,
                c.scale(),
                if c.use_rslora { ", rsLoRA" } else { "" },
                a.pairs.len(),
                a.num_parameters()
            ))
        });
        methods.add_method("save", |_, this, dir: String| {
            this.0
                .borrow()
                .save(std::path::Path::new(&dir), &peft_base_model(&this.1))
                .map_err(|e| mlua::Error::runtime(format!("adapter:save({dir}): {e:#}")))
        });
        methods.add_method("num_parameters", |_, this, ()| Ok(this.0.borrow().num_parameters()));
    }
}

/// `base_model_name_or_path` for PEFT: what `AutoPeftModelForCausalLM` can load. The embedded
/// default is a conversion of a hub model (named by its hub id); a local file or folder is
/// written as its absolute path; anything else is a hub id already.
pub fn peft_base_model(model_id: &str) -> String {
    if model_id == crate::model::DEFAULT_MODEL {
        return "HuggingFaceTB/SmolLM2-135M-Instruct".to_string();
    }
    match std::fs::canonicalize(model_id) {
        Ok(p) => p.display().to_string(),
        Err(_) => model_id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_adapter_names_a_base_model_that_peft_can_load() {
        assert_eq!(peft_base_model(crate::model::DEFAULT_MODEL), "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(peft_base_model("Qwen/Qwen2.5-7B-Instruct"), "Qwen/Qwen2.5-7B-Instruct");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"x").unwrap();
        let given = format!("{}/./m.gguf", dir.path().display());
        assert_eq!(peft_base_model(&given), std::fs::canonicalize(&file).unwrap().display().to_string());
    }
}
