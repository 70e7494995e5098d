//! `lab.model`: loading models, tokenizing, chat prompts and sampling.

use std::rc::Rc;

use candle_core::{DType, Device};
use mlua::{Lua, LuaSerdeExt, Table, UserData, UserDataMethods, Value};

use super::opts::Opts;
use crate::model::{self, LoadOptions, Message, Model};
use crate::sample::{self, SampleOptions};

/// The Lua handle of a loaded model.
#[derive(Clone)]
pub struct LuaModel(pub Rc<Model>);

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("default", model::DEFAULT_MODEL)?;
    m.set(
        "random",
        lua.create_function(|lua, (config, opts): (Value, Value)| {
            let mut o = Opts::new("lab.model.random", opts)?;
            let dtype_name: String = o.get_or(lua, "dtype", "f32".to_string())?;
            let device_name: String = o.get_or(lua, "device", "cpu".to_string())?;
            let dtype = parse_dtype(&o, &dtype_name)?;
            let device = parse_device(&o, &device_name)?;
            let seed: Option<u64> = o.get(lua, "seed")?;
            o.finish()?;
            let (cfg, id) = match config {
                Value::String(path) => {
                    let path = path.to_str()?.to_string();
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| mlua::Error::runtime(format!("lab.model.random: cannot read {path}: {e}")))?;
                    let cfg: model::Config = serde_json::from_str(&text).map_err(|e| {
                        mlua::Error::runtime(format!("lab.model.random: {path} is not a model config: {e}"))
                    })?;
                    (cfg, format!("random({path})"))
                }
                Value::Table(t) => {
                    let cfg: model::Config = lua
                        .from_value(Value::Table(t))
                        .map_err(|e| mlua::Error::runtime(format!("lab.model.random: not a model config: {e}")))?;
                    (cfg, "random".to_string())
                }
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "lab.model.random: config must be a path or a table, got {}",
                        other.type_name()
                    )))
                }
            };
            let m = model::load::random(cfg, &LoadOptions { dtype, device }, id, seed)
                .map_err(|e| mlua::Error::runtime(format!("lab.model.random: {e:#}")))?;
            Ok(LuaModel(Rc::new(m)))
        })?,
    )?;
    m.set(
        "load",
        lua.create_function(|lua, (spec, opts): (Option<String>, Value)| {
            let spec = spec.unwrap_or_else(|| model::DEFAULT_MODEL.to_string());
            let mut o = Opts::new("lab.model.load", opts)?;
            let dtype_name: String = o.get_or(lua, "dtype", "f32".to_string())?;
            let device_name: String = o.get_or(lua, "device", "cpu".to_string())?;
            let revision: Option<String> = o.get(lua, "revision")?;
            let dtype = parse_dtype(&o, &dtype_name)?;
            let device = parse_device(&o, &device_name)?;
            o.finish()?;
            let model = model::load::load_at(&spec, revision.as_deref(), &LoadOptions { dtype, device })
                .map_err(mlua::Error::external)?;
            Ok(LuaModel(Rc::new(model)))
        })?,
    )?;
    Ok(m)
}

pub fn parse_dtype(o: &Opts, s: &str) -> mlua::Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(o.bad_value("dtype", format!("must be \"f32\", \"bf16\" or \"f16\", got \"{other}\""))),
    }
}

pub fn parse_device(o: &Opts, s: &str) -> mlua::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            let dev = Device::new_cuda(0).map_err(|e| {
                o.bad_value("device", format!("\"cuda\" is not available ({e}); this binary may lack the cuda feature"))
            })?;
            #[cfg(feature = "cuda")]
            if let Ok(cuda) = dev.as_cuda_device() {
                crate::model::cuda::single_stream(cuda);
            }
            Ok(dev)
        }
        other => Err(o.bad_value("device", format!("must be \"cpu\" or \"cuda\", got \"{other}\""))),
    }
}

