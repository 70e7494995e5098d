---@meta
-- lab.adapter: LoRA adapters, as PEFT defines them: y = W x + b + scale * B(A(dropout(x))).

---@class lab.adapter
lab.adapter = {}

---@class LoraOptions
---@field r? integer                Rank. Default 8.
---@field lora_alpha? number        Default 8.
---@field lora_dropout? number      Dropout on the adapter's input while training, in [0, 1). Default 0.
---@field target_modules? string[]  Among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or "all-linear". Default {"q_proj", "v_proj"}.
---@field use_rslora? boolean       scale = lora_alpha / sqrt(r) instead of lora_alpha / r. Default false.
---@field seed? integer             Seed of A's Kaiming-uniform initialisation (B starts at zero). Default 0.

--- A fresh adapter for `model`.
---@param model Model
---@param opts? LoraOptions
---@return Adapter
function lab.adapter.new(model, opts) end

--- Loads a PEFT adapter folder (adapter_config.json + adapter_model.safetensors); strict: stray or
--- unpaired tensors are an error that names them.
---@param model Model
---@param dir string
---@return Adapter
function lab.adapter.load(model, dir) end

---@class Adapter
local Adapter = {}

--- Writes PEFT's format into `dir` (loadable by peft.PeftModel.from_pretrained).
---@param dir string
function Adapter:save(dir) end

---@return integer
function Adapter:num_parameters() end
