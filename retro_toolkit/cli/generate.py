"""`retro-run generate (--nemo | --checkpoint | --workdir) --prompt TEXT ...`: text from a
trained model, with a KV cache and retrieval."""

from __future__ import annotations

import argparse

NAME = "generate"
EPILOG = """\
The model comes from --nemo (a package written by the export stage; add --workdir for
live retrieval from a database built with the package's tokenizer), --checkpoint (a
<workdir>/checkpoints/<stage> folder or one of its iter_NNNNNNN folders) or --workdir
(its sft checkpoint, else pretrain). Decoding uses
a KV cache; Retro's chunks get neighbours from --context (all of them; with --chat the
top-1 goes in the prompt instead) or, with --live-retrieval, from the work directory's
index, queried with every completed chunk of prompt and answer.

examples:
  retro-run generate --workdir runs/smoke --chat --prompt "Which keyword defines a function?"
  retro-run generate --nemo runs/smoke/export/smoke.nemo --chat --prompt "What does pass do?"
  retro-run generate --checkpoint runs/smoke/checkpoints/pretrain --prompt "The with statement" \\
      --live-retrieval --max-new-tokens 128 --temperature 0.8 --top-p 0.9
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(NAME, help="generate text from a trained checkpoint (KV cache, retrieval)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    g.add_argument("--nemo", help="a .nemo package (retro-run RECIPE --stages export writes one)")
    g.add_argument("--checkpoint", help="checkpoints/<stage> or iter_NNNNNNN folder")
    g.add_argument("--workdir", help="work directory (tokenizer, recipe, database)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as an InstructRetro user turn")
    g.add_argument("--context", action="append", default=[], help="a retrieved passage (repeatable)")
    g.add_argument("--live-retrieval", action="store_true", help="query the work directory's index per chunk")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    return g


def run(args: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import before_megatron

    before_megatron()
    from retro_toolkit.collections.generate import SamplingParams
    from retro_toolkit.collections.generate.session import load_session

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=args.stop, seed=args.seed)
    session = load_session(args.checkpoint, args.workdir, args.nemo)
    outs = session.generate(args.prompt, params, chat=args.chat, contexts=args.context,
                            live_retrieval=args.live_retrieval)
    for prompt, out in zip(args.prompt, outs):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(out.text)
    return 0
