//! Text <-> token ids, and the model's own chat template.

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The tokenizer of a model together with its chat template and stop tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Token ids that end a completion (end of turn, end of text).
    pub stop_ids: Vec<u32>,
}

impl TextTokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        mut stop_ids: Vec<u32>,
    ) -> Self {
        // End-of-turn markers of the common chat formats stop generation whatever the config says.
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"] {
            if let Some(id) = inner.token_to_id(name) {
                stop_ids.push(id);
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            stop_ids.push(id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        TextTokenizer { inner, template, bos_token, eos_token, stop_ids }
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> anyhow::Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.template.as_deref()
    }

    /// Renders `messages` with the model's chat template (Jinja), as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn chat_prompt(&self, messages: &[Message], add_generation_prompt: bool) -> anyhow::Result<String> {
        let source = self
            .template
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("this model has no chat template; pass plain text prompts instead"))?;
        render_chat_template(
            source,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }
}

/// Renders a Jinja chat template with the variables transformers provides.
pub fn render_chat_template(
    source: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    // Templates are written for Python's Jinja: `.strip()`, `.startswith()` and friends.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", source).context("the model's chat template does not parse")?;
    let tmpl = env.get_template("chat")?;
    let out = tmpl
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        })
        .context("rendering the chat template failed")?;
    Ok(out)
}

/// Parses a tokenizer.json. The tokenizers crate panics on some malformed files (a control
/// character inside its decoder's JSON): that panic becomes an error naming the file.
pub fn parse_tokenizer_json(bytes: &[u8], shown: &str) -> anyhow::Result<tokenizers::Tokenizer> {
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(anyhow::anyhow!("{shown}: cannot read the tokenizer ({e})")),
        Err(_) => Err(anyhow::anyhow!("{shown}: cannot read the tokenizer (the file is malformed)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_template_inserts_the_default_system_prompt_and_generation_prompt() {
        let msgs = vec![Message { role: "user".into(), content: "Hi".into() }];
        let out = render_chat_template(CHATML, &msgs, true, None, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_work_in_templates() {
        let src = "{{ messages[0].content.strip() }}";
        let msgs = vec![Message { role: "user".into(), content: "  x  ".into() }];
        assert_eq!(render_chat_template(src, &msgs, false, None, None).unwrap(), "x");
    }
}
