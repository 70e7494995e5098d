//! `lab.model`: loading models, tokenizing, chat prompts and sampling.

use std::rc::Rc;

use candle_core::{DType, Device};
use mlua::{Lua, LuaSerdeExt, Table, UserData, UserDataMethods, Value};

use super::opts::Opts;
use crate::logprobs::{self, LogprobOptions, Scored, Sequence};
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
            let seed: Option<u64> = o.get(lua, "seed")?;
            let device = parse_device(&o, &device_name)?;
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
                        crate::lua::a_type(other.type_name())
                    )))
                }
            };
            if super::check::checking() {
                let plan = model::load::describe_random(cfg, id, seed)
                    .map_err(|e| mlua::Error::runtime(format!("lab.model.random: {e:#}")))?;
                return lua.create_userdata(super::check::LuaModelPlan(Rc::new(plan))).map(Value::UserData);
            }
            let m = model::load::random(cfg, &LoadOptions { dtype, device }, id, seed)
                .map_err(|e| mlua::Error::runtime(format!("lab.model.random: {e:#}")))?;
            lua.create_userdata(LuaModel(Rc::new(m))).map(Value::UserData)
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
            if super::check::checking() {
                let plan = model::load::describe_at(&spec, revision.as_deref()).map_err(mlua::Error::external)?;
                return lua.create_userdata(super::check::LuaModelPlan(Rc::new(plan))).map(Value::UserData);
            }
            super::free_unreachable(lua)?;
            let model = model::load::load_at(&spec, revision.as_deref(), &LoadOptions { dtype, device })
                .map_err(mlua::Error::external)?;
            lua.create_userdata(LuaModel(Rc::new(model))).map(Value::UserData)
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

/// The device named by option `device`. Under `loralab check` none is opened (checking runs
/// where no GPU is): the name is checked and the CPU stands in.
pub fn parse_device(o: &Opts, s: &str) -> mlua::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" if super::check::checking() => Ok(Device::Cpu),
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
    prompt_ids_for("model:sample", model, value, index)
}

