//! Reading a llama-architecture GGUF file into transformers' layout.
//!
//! GGUF differs from a transformers checkpoint in three ways, each undone here:
//! - tensor names (`blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj.weight`);
//! - quantised blocks (dequantised to f32 by candle);
//! - llama.cpp's converter permutes the rows of q_proj and k_proj into an interleaved rotary
//!   layout; they are permuted back so that the decoder's "rotate half" rope applies.
//!
//! The tokenizer comes from the metadata too; see [`tokenizer_from_gguf`].

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::config::Config;
use super::decoder::Weights;

/// Everything a GGUF file holds that the runtime uses.
pub struct GgufModel {
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

pub fn read(path: &Path) -> anyhow::Result<GgufModel> {
    let shown = path.display().to_string();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open model file {shown}"))?;
    read_from(&mut file, &shown)
}

/// The config and tokenizer of a GGUF file, without its weights (`weights` is left empty).
pub fn read_header(path: &Path) -> anyhow::Result<GgufModel> {
    let shown = path.display().to_string();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open model file {shown}"))?;
    read_parts(&mut file, &shown, false)
}

/// Reads a GGUF model from any seekable source; `shown` names it in errors.
pub fn read_from<R: std::io::Read + std::io::Seek>(file: &mut R, shown: &str) -> anyhow::Result<GgufModel> {
    read_parts(file, shown, true)
}

fn read_parts<R: std::io::Read + std::io::Seek>(
    file: &mut R,
    shown: &str,
    with_weights: bool,
) -> anyhow::Result<GgufModel> {
    let shown = shown.to_string();
    header::check(file).map_err(|e| anyhow::anyhow!("{shown} is not a readable GGUF file ({e:#})"))?;
    let content = Content::read(file)
        .map_err(|e| anyhow::anyhow!("{shown} is not a readable GGUF file ({e}); delete it to fetch it again"))?;
    let md = Metadata { map: &content.metadata, source: &shown };
    let arch = md.string("general.architecture")?;
    anyhow::ensure!(
        arch == "llama",
        "{shown}: GGUF architecture '{arch}' is not supported (only 'llama' GGUF files; use a safetensors folder for others)"
    );
    let config = config_from_metadata(&md, &content)?;
    let tokenizer = tokenizer_from_gguf(&md)?;
    let weights = if with_weights {
        read_weights(&content, file, &config, &shown)?
    } else {
        Weights { tensors: HashMap::new(), source: shown.clone() }
    };
    let token = |key: &str| -> Option<String> {
        let id = md.map.get(key)?.to_u32().ok()?;
        tokenizer.id_to_token(id)
    };
    Ok(GgufModel {
        chat_template: md.map.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned(),
        bos_token: token("tokenizer.ggml.bos_token_id"),
        eos_token: token("tokenizer.ggml.eos_token_id"),
        config,
        weights,
        tokenizer,
    })
}

struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
    source: &'a str,
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> anyhow::Result<&Value> {
        self.map.get(key).ok_or_else(|| anyhow::anyhow!("{}: GGUF metadata lacks '{key}'", self.source))
    }
    fn string(&self, key: &str) -> anyhow::Result<String> {
        Ok(self.get(key)?.to_string().map_err(|e| anyhow::anyhow!("{}: '{key}': {e}", self.source))?.clone())
    }
    fn usize(&self, key: &str) -> anyhow::Result<usize> {
        let v = self.get(key)?;
        let n = v
            .to_u32()
            .map(u64::from)
            .or_else(|_| v.to_u64())
            .map_err(|e| anyhow::anyhow!("{}: '{key}': {e}", self.source))?;
        Ok(n as usize)
    }
    fn f64(&self, key: &str) -> anyhow::Result<f64> {
        let v = self.get(key)?;
        v.to_f32().map(f64::from).or_else(|_| v.to_f64()).map_err(|e| anyhow::anyhow!("{}: '{key}': {e}", self.source))
    }
}

