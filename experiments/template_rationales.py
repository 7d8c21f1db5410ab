"""
Template rationales for SuperGLUE tasks, made locally without a teacher: a stand-in that lets
experiments/superglue.py run end to end offline (its CPU demo). NOT a teacher: each rationale only restates
the gold label in words (label-conditioned, as the paper's teacher prompt is, App. E.3, but with nothing to
explain), so numbers trained on them say nothing about DHRD.

    python experiments/template_rationales.py --tasks=cb,copa --data_dir=data/superglue --out=demo.jsonl

Writes one line per labelled training example in prepare.py's rationale format ({"task", "split", "idx",
"rationale", "label"}), numbered as prepare.py numbers them (it reads the tasks with prepare.py's own loader:
MultiRC one example per answer, COPA one per alternative). The SuperGLUE files are downloaded when missing.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import prepare  # noqa: E402
from plumbing import ConfigError, atomic_write, parse_flags  # noqa: E402

SAYS = {"Yes": "the passage supports the candidate answer to the question",
        "No": "the passage does not support the candidate answer to the question"}


def rationales(task, data_dir):
    """-> the rationale lines of the task's labelled training examples."""
    train = prepare.load_superglue(task, data_dir, "paper")["splits"]["train"]
    lines = []
    for i, e in enumerate(train):
        text = f"Read against the question, {SAYS[e['label']]}."
        lines.append(dict(task=task, split="train", idx=i, rationale=text, label=e["label"]))
    return lines


DEFAULTS = dict(tasks="cb,copa", data_dir="data/superglue", out="rationales.jsonl")


def main(argv):
    opts = {**DEFAULTS, **parse_flags(argv, DEFAULTS)}
    tasks = opts["tasks"].split(",")
    for task in tasks:
        if task not in prepare.SUPERGLUE:
            raise ConfigError(f"--tasks={opts['tasks']}: {task!r} is not one of "
                              f"{', '.join(prepare.SUPERGLUE)}")
    lines = [line for task in tasks for line in rationales(task, opts["data_dir"])]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    atomic_write(Path(opts["out"]), lambda tmp: tmp.write_text(text))
    print(f"template_rationales.py: {len(lines)} rationales ({', '.join(tasks)}) -> {opts['out']}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:  # ConfigError, PrepareError
        print(f"template_rationales.py: error: {e}", file=sys.stderr)
        sys.exit(1)
