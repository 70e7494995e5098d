//! loralab: fine-tuning experiments as Lua scripts.
//!
//! `src/` is laid out by concept: `model` (decoder, loading, tokenizer), `adapter` (LoRA),
//! `sample` (batched generation), `stats`, `plot`, `store` (results on disk), `lua` (the `lab`
//! module and its host), `cli`.

pub mod adapter;
pub mod cli;
pub mod lock;
pub mod lua;
pub mod model;
pub mod plot;
pub mod eval;
pub mod stats;
pub mod sample;
pub mod store;
pub mod data;
pub mod train;