/// Reads a list of messages `{ {role=..., content=...}, ... }`.
pub fn messages_from_lua(value: &Table, context: &str) -> mlua::Result<Vec<Message>> {
    let mut out = Vec::new();
    for (i, m) in value.sequence_values::<Table>().enumerate() {
        let m = m.map_err(|_| {
            mlua::Error::runtime(format!("{context}: message {} must be a table {{role=..., content=...}}", i + 1))
        })?;
        let role: Option<String> = m.get("role")?;
        let content: Option<String> = m.get("content")?;
        match (role, content) {
            (Some(role), Some(content)) => out.push(Message { role, content }),
            _ => {
                return Err(mlua::Error::runtime(format!(
                    "{context}: message {} needs string fields 'role' and 'content'",
                    i + 1
                )))
            }
        }
    }
    Ok(out)
}

/// A prompt is either raw text or a conversation, rendered with the chat template.
fn prompt_ids(model: &Model, value: Value, index: usize) -> mlua::Result<Vec<u32>> {
    let text = match value {
        Value::String(s) => s.to_str()?.to_string(),
        Value::Table(t) if matches!(t.raw_get::<Value>(1)?, Value::Integer(_)) => {
            // Token ids, used as they are.
            let vocab = model.config().vocab_size as i64;
            let mut ids = Vec::new();
            for id in t.sequence_values::<Value>() {
                match id? {
                    Value::Integer(i) if (0..vocab).contains(&i) => ids.push(i as u32),
                    other => {
                        return Err(mlua::Error::runtime(format!(
                            "model:sample: prompt {index}: {other:?} is not a token id of this model (0..{vocab})"
                        )))
                    }
                }
            }
            return Ok(ids);
        }
        Value::Table(t) => {
            let msgs = messages_from_lua(&t, &format!("model:sample: prompt {index}"))?;
            model.tokenizer.chat_prompt(&msgs, true).map_err(mlua::Error::external)?
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "model:sample: prompt {index} must be a string or a list of messages, got {}",
                other.type_name()
            )))
        }
    };
    model.tokenizer.encode(&text).map_err(mlua::Error::external)
}

fn sample_options(lua: &Lua, value: Value) -> mlua::Result<(SampleOptions, Option<crate::lua::adapter::LuaAdapter>)> {
    let mut o = Opts::new("model:sample", value)?;
    let d = SampleOptions::default();
    let opts = SampleOptions {
        n: o.get_or(lua, "n", d.n)?,
        temperature: o.get_or(lua, "temperature", d.temperature)?,
        top_p: o.get_or(lua, "top_p", d.top_p)?,
        top_k: o.get_or(lua, "top_k", d.top_k)?,
        max_tokens: o.get_or(lua, "max_tokens", d.max_tokens)?,
        stop: match o.get::<Value>(lua, "stop")? {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.to_str()?.to_string()],
            Some(v) => <Vec<String> as mlua::FromLua>::from_lua(v, lua)
                .map_err(|_| o.bad_value("stop", "must be a string or a list of strings"))?,
        },
        stop_token_ids: o.get_or(lua, "stop_token_ids", Vec::new())?,
        seed: o.get_or(lua, "seed", d.seed)?,
        batch_size: o.get_or(lua, "batch_size", d.batch_size)?,
        ignore_eos: o.get_or(lua, "ignore_eos", d.ignore_eos)?,
    };
    let adapter = o.get::<mlua::AnyUserData>(lua, "adapter")?;
    let adapter = match adapter {
        Some(ud) => Some(
            ud.borrow::<crate::lua::adapter::LuaAdapter>()
                .map_err(|_| o.bad_value("adapter", "must be an adapter from lab.adapter"))?
                .clone(),
        ),
        None => None,
    };
    o.finish()?;
    if let Err(e) = opts.validate() {
        return Err(mlua::Error::runtime(format!("model:sample: {e}")));
    }
    Ok((opts, adapter))
}

