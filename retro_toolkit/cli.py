"""retro-run: run, check and explore Retro recipes.

    retro-run RECIPE [key=value ...] [--stages a,b] [--force STAGE] [--dry-run] [--detach]
    retro-run status WORKDIR [--wait]
    retro-run validate RECIPE [key=value ...]
    retro-run show RECIPE [key=value ...]
    retro-run ls
    retro-run inspect WORKDIR {stats | chunk N | neighbours SPLIT N}
    retro-run show-model yaml/model/retro_48b.yaml
    retro-run generate --workdir runs/smoke --chat --prompt "What does pass do?"
    retro-run generate --nemo runs/smoke/export/smoke.nemo --prompt "The with statement"
    retro-run export-safetensors runs/smoke/export/smoke.nemo --out smoke-safetensors/
    retro-run import-megatron CHECKPOINT_DIR --tokenizer tokenizer.model --out model.nemo
"""

from __future__ import annotations

import argparse
import os
import sys

from retro_toolkit.core.signals import Interrupted
from retro_toolkit.errors import RetroError

EPILOG = """\
stages, in pipeline order:
  tokenizer       train (or load) the decoder's SentencePiece tokenizer
  prepare_corpus  tokenize the corpus into train/valid/test token streams
  build_db        chunk DB, BERT embeddings, faiss index, neighbours
  pretrain        pretrain Retro (or its GPT twin)
  eval_ppl        validation/test perplexity
  sft             instruction tuning (InstructRetro)
  eval_qa         zero-shot QA: EM/F1
  export          package the model as export/<name>.nemo

overrides:
  a.b=value       set one key (YAML value: 3, 0.5, null, [1,2], {k: v})
  group=name      swap a yaml/<group>/<name>.yaml piece, e.g. executor=slurm, model=retro_tiny

examples:
  retro-run recipes/smoke.yaml
  retro-run recipes/smoke.yaml tokenizer.vocab_size=2000 workdir=/tmp/smoke
  retro-run recipes/smoke.yaml executor=torchrun executor.nproc_per_node=2
  retro-run recipes/smoke.yaml executor=slurm executor.account=abc --dry-run
  retro-run recipes/instructretro_48b.yaml executor.account=abc executor.partition=gpu --detach
  retro-run status runs/instructretro_48b --wait
  retro-run show recipes/smoke.yaml model=retro_tiny

A finished stage is skipped on the next run unless its settings (or an upstream
stage's) changed. SIGTERM, SIGINT or SIGHUP stop every process of the run (training
saves a checkpoint first); the same command continues. Exit codes: 0 ok, 1 a stage
failed, 2 bad input, 75 a training stage stopped at its exit_duration_minutes,
128+N stopped by signal N (130 SIGINT, 143 SIGTERM).
"""

COMMANDS = ("run", "status", "validate", "show", "ls", "inspect", "show-model", "generate", "export-safetensors",
            "import-megatron")

