---@meta
-- lab.train: supervised fine-tuning of an adapter with transformers' Trainer semantics
-- (token-mean loss over the accumulated step, grad-norm clipping, AdamW, warmup + schedule).

---@class lab.train
lab.train = {}

---@class StepRecord
---@field step integer
---@field epoch number
---@field loss number           Token-mean cross-entropy of the step.
---@field learning_rate number  The rate this step used.
---@field grad_norm number      Global L2 norm before clipping.
---@field tokens integer        Trained tokens in the step.
---@field seen_tokens integer   All tokens of the step's rows.
---@field seconds number

---@class SftOptions
---@field max_steps? integer                 Overrides num_train_epochs. Default none.
---@field num_train_epochs? number           Default 1.
---@field learning_rate? number              Default 5e-5.
---@field lr_scheduler_type? "linear"|"cosine"|"constant"|"constant_with_warmup"  As transformers: "constant" ignores warmup. Default "linear".
---@field warmup_steps? integer              Default none (warmup_ratio applies).
---@field warmup_ratio? number               Warmup = ceil(ratio * steps). Default 0.
---@field weight_decay? number               Decoupled (AdamW). Default 0.
---@field adam_beta1? number                 Default 0.9.
---@field adam_beta2? number                 Default 0.999.
---@field adam_epsilon? number               Default 1e-8.
---@field max_grad_norm? number              0 disables clipping. Default 1.0.
---@field per_device_train_batch_size? integer  Rows per micro-batch. Default 8.
---@field gradient_accumulation_steps? integer  Micro-batches per optimizer step. Default 1.
---@field max_length? integer                Rows are truncated to this many tokens. Default 1024.
---@field seed? integer                      Seed of LoRA dropout. Default 42.
---@field data_seed? integer                 Seed of the data order. Default: seed.
---@field shuffle? boolean                   false keeps file order. Default true.
---@field tokens_per_pass? integer          Most padded tokens (rows x the longest of them) in one forward and backward pass. A step's rows run in as few passes as this allows, shortest first (where that makes fewer passes than its micro-batches): the step's gradient is the same sum, and fuller passes run faster on a GPU. 0 means per_device_train_batch_size x the longest row, what a micro-batch could hold. Default 0.
---@field gradient_checkpointing? boolean    Keep only each layer's input and recompute the layer in the backward pass: about a third more compute, much less memory. Default false.
---@field loss_mask? "last_assistant"|"all_assistant"|"completion"|"marker_only"|"all"|fun(info: {ids: integer[], row: table, index: integer}): integer[][]  Which tokens are trained; a function returns 1-based inclusive {from, to} token spans. Default "last_assistant".
---@field marker? string                     The marker of loss_mask = "marker_only".
---@field skip_nonfinite_steps? boolean      Skip a step whose loss or gradient norm is not finite (the adapter unchanged, no record) instead of stopping with an error naming the step. Default false.
---@field on_step? fun(record: StepRecord)   Called after every optimizer step.
---@field save_steps? integer|integer[]      Checkpoints: every N steps, or at the listed steps. Default none.
---@field output_dir? string                 With save_steps: the adapter is saved to output_dir/checkpoint-STEP (PEFT's format).
---@field on_save? fun(adapter: Adapter, step: integer, record: StepRecord)  With save_steps: called with the adapter as it is after that step (sample or score with it; copy it with adapter:save). Under a decaying schedule (linear, cosine) this is not the adapter a separate run of that many steps would give: the learning rate so far followed the schedule of the whole run.

---@class SftLog: StepRecord[]
---@field rows integer
---@field rows_without_targets integer
---@field skipped_steps integer              Steps skipped under skip_nonfinite_steps.
---@field seconds number
---@field tokens_per_second number

--- Trains `adapter` (in place) on `data`; returns one record per step.
---@param model Model
---@param adapter Adapter
---@param data Dataset
---@param opts? SftOptions
---@return SftLog
function lab.train.sft(model, adapter, data, opts) end
