//! loralab: fine-tuning experiments as Lua scripts.
//!
//! `src/` is laid out by concept: `model` (decoder, loading, tokenizer), `adapter` (LoRA),
//! `sample` (batched generation), `stats`, `plot`, `store` (results on disk), `lua` (the `lab`
//! module and its host), `cli`.

pub mod adapter;
pub mod cells;
pub mod cli;
pub mod data;
pub mod eval;
pub mod fuzzing;
pub mod interrupt;
pub mod lock;
pub mod logprobs;
pub mod lua;
pub mod model;
pub mod plot;
pub mod profile;
pub mod sample;
pub mod slurm;
pub mod stats;
pub mod status;
pub mod store;
pub mod testing;
pub mod train;
pub mod workers;
