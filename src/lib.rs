//! loralab: fine-tuning experiments as Lua scripts.
//!
//! `src/` is laid out by concept: `model` (decoder, loading, tokenizer), `sample` (batched
//! generation), `stats`, `plot`, `lua` (the `lab` module and host), `cli`.

pub mod cli;
pub mod lua;