fn prompt_ids_for(context: &str, model: &Model, value: Value, index: usize) -> mlua::Result<Vec<u32>> {
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
                            "{context}: prompt {index}: {other:?} is not a token id of this model (0..{vocab})"
                        )))
                    }
                }
            }
            return Ok(ids);
        }
        Value::Table(t) => {
            let msgs = messages_from_lua(&t, &format!("{context}: prompt {index}"))?;
            model
                .tokenizer
                .chat_prompt(&msgs, true)
                .map_err(|e| mlua::Error::runtime(format!("{context}: prompt {index}: {e:#}")))?
        }
        other => {
            return Err(mlua::Error::runtime(format!(
                "{context}: prompt {index} must be a string, a list of token ids or a list of messages, got {}",
                crate::lua::a_type(other.type_name())
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
        group_size: o.get_or(lua, "group_size", d.group_size)?,
        ignore_eos: o.get_or(lua, "ignore_eos", d.ignore_eos)?,
        continuous_batching: o.get_or(lua, "continuous_batching", d.continuous_batching)?,
    };
    let adapter = adapter_option(lua, &mut o)?;
    o.finish()?;
    if let Err(e) = opts.validate() {
        return Err(mlua::Error::runtime(format!("model:sample: {e}")));
    }
    Ok((opts, adapter))
}

/// The options of `model:logprobs` and `model:next_token_logprobs`.
fn logprob_options(
    lua: &Lua,
    context: &str,
    value: Value,
) -> mlua::Result<(LogprobOptions, Option<crate::lua::adapter::LuaAdapter>)> {
    let mut o = Opts::new(context, value)?;
    let d = LogprobOptions::default();
    let opts = LogprobOptions {
        batch_size: o.get_or(lua, "batch_size", d.batch_size)?,
        top_k: o.get_or(lua, "top_k", d.top_k)?,
    };
    let adapter = adapter_option(lua, &mut o)?;
    if opts.batch_size == 0 {
        return Err(o.bad_value("batch_size", "must be >= 1"));
    }
    o.finish()?;
    Ok((opts, adapter))
}

/// The `adapter` option: an adapter applied on the fly (unmerged).
fn adapter_option(lua: &Lua, o: &mut Opts) -> mlua::Result<Option<crate::lua::adapter::LuaAdapter>> {
    match o.get::<mlua::AnyUserData>(lua, "adapter")? {
        Some(ud) => Ok(Some(
            ud.borrow::<crate::lua::adapter::LuaAdapter>()
                .map_err(|_| o.bad_value("adapter", "must be an adapter from lab.adapter"))?
                .clone(),
        )),
        None => Ok(None),
    }
}

/// One `{prompt = ..., completion = ...}` item of `model:logprobs` as token ids. A text
/// completion is tokenized on its own and follows the prompt's tokens (a chat prompt ends with
/// the assistant's header); a completion given as messages is rendered with the prompt by the
/// chat template, and its tokens are those after the prompt's (end-of-turn tokens included).
fn logprob_sequence(lua: &Lua, model: &Model, item: Value, index: usize) -> mlua::Result<Sequence> {
    const CONTEXT: &str = "model:logprobs";
    if !matches!(item, Value::Table(_)) {
        return Err(mlua::Error::runtime(format!(
            "{CONTEXT}: item {index} must be a table {{prompt = ..., completion = ...}}, got {}",
            crate::lua::a_type(item.type_name())
        )));
    }
    let mut o = Opts::new(&format!("{CONTEXT}: item {index}"), item)?;
    let prompt: Option<Value> = o.get(lua, "prompt")?;
    let completion: Option<Value> = o.get(lua, "completion")?;
    // Unknown keys first: a misspelt 'completion' is reported as such, not as missing.
    o.finish()?;
    let (Some(prompt), Some(completion)) = (prompt, completion) else {
        return Err(mlua::Error::runtime(format!(
            "{CONTEXT}: item {index} needs both 'prompt' and 'completion' (text, token ids or messages)"
        )));
    };
    let is_messages = |v: &Value| matches!(v, Value::Table(t) if matches!(t.raw_get::<Value>(1), Ok(Value::Table(_))));
    if is_messages(&completion) {
        let (Value::Table(p), Value::Table(c), true) = (&prompt, &completion, is_messages(&prompt)) else {
            return Err(mlua::Error::runtime(format!(
                "{CONTEXT}: item {index}: a completion given as messages needs a prompt given as messages"
            )));
        };
        let p = messages_from_lua(p, &format!("{CONTEXT}: item {index} prompt"))?;
        let mut all = p.clone();
        all.extend(messages_from_lua(c, &format!("{CONTEXT}: item {index} completion"))?);
        let tok = &model.tokenizer;
        let chat = |m: &[Message], add| -> anyhow::Result<Vec<u32>> { tok.encode(&tok.chat_prompt(m, add)?) };
        let (prompt_ids, full) = (chat(&p, true), chat(&all, false));
        let (prompt_ids, full) = (prompt_ids.map_err(mlua::Error::external)?, full.map_err(mlua::Error::external)?);
        if !full.starts_with(&prompt_ids) {
            return Err(mlua::Error::runtime(format!(
                "{CONTEXT}: item {index}: the chat template renders the conversation so that it does not start \
                 with the prompt's tokens; give the completion as text instead"
            )));
        }
        let continuation = full[prompt_ids.len()..].to_vec();
        return Ok(Sequence { prompt: prompt_ids, continuation });
    }
    let prompt = prompt_ids_for(CONTEXT, model, prompt, index)?;
    let continuation = match completion {
        Value::String(s) => model.tokenizer.encode(&s.to_str()?).map_err(mlua::Error::external)?,
        Value::Table(t) => prompt_ids_for(&format!("{CONTEXT}: completion of"), model, Value::Table(t), index)?,
        other => {
            return Err(mlua::Error::runtime(format!(
                "{CONTEXT}: item {index}: completion must be a string, token ids or messages, got {}",
                crate::lua::a_type(other.type_name())
            )))
        }
    };
    Ok(Sequence { prompt, continuation })
}

/// `{ {id = ..., token = ..., logprob = ...}, ... }`
fn top_table(lua: &Lua, model: &Model, top: &[(u32, f32)]) -> mlua::Result<Table> {
    let list = lua.create_table()?;
    for (i, &(id, lp)) in top.iter().enumerate() {
        let t = lua.create_table()?;
        t.set("id", id)?;
        t.set("token", model.tokenizer.decode(&[id], false).map_err(mlua::Error::external)?)?;
        t.set("logprob", lp)?;
        list.raw_set(i + 1, t)?;
    }
    Ok(list)
}

fn scored_table(lua: &Lua, model: &Model, seq: &Sequence, scored: &Scored, top_k: usize) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    let tokens = lua.create_table()?;
    for (i, &id) in seq.continuation.iter().enumerate() {
        tokens.raw_set(i + 1, model.tokenizer.decode(&[id], false).map_err(mlua::Error::external)?)?;
    }
    t.set("token_ids", seq.continuation.clone())?;
    t.set("tokens", tokens)?;
    t.set("logprobs", scored.logprobs.clone())?;
    t.set("num_tokens", seq.continuation.len())?;
    t.set("sum", scored.sum())?;
    if !seq.continuation.is_empty() {
        t.set("mean", scored.sum() / seq.continuation.len() as f64)?;
    }
    if top_k > 0 {
        let top = lua.create_table()?;
        for (i, alts) in scored.top.iter().enumerate() {
            top.raw_set(i + 1, top_table(lua, model, alts)?)?;
        }
        t.set("top", top)?;
        t.set("next", top_table(lua, model, &scored.next)?)?;
    }
    Ok(t)
}

/// `encode`, `decode` and `chat_prompt`, for a loaded model and for a model described by
/// `loralab check` alike.
pub fn add_tokenizer_methods<T: 'static, M: UserDataMethods<T>>(
    methods: &mut M,
    tokenizer: fn(&T) -> &crate::model::TextTokenizer,
) {
    methods.add_method("encode", move |_, this, text: String| {
        tokenizer(this).encode(&text).map_err(mlua::Error::external)
    });
    methods.add_method("decode", move |lua, this, (ids, opts): (Vec<u32>, Value)| {
        let mut o = Opts::new("model:decode", opts)?;
        let skip = o.get_or(lua, "skip_special_tokens", true)?;
        o.finish()?;
        tokenizer(this).decode(&ids, skip).map_err(mlua::Error::external)
    });
    methods.add_method("chat_prompt", move |lua, this, (messages, opts): (Table, Value)| {
        let mut o = Opts::new("model:chat_prompt", opts)?;
        let add = o.get_or(lua, "add_generation_prompt", true)?;
        o.finish()?;
        let msgs = messages_from_lua(&messages, "model:chat_prompt")?;
        tokenizer(this).chat_prompt(&msgs, add).map_err(mlua::Error::external)
    });
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
        add_tokenizer_methods(methods, |this: &Self| &this.0.tokenizer);
        methods.add_method("merge", |lua, this, adapter: mlua::AnyUserData| {
            super::free_unreachable(lua)?;
            let adapter = adapter
                .borrow::<crate::lua::adapter::LuaAdapter>()
                .map_err(|_| mlua::Error::runtime("model:merge: argument must be an adapter from lab.adapter"))?;
            let merged = this.0.decoder.merged(&adapter.0.borrow()).map_err(mlua::Error::external)?;
            let id = format!("{}+merged", this.0.id);
            // The base weights' provenance; the adapter is recorded with the result on its own.
            let merged = Model::new(id, merged, this.0.tokenizer.clone()).with_provenance(this.0.provenance.clone());
            Ok(LuaModel(Rc::new(merged)))
        });
        methods.add_method("logprobs", |lua, this, (items, opts): (Table, Value)| {
            let (opts, adapter) = logprob_options(lua, "model:logprobs", opts)?;
            let mut seqs = Vec::new();
            for (i, item) in items.sequence_values::<Value>().enumerate() {
                seqs.push(logprob_sequence(lua, &this.0, item?, i + 1)?);
            }
            let adapter_ref = adapter.as_ref().map(|a| a.0.borrow().clone());
            let scored =
                super::guarded("model:logprobs", || logprobs::logprobs(&this.0, adapter_ref.as_ref(), &seqs, &opts))?;
            let out = lua.create_table()?;
            for (i, (seq, s)) in seqs.iter().zip(&scored).enumerate() {
                out.raw_set(i + 1, scored_table(lua, &this.0, seq, s, opts.top_k)?)?;
            }
            Ok(out)
        });
        methods.add_method("next_token_logprobs", |lua, this, (prompts, opts): (Table, Value)| {
            let (mut opts, adapter) = logprob_options(lua, "model:next_token_logprobs", opts)?;
            if opts.top_k == 0 {
                opts.top_k = 10;
            }
            let mut seqs = Vec::new();
            for (i, p) in prompts.sequence_values::<Value>().enumerate() {
                let prompt = prompt_ids_for("model:next_token_logprobs", &this.0, p?, i + 1)?;
                seqs.push(Sequence { prompt, continuation: Vec::new() });
            }
            let adapter_ref = adapter.as_ref().map(|a| a.0.borrow().clone());
            let scored = super::guarded("model:next_token_logprobs", || {
                logprobs::logprobs(&this.0, adapter_ref.as_ref(), &seqs, &opts)
            })?;
            let out = lua.create_table()?;
            for (i, s) in scored.iter().enumerate() {
                out.raw_set(i + 1, top_table(lua, &this.0, &s.next)?)?;
            }
            Ok(out)
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
            st.set("batch_size", stats.batch_size)?;
            st.set("decode_steps", stats.decode_steps)?;
            Ok((result, st))
        });
    }
}