GENERATE_EPILOG = """\
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


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(
        prog="retro-run",
        description="Retro and InstructRetro end to end, from one YAML recipe.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    def recipe_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="recipe file (recipes/smoke.yaml) or bundled recipe name (smoke)")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides or group swaps")

    r = sub.add_parser("run", help="run a recipe's stages (the default command)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_args(r)
    r.add_argument("--stages", help="comma-separated stages to run, plus any unfinished stage they need")
    r.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="rerun STAGE even if it is up to date (repeatable)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan (and sbatch scripts for Slurm); run and write nothing")
    r.add_argument("--detach", action="store_true",
                   help="Slurm: queue every stage as a job chained with afterok, record the job ids in "
                   "WORKDIR/slurm_jobs.json and return; follow with retro-run status WORKDIR")

    st = sub.add_parser("status", help="stage by stage: Slurm job state, manifest, log of a work directory",
                        description="Reads WORKDIR alone: recipe.resolved.yaml for the stages, slurm_jobs.json "
                        "for the jobs a --detach run queued (states from sacct and squeue), stages/*.json "
                        "for what finished and logs/ for each stage's log.")
    st.add_argument("workdir")
    st.add_argument("--wait", action="store_true",
                    help="poll until no job is queued or running; exit 1 unless every job ended COMPLETED")
    st.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="with --wait: give up after")

    v = sub.add_parser("validate", help="check a recipe and its input files; exit 0 or 2")
    recipe_args(v)
    s = sub.add_parser("show", help="print the resolved recipe as YAML")
    recipe_args(s)
    ls = sub.add_parser("ls", help="list bundled recipes and yaml pieces")
    i = sub.add_parser("inspect", help="look inside a work directory's retrieval database",
                       description="stats: counts, index type, sizes; chunk N: a database chunk's text; "
                       "neighbours SPLIT N: a query chunk of SPLIT and its neighbours with continuations.")
    i.add_argument("workdir")
    i.add_argument("what", nargs="+", metavar="stats | chunk N | neighbours SPLIT N")
    sm = sub.add_parser("show-model", help="parameter count of a model piece, per part (no weights allocated)")
    sm.add_argument("model", help="a yaml/model/*.yaml file or piece name (retro_843m)")
    sm.add_argument("--vocab-size", type=int, default=None,
                    help="vocabulary for pieces that take it from the tokenizer (retro_tiny)")
    g = sub.add_parser("generate", help="generate text from a trained checkpoint (KV cache, retrieval)",
                       epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    es = sub.add_parser("export-safetensors", help="a .nemo package as safetensors + config.json + tokenizer",
                        description="Writes OUT/model.safetensors (unsharded tensors, retro_toolkit's parameter "
                        "names), OUT/config.json (model settings, tokenizer, retrieval settings, every tensor's "
                        "shape) and OUT/tokenizer.model, for other inference engines. Load it back with "
                        "retro_toolkit.checkpoint.safetensors_io.load_safetensors.")
    es.add_argument("package", help="a .nemo file")
    es.add_argument("--out", required=True, help="output folder (replaced atomically)")
    from retro_toolkit.checkpoint.megatron_legacy import IMPORT_DESCRIPTION

    im = sub.add_parser("import-megatron", help="a Megatron-LM Retro checkpoint (legacy or torch_dist) as a .nemo package",
                        description=IMPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    im.add_argument("checkpoint", help="the folder holding latest_checkpointed_iteration.txt")
    im.add_argument("--tokenizer", required=True, help="the model's SentencePiece .model file")
    im.add_argument("--out", required=True, help="the .nemo file to write")
    im.add_argument("--trust-checkpoint", action="store_true",
                    help="allow full pickle loading (runs code from the file); only for checkpoints you trust")
    im.add_argument("--retro-args", metavar="ARGS_JSON",
                    help="the Retro workdir's args.json the run read its chunk length from (legacy training args "
                         "do not record it; without this file it is taken as 64, Retro's, and said so)")
    return p, {"run": r, "status": st, "validate": v, "show": s, "ls": ls, "inspect": i, "show-model": sm, "generate": g,
               "export-safetensors": es, "import-megatron": im}


def _split_stages(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _ls() -> int:
    from retro_toolkit.recipe import paths

    recipes = paths.builtin_root("recipes")
    print(f"recipes ({recipes}):")
    for f in sorted(recipes.glob("*.yaml")):
        print(f"  {f.stem:<28} {paths.describe(f)}")
    root = paths.builtin_root("yaml")
    print(f"\nyaml pieces ({root}), used as group=name:")
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        print(f"  {group.name}:")
        for f in sorted(group.glob("*.yaml")):
            print(f"    {f.stem:<26} {paths.describe(f)}")
    return 0


def _inspect(workdir: str, what: list[str]) -> int:
    from retro_toolkit.errors import UserError

    usage = "use: inspect WORKDIR stats | chunk N | neighbours SPLIT N"
    kind = what[0]
    words = {"stats": 1, "chunk": 2, "neighbours": 3, "neighbors": 3}
    if words.get(kind) != len(what):
        raise UserError(f"inspect: '{' '.join(what)}' is not understood; {usage}.")
    try:
        n = int(what[-1]) if kind != "stats" else 0
    except ValueError:
        raise UserError(f"inspect: N must be a number, not '{what[-1]}'; {usage}.") from None
    from retro_toolkit.collections.retrieval.inspect_db import Inspector

    ins = Inspector(workdir)
    print(ins.stats() if kind == "stats" else ins.chunk(n) if kind == "chunk" else ins.neighbours(what[1], n))
    return 0


def _show_model(model: str, vocab_size: int | None) -> int:
    from pathlib import Path

    from retro_toolkit.errors import UserError
    from retro_toolkit.recipe import paths

    path = Path(model)
    if not path.is_file():
        path = paths.builtin_root("yaml") / "model" / f"{model}.yaml"
    if not path.is_file():
        raise UserError(f"show-model: {model} is neither a file nor a piece in yaml/model/ (retro-run ls lists them).")
    import warnings

    with warnings.catch_warnings():  # megatron-core warns about apex and TE it does not need here
        warnings.simplefilter("ignore")
        from retro_toolkit.collections.retro.describe import describe_model

        text = describe_model(str(path), vocab_size=vocab_size)
    print(text)
    return 0


def _generate(a: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import quiet_warnings

    quiet_warnings()
    from retro_toolkit.collections.generate import SamplingParams
    from retro_toolkit.collections.generate.session import load_session

    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, stop=a.stop, seed=a.seed)
    session = load_session(a.checkpoint, a.workdir, a.nemo)
    outs = session.generate(a.prompt, params, chat=a.chat, contexts=a.context, live_retrieval=a.live_retrieval)
    for prompt, out in zip(a.prompt, outs):
        if len(a.prompt) > 1:
            print(f"### {prompt}")
        print(out.text)
    return 0


def _export_safetensors(package: str, out: str) -> int:
    from retro_toolkit.core.cpu import quiet_warnings

    quiet_warnings()
    from retro_toolkit.checkpoint.safetensors_io import export_safetensors

    print(f"wrote {export_safetensors(package, out)}")
    return 0


def _import_megatron(a: argparse.Namespace) -> int:
    from retro_toolkit.core.cpu import quiet_warnings

    quiet_warnings()
    from retro_toolkit.checkpoint.megatron_legacy import import_checkpoint

    out = import_checkpoint(a.checkpoint, a.tokenizer, a.out, trust=a.trust_checkpoint, retro_args=a.retro_args)
    print(f"wrote {out}")
    return 0


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["run", *argv]
    main_parser, commands = _parser()
    if not argv or argv[0] not in commands:
        main_parser.parse_args(argv)  # --help, or a usage error
        main_parser.print_help()
        return 2
    # Intermixed: `RECIPE --dry-run key=value` works as well as `RECIPE key=value --dry-run`.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    if args.command == "ls":
        return _ls()
    if args.command == "status":
        from retro_toolkit.runner.status import status

        return status(args.workdir, wait=args.wait, timeout_s=args.timeout)
    if args.command == "inspect":
        return _inspect(args.workdir, args.what)
    if args.command == "show-model":
        return _show_model(args.model, args.vocab_size)
    if args.command == "generate":
        return _generate(args)
    if args.command == "export-safetensors":
        return _export_safetensors(args.package, args.out)
    if args.command == "import-megatron":
        return _import_megatron(args)

    from retro_toolkit.recipe import load_recipe, to_yaml

    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "show":
        sys.stdout.write(to_yaml(recipe))
        return 0
    if args.command == "validate":
        from retro_toolkit.runner.plan import check_stages
        from retro_toolkit.runner.preflight import check_inputs, check_launch

        check_stages(recipe)
        check_inputs(recipe)
        check_launch(recipe)
        print(f"{args.recipe}: ok ({', '.join(recipe.stages)}; executor {recipe.executor.type})")
        return 0
    from retro_toolkit.runner.run import execute

    return execute(recipe, only=_split_stages(args.stages), force=args.force, dry=args.dry_run, detach=args.detach)


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except RetroError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"retro-run: {e}; every process of the run has ended. Rerun the same command to continue "
              "(finished stages are kept, training resumes from its last checkpoint).", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`retro-run ls | head`): stop quietly, as other Unix tools do,
        # and keep Python from failing again while it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