impl UserData for LuaModel {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, this, ()| {
            let c = this.0.config();
            Ok(format!(
                "Model({}: {}, {} layers, d {}, {:.0}M parameters, {:?} on {})",
                this.0.id,
                c.architectures.first().map(String::as_str).unwrap_or("?"),
                c.num_hidden_layers,
                c.hidden_size,
                this.0.num_parameters() as f64 / 1e6,
                this.0.dtype(),
                if this.0.device().is_cpu() { "cpu" } else { "cuda" }
            ))
        });
        methods.add_method("info", |lua, this, ()| {
            let t = lua.create_table()?;
            t.set("id", this.0.id.clone())?;
            t.set("config", lua.to_value(this.0.config())?)?;
            t.set("num_parameters", this.0.num_parameters())?;
            t.set("dtype", format!("{:?}", this.0.dtype()).to_lowercase())?;
            t.set("device", if this.0.device().is_cpu() { "cpu" } else { "cuda" })?;
            t.set("provenance", lua.to_value(&this.0.provenance)?)?;
            t.set("weights_id", this.0.weights_id())?;
            Ok(t)
        });
        methods.add_method("encode", |_, this, text: String| {
            this.0.tokenizer.encode(&text).map_err(mlua::Error::external)
        });
        methods.add_method("decode", |lua, this, (ids, opts): (Vec<u32>, Value)| {
            let mut o = Opts::new("model:decode", opts)?;
            let skip = o.get_or(lua, "skip_special_tokens", true)?;
            o.finish()?;
            this.0.tokenizer.decode(&ids, skip).map_err(mlua::Error::external)
        });
        methods.add_method("chat_prompt", |lua, this, (messages, opts): (Table, Value)| {
            let mut o = Opts::new("model:chat_prompt", opts)?;
            let add = o.get_or(lua, "add_generation_prompt", true)?;
            o.finish()?;
            let msgs = messages_from_lua(&messages, "model:chat_prompt")?;
            this.0.tokenizer.chat_prompt(&msgs, add).map_err(mlua::Error::external)
        });
        methods.add_method("merge", |_, this, adapter: mlua::AnyUserData| {
            let adapter = adapter
                .borrow::<crate::lua::adapter::LuaAdapter>()
                .map_err(|_| mlua::Error::runtime("model:merge: argument must be an adapter from lab.adapter"))?;
            let merged = this.0.decoder.merged(&adapter.0.borrow()).map_err(mlua::Error::external)?;
            let id = format!("{}+merged", this.0.id);
            // The base weights' provenance; the adapter is recorded with the result on its own.
            let merged = Model::new(id, merged, this.0.tokenizer.clone()).with_provenance(this.0.provenance.clone());
            Ok(LuaModel(Rc::new(merged)))
        });
        methods.add_method("sample", |lua, this, (prompts, opts): (Table, Value)| {
            let (opts, adapter) = sample_options(lua, opts)?;
            let mut ids = Vec::new();
            for (i, p) in prompts.sequence_values::<Value>().enumerate() {
                ids.push(prompt_ids(&this.0, p?, i + 1)?);
            }
            let adapter_ref = adapter.as_ref().map(|a| a.0.borrow().clone());
            let (outs, stats) =
                super::guarded("model:sample", || sample::sample(&this.0, adapter_ref.as_ref(), &ids, &opts))?;
            let result = lua.create_table()?;
            for (i, per_prompt) in outs.into_iter().enumerate() {
                let list = lua.create_table()?;
                for (j, c) in per_prompt.into_iter().enumerate() {
                    let t = lua.create_table()?;
                    t.set("text", c.text)?;
                    t.set("num_tokens", c.token_ids.len())?;
                    t.set("finish_reason", c.finish_reason.as_str())?;
                    list.raw_set(j + 1, t)?;
                }
                result.raw_set(i + 1, list)?;
            }
            let st = lua.create_table()?;
            st.set("prompt_tokens", stats.prompt_tokens)?;
            st.set("generated_tokens", stats.generated_tokens)?;
            st.set("prefill_seconds", stats.prefill_seconds)?;
            st.set("decode_seconds", stats.decode_seconds)?;
            st.set("peak_rows", stats.peak_rows)?;
            Ok((result, st))
        });
    }
}
