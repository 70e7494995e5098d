"""The reference stack on a GPU: transformers + PEFT LoRA training and transformers `generate`,
with random weights of a given config (no downloads). Run by examples/bench_gpu.lua in the same
call as loralab; prints one JSON object.

  python3 scripts/bench/reference_gpu.py --config scripts/bench/configs/qwen2.5-0.5b.json \
      --seq 256 --batch 4 --grad-accum 4 --steps 3 --prompts 32 --n 10 --max-tokens 128
  python3 scripts/bench/reference_gpu.py --config CONFIG --seq 1024 --grad-accum 1 --skip sample --profile
"""
import argparse
import json
import time

import torch


def attention_of(cfg):
    """transformers refuses SDPA for Gemma 2 (it cannot cap the scores); eager is its training path."""
    return "eager" if cfg.model_type == "gemma2" else "sdpa"


def model_of(config_path, gradient_checkpointing=False):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config_path)
    attn = attention_of(cfg)
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation=attn)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, cfg


def bench_train(args, gradient_checkpointing):
    from peft import LoraConfig, get_peft_model

    model, cfg = model_of(args.config, gradient_checkpointing)
    lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.lora_dropout,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    g = torch.Generator(device="cuda").manual_seed(0)

    def step():
        for _ in range(args.grad_accum):
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda", generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    step()
    torch.cuda.synchronize()
    if args.profile:
        return profile(step)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tokens = args.steps * args.grad_accum * args.batch * args.seq
    out = {"tokens_per_second": tokens / secs, "seconds_per_step": secs / args.steps,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt
    torch.cuda.empty_cache()
    return out


def profile(step):
    """GPU time per kernel of one optimizer step, summed by name, as gpu_profile.sh prints it."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"{sum(r[2] for r in rows)} kernels, {total / 1e3:.1f} ms of GPU time")
    for name, us, n in rows[:30]:
        print(f"{100 * us / total:5.1f}%  {us / 1e3:8.2f} ms  {n:5d}x  {name[:110]}")
    return {"profiled": True}


def bench_sample(args):
    model, cfg = model_of(args.config)
    model.eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.prompts, args.prompt_len), device="cuda", generator=g)
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], max_new_tokens=4, do_sample=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                             min_new_tokens=args.max_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             num_return_sequences=args.n, pad_token_id=0)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"generated_tokens_per_second": generated / secs, "seconds": secs,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--skip", default="")
    p.add_argument("--profile", action="store_true", help="print GPU time per kernel of one training step")
    args = p.parse_args()
    import transformers, peft
    attn = attention_of(transformers.AutoConfig.from_pretrained(args.config))
    res = {"stack": f"transformers {transformers.__version__} + peft {peft.__version__}, torch {torch.__version__}, {attn}, bf16",
           "gpu": torch.cuda.get_device_name(0)}
    if "train" not in args.skip:
        res["train"] = bench_train(args, False)
        if not args.profile:
            res["train_checkpointing"] = bench_train(args, True)
    if "sample" not in args.skip:
        res["sample"] = bench_sample(args)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
