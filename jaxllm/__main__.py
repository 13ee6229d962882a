"""The main job: offline generation from the command line.

    python -m jaxllm "What is the capital of France?"            # default model: SmolLM2-135M-Instruct (GGUF)
    python -m jaxllm --model ./Llama-3.2-1B --prompts-file prompts.txt --max-tokens 128 --output out.jsonl

Prompts given on the command line or one per line in ``--prompts-file``; with a chat template (instruct models) each
prompt is sent as one user message unless ``--no-chat``. Prints each completion, or writes JSON lines to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxllm import LLM, SamplingParams


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxllm", description="Offline generation with jaxllm.")
    parser.add_argument("prompts", nargs="*", help="prompts to complete")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--model", default=None, help="local HF checkpoint dir or .gguf file (default: SmolLM2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--no-chat", action="store_true", help="send prompts as raw text, not as chat messages")
    parser.add_argument("--output", help="write one JSON object per prompt to this file")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        raise SystemExit("no prompts: give them on the command line or with --prompts-file")
    return prompts


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    prompts = read_prompts(args)
    llm = LLM(model=args.model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    tokenizer = llm.get_tokenizer()
    if not args.no_chat and getattr(tokenizer, "chat_template", None):
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    sink = open(args.output, "w") if args.output else None
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        if sink:
            sink.write(
                json.dumps({"prompt": prompt, "text": completion.text, "token_ids": completion.token_ids}) + "\n"
            )
        else:
            print(f"\n### {prompt}\n{completion.text}")
    if sink:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