fn config_from_metadata(md: &Metadata, content: &Content) -> anyhow::Result<Config> {
    let tokens = md.get("tokenizer.ggml.tokens")?.to_vec()?.len();
    let heads = md.usize("llama.attention.head_count")?;
    let tied = !content.tensor_infos.contains_key("output.weight");
    let cfg = Config {
        architectures: vec!["LlamaForCausalLM".into()],
        vocab_size: tokens,
        hidden_size: md.usize("llama.embedding_length")?,
        intermediate_size: md.usize("llama.feed_forward_length")?,
        num_hidden_layers: md.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(md.usize("llama.attention.head_count_kv").unwrap_or(heads)),
        head_dim: None,
        rms_norm_eps: md.f64("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: Some(md.f64("llama.rope.freq_base").unwrap_or(10_000.0)),
        rope_parameters: None,
        max_position_embeddings: md.usize("llama.context_length").unwrap_or(2048),
        tie_word_embeddings: Some(tied),
        attention_bias: false,
        sliding_window: None,
        use_sliding_window: false,
        max_window_layers: None,
        layer_types: None,
        hidden_act: None,
        hidden_activation: None,
        query_pre_attn_scalar: None,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        bos_token_id: md.usize("tokenizer.ggml.bos_token_id").ok().map(|x| x.into()),
        eos_token_id: md.usize("tokenizer.ggml.eos_token_id").ok().map(|x| x.into()),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// transformers' name for a GGUF tensor name, for the llama layout.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let module = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

fn read_weights<R: std::io::Read + std::io::Seek>(
    content: &Content,
    file: &mut R,
    cfg: &Config,
    source: &str,
) -> anyhow::Result<Weights> {
    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut unknown = Vec::new();
    for name in names {
        let Some(hf) = hf_name(name) else {
            // rope_freqs: Llama 3's rope scaling factors, which the config's rope settings give.
            if name != "rope_freqs.weight" {
                unknown.push(name.as_str());
            }
            continue;
        };
        let q = content
            .tensor(file, name, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("{source}: cannot read tensor '{name}' ({e}); the file may be truncated"))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        let e = cfg.head_dim();
        let (d, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        let rows = if hf.ends_with("q_proj.weight") {
            Some((heads, heads * e))
        } else if hf.ends_with("k_proj.weight") {
            Some((cfg.num_kv_heads(), cfg.num_kv_heads() * e))
        } else {
            None
        };
        if let Some((h, want)) = rows {
            // Checked before the permutation, whose reshape would fail without naming anything.
            anyhow::ensure!(
                t.dims() == [want, d],
                "{source}: tensor '{name}' ({hf}) has shape {:?}, the metadata implies [{want}, {d}]",
                t.dims()
            );
            t = unpermute_rotary_rows(&t, h)?;
        }
        tensors.insert(hf, t);
    }
    if !unknown.is_empty() {
        eprintln!("warning: {source}: tensors loralab does not use: {}", unknown.join(", "));
    }
    Ok(Weights { tensors, source: source.to_string() })
}

/// Undoes llama.cpp's `permute`: within each head, rows were reordered from
/// (2, E/2) to (E/2, 2). w: (heads * E, in) -> same shape, transformers' row order.
pub fn unpermute_rotary_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let e = rows / heads;
    w.reshape((heads, e / 2, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))
}

/// Builds the byte-level BPE tokenizer that the metadata describes.
///
/// The `pre` tokenizer matters: SmolLM2 (`pre = "smollm"`) splits digits individually before
/// the byte-level split; a plain GPT-2 pre-tokenizer mis-tokenizes numbers and some words.
fn tokenizer_from_gguf(md: &Metadata) -> anyhow::Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, PreTokenizerWrapper};

    let model_kind = md.string("tokenizer.ggml.model")?;
    anyhow::ensure!(
        model_kind == "gpt2",
        "{}: tokenizer model '{model_kind}' is not supported (byte-level BPE only)",
        md.source
    );
    let tokens: Vec<String> =
        md.get("tokenizer.ggml.tokens")?.to_vec()?.iter().map(|v| v.to_string().cloned()).collect::<Result<_, _>>()?;
    let merges: Vec<(String, String)> = md
        .get("tokenizer.ggml.merges")?
        .to_vec()?
        .iter()
        .map(|v| {
            let s = v.to_string()?;
            let (a, b) = s.split_once(' ').unwrap_or((s.as_str(), ""));
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<candle_core::Result<_>>()?;
    let types: Vec<i32> = match md.map.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|x| x.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{}: cannot build the BPE tokenizer: {e}", md.source))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let pre = md.map.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        // Digits split one by one, then the GPT-2 byte-level regex (SmolLM2's tokenizer.json).
        "smollm" | "starcoder" | "refact" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        _ => byte_level.into(),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3) are special: matched whole, never split.
    let specials: Vec<AddedToken> =
        tokens.iter().zip(&types).filter(|(_, ty)| **ty == 3).map(|(t, _)| AddedToken::from(t.clone(), true)).collect();
    tok.add_special_tokens(specials).map_err(|e| anyhow::anyhow!("{}: special tokens: {e}", md.source))?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_transformers_names() {
        assert_eq!(hf_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermuting_inverts_the_llama_cpp_permutation() -> candle_core::Result<()> {
        // llama.cpp: w.reshape(heads, 2, E/2, in).swapaxes(1, 2).reshape(w.shape)
        let (heads, e, cols) = (2, 4, 3);
        let w = Tensor::arange(0f32, (heads * e * cols) as f32, &Device::Cpu)?.reshape((heads * e, cols))?;
        let permuted = w.reshape((heads, 2, e / 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((heads * e, cols))?;
        let back = unpermute_rotary_rows(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}

/// A bounded walk over a GGUF header before candle reads it. candle allocates whatever the
/// header's counts and lengths ask for; a damaged or hostile file (a string "of" 2^60 bytes)
/// would abort the process. Here every count and length is checked against the bytes that
/// remain in the file, so that what candle then allocates is bounded by the file's size.
mod header {
    use std::io::{Read, Seek, SeekFrom};

    const MAGIC: u32 = 0x4655_4747; // "GGUF", little-endian
    /// Arrays of arrays deeper than this are no model's metadata.
    const MAX_DEPTH: usize = 4;

    struct Walk<'a, R> {
        r: std::io::BufReader<&'a mut R>,
        left: u64,
        version: u32,
    }

    pub fn check<R: Read + Seek>(file: &mut R) -> anyhow::Result<()> {
        let len = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        let mut w = Walk { r: std::io::BufReader::new(&mut *file), left: len, version: 0 };
        anyhow::ensure!(w.u32()? == MAGIC, "no GGUF magic number at the start");
        w.version = w.u32()?;
        anyhow::ensure!((1..=3).contains(&w.version), "GGUF version {} is not supported (1 to 3)", w.version);
        let tensors = w.count(8 + 4 + 4 + 8)?; // the least a tensor's entry takes
        let entries = w.count(8 + 4)?;
        for _ in 0..entries {
            w.string()?;
            let kind = w.u32()?;
            w.value(kind, 0)?;
        }
        for _ in 0..tensors {
            w.string()?;
            let dims = w.u32()?;
            anyhow::ensure!((1..=4).contains(&dims), "a tensor has {dims} dimensions (1 to 4)");
            let mut elements: u64 = 1;
            for _ in 0..dims {
                let d = w.u64_or_u32()?;
                // An empty tensor makes candle build a slice from a dangling, misaligned pointer.
                anyhow::ensure!(d > 0, "a tensor has a dimension of size 0");
                elements = elements.checked_mul(d).filter(|&e| e <= len.saturating_mul(8)).ok_or_else(|| {
                    anyhow::anyhow!("a tensor's dimensions ask for more elements than the file can hold")
                })?;
            }
            w.u32()?; // its type
            w.u64()?; // its offset; candle checks the data it reads against the file
        }
        drop(w);
        file.seek(SeekFrom::Start(0))?;
        Ok(())
    }

    impl<R: Read> Walk<'_, R> {
        fn take(&mut self, n: u64) -> anyhow::Result<()> {
            anyhow::ensure!(n <= self.left, "the header runs past the end of the file");
            self.left -= n;
            Ok(())
        }
        fn bytes<const N: usize>(&mut self) -> anyhow::Result<[u8; N]> {
            self.take(N as u64)?;
            let mut b = [0u8; N];
            self.r.read_exact(&mut b)?;
            Ok(b)
        }
        fn u32(&mut self) -> anyhow::Result<u32> {
            Ok(u32::from_le_bytes(self.bytes()?))
        }
        fn u64(&mut self) -> anyhow::Result<u64> {
            Ok(u64::from_le_bytes(self.bytes()?))
        }
        /// Lengths and counts are u32 in version 1, u64 after.
        fn u64_or_u32(&mut self) -> anyhow::Result<u64> {
            if self.version == 1 {
                Ok(self.u32()? as u64)
            } else {
                self.u64()
            }
        }
        /// A count of items of at least `min_size` bytes each, checked against what is left.
        fn count(&mut self, min_size: u64) -> anyhow::Result<u64> {
            let n = self.u64_or_u32()?;
            anyhow::ensure!(
                n.saturating_mul(min_size) <= self.left,
                "the header counts {n} items, more than the file can hold"
            );
            Ok(n)
        }
        fn skip(&mut self, n: u64) -> anyhow::Result<()> {
            self.take(n)?;
            std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())?;
            Ok(())
        }
        fn string(&mut self) -> anyhow::Result<()> {
            let n = self.u64_or_u32()?;
            self.skip(n)
        }
        fn value(&mut self, kind: u32, depth: usize) -> anyhow::Result<()> {
            match kind {
                0 | 1 | 7 => self.skip(1),
                2 | 3 => self.skip(2),
                4..=6 => self.skip(4),
                10..=12 => self.skip(8),
                8 => self.string(),
                9 => {
                    anyhow::ensure!(depth < MAX_DEPTH, "metadata arrays nested deeper than {MAX_DEPTH}");
                    let item = self.u32()?;
                    let n = self.count(1)?;
                    for _ in 0..n {
                        self.value(item, depth + 1)?;
                    }
                    Ok(())
                }
                other => anyhow::bail!("metadata value of unknown type {other}"),
            }
        }
    }
}
