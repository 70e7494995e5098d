//! A loaded model: decoder weights, tokenizer and chat template, under one id.

pub mod checkpoint;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decoder;
pub mod gguf;
pub mod hub;
pub mod load;
mod lora;
pub mod ops;
pub mod packed;
pub mod sink;
pub mod tokenizer;

use candle_core::{DType, Device};

pub use config::{Architecture, Config};
pub use decoder::{Decoder, KvCache, Pass};
pub use hub::{loaded_models, weights_id, Provenance, Source};
pub use load::{load, LoadOptions, DEFAULT_MODEL};
pub use tokenizer::{Message, TextTokenizer};

/// A model ready to run: what `lab.model.load` returns.
pub struct Model {
    /// How the model was named when loaded (name, folder or hub id).
    pub id: String,
    pub decoder: Decoder,
    pub tokenizer: TextTokenizer,
    /// Exactly which weights the model was built from (recorded with every result).
    pub provenance: Provenance,
}

impl Model {
    /// A model whose provenance is only its id, until [`Model::with_provenance`] says more.
    pub fn new(id: String, decoder: Decoder, tokenizer: TextTokenizer) -> Self {
        let provenance = Provenance::new(Source::Local, Some(id.clone()));
        Model { id, decoder, tokenizer, provenance }
    }

    pub fn with_provenance(mut self, provenance: Provenance) -> Self {
        self.provenance = provenance;
        self
    }

    /// A short hash of the weights' files, for cell keys (see [`hub::weights_id`]).
    pub fn weights_id(&self) -> String {
        hub::weights_id(&self.provenance)
    }

    pub fn config(&self) -> &Config {
        &self.decoder.config
    }

    pub fn device(&self) -> &Device {
        &self.decoder.device
    }

    pub fn dtype(&self) -> DType {
        self.decoder.dtype
    }

    /// Number of parameters of the base model (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let d = &self.decoder;
        let mut n = d.embed_tokens.elem_count() + d.norm.weight.elem_count();
        if !d.config.tie_word_embeddings {
            n += d.lm_head.elem_count();
        }
        for l in &d.layers {
            let a = &l.self_attn;
            for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]
            {
                n += lin.weight.elem_count() + lin.bias.as_ref().map_or(0, |b| b.elem_count());
            }
            n += l.input_layernorm.weight.elem_count() + l.post_attention_layernorm.weight.elem_count();
        }
        n
    }
}
