//! A loaded model: decoder weights, tokenizer and chat template, under one id.

pub mod checkpoint;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decoder;
pub mod family;
pub mod gguf;
pub mod hub;
pub mod load;
mod lora;
pub mod ops;
pub mod packed;
pub mod sink;
pub mod tokenizer;

use candle_core::{DType, Device};

pub use config::Config;
pub use decoder::{Decoder, KvCache, Pass, SlotCache};
pub use family::Family;
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
        let specs = family::tensors(self.config()).unwrap_or_default();
        specs.iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }
}
