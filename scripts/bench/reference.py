"""The reference stack for loralab's benchmarks: transformers `generate` and PEFT LoRA training.

Run by examples/bench_sample.lua and examples/bench_train.lua (same machine, same run, same
model, prompts, lengths, dtype and threads); prints one JSON object on stdout.

  python scripts/bench/reference.py sample --gguf FILE --prompts prompts.json --max-tokens 64
  python scripts/bench/reference.py train --gguf FILE --rows rows.json --batch 4 --steps 5

Needs torch, transformers, peft and gguf (pip install torch transformers peft gguf).
"""
import argparse
import json
import os
import resource
import time


def load(gguf, dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=getattr(torch, dtype))
    return tok, model


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_sample(args):
    import torch

    tok, model = load(args.gguf, args.dtype)
    model.eval()
    prompts = json.load(open(args.prompts))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    n_prompt = int(batch["attention_mask"].sum())
    torch.manual_seed(0)
    with torch.inference_mode():
        # Prefill alone: one new token.
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                             do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id)
        total = time.perf_counter() - t0
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    print(json.dumps({
        "stack": f"transformers {__import__('transformers').__version__} generate, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "prompt_tokens": n_prompt, "generated_tokens": generated,
        "prefill_seconds": prefill, "seconds": total,
        "generated_tokens_per_second": generated / max(total - prefill, 1e-9),
        "prefill_tokens_per_second": n_prompt / prefill, "peak_rss_mb": peak_rss_mb(),
    }))


def bench_train(args):
    import torch
    from peft import LoraConfig, get_peft_model

    tok, model = load(args.gguf, args.dtype)
    rows = json.load(open(args.rows))
    cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rows]

    def step(k):
        batch = [ids[(k * args.batch + i) % len(ids)] for i in range(args.batch)]
        t = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [0] * (t - len(x)) for x in batch])
        labels = torch.tensor([x + [-100] * (t - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        return sum(len(x) for x in batch)

    step(0)  # warm-up
    t0 = time.perf_counter()
    tokens = sum(step(k + 1) for k in range(args.steps))
    total = time.perf_counter() - t0
    print(json.dumps({
        "stack": f"transformers {__import__('transformers').__version__} + peft {__import__('peft').__version__}, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "steps": args.steps, "tokens": tokens, "seconds": total,
        "tokens_per_second": tokens / total, "seconds_per_step": total / args.steps, "peak_rss_mb": peak_rss_mb(),
    }))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["sample", "train"])
    p.add_argument("--gguf", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rows")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_sample(args) if args.what == "sample" else bench_train(args)


if __name__ == "__main__":
    main()
