"""Zero-shot task accuracy through lm-evaluation-harness (the ``[eval]`` extra): find the tasks, run them on a
rankserve model, and collect one row of metrics and standard errors per task.

Local tasks (a YAML file plus JSON/JSONL/CSV data in an include folder) run fully offline; their relative
``data_files`` resolve against the YAML's folder (lm-eval itself resolves them against the working directory,
so a task folder would work from one place only). A task whose data lives on the Hugging Face hub fails with
one line when the hub cannot be reached.
"""

from __future__ import annotations

import copy
import logging
import os

from rankserve.errors import InputError

log = logging.getLogger(__name__)

INSTALL = "pip install 'rankserve[eval]'"
# `datasets` builders that read local files; any other dataset_path is a hub dataset
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


class TaskError(InputError):
    """A task that cannot be found or loaded, with what to do about it."""


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError(f"task accuracy needs lm-evaluation-harness; install it with: {INSTALL}") from None


def task_manager(names: list[str], include_path: str | None = None):
    """An lm-eval TaskManager that knows ``names``: the include folder alone when it has them all."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not os.path.isdir(include_path):
            raise TaskError(f"--include-path {include_path}: no such directory")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in local.task_index for n in names):
            return local
    # Indexing lm-eval's own ~15k task configs takes ~45 s on a loaded 2-core machine: only when needed.
    tm = TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in tm.task_index]
    if unknown:
        where = f" or in {include_path}" if include_path else "; pass --include-path DIR for a local task"
        raise TaskError(f"unknown task {', '.join(unknown)}: not an lm-eval task{where}")
    return tm


def _local_data_files(data_files, folder: str):
    """``data_files`` (a path, a list, or a split -> path(s) dict) with relative paths made absolute."""
    if isinstance(data_files, str):
        return data_files if os.path.isabs(data_files) else os.path.join(folder, data_files)
    if isinstance(data_files, list):
        return [_local_data_files(f, folder) for f in data_files]
    if isinstance(data_files, dict):
        return {k: _local_data_files(v, folder) for k, v in data_files.items()}
    return data_files


def task_spec(tm, name: str):
    """What to pass to ``TaskManager.load`` for ``name``: the name, or for a local task whose data files are
    relative, its full config with those paths resolved against the YAML's folder."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader: `include:` and `!function`

    entry = tm.task_index[name]
    if entry.kind != Kind.TASK or entry.yaml_path is None:
        return name
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if cfg.get("dataset_path") not in LOCAL_BUILDERS or files is None:
        return name
    cfg = copy.deepcopy(cfg)
    cfg["dataset_kwargs"]["data_files"] = _local_data_files(files, str(entry.yaml_path.parent))
    return cfg


def load_tasks(names: list[str], include_path: str | None = None) -> list:
    """The built lm-eval tasks ``names`` (their data loaded); a task whose data cannot be had fails with one
    line."""
    tm = task_manager(names, include_path)
    built = {}
    for name in names:
        spec = task_spec(tm, name)
        try:
            built.update(tm.load([spec])["tasks"])
        except Exception as e:  # hub errors come as many types (ConnectionError, OSError, hub exceptions)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(spec, dict) or isinstance(e, FileNotFoundError):  # local data: no hub involved
                raise TaskError(f"task {name}: cannot load its data ({reason})") from None
            raise TaskError(
                f"task {name}: its data must be downloaded from the Hugging Face hub and that failed "
                f"({reason}); run where the hub is reachable, or pass a local task with --include-path DIR"
            ) from None
    return list(built.values())


def evaluate_tasks(lm, tasks: list, limit: int | None = None) -> list[dict]:
    """Run ``tasks`` (from :func:`load_tasks`) zero-shot on ``lm``, an lm-eval LM such as
    :class:`~rankserve.lm_eval_model.RankserveLM`.

    One dict per task: ``task``, ``metrics`` {name: value}, ``stderr`` {name: value or None}, ``samples``.
    """
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, log_samples=False, bootstrap_iters=1000, num_fewshot=None
    )
    rows = []
    for task, res in out["results"].items():
        metrics, stderr = {}, {}
        for key, value in res.items():
            metric, _, filt = key.partition(",")
            if not filt or metric == "alias" or metric.endswith("_stderr"):
                continue
            metrics[metric] = value
            err = res.get(f"{metric}_stderr,{filt}")
            stderr[metric] = err if isinstance(err, (int, float)) else None  # "N/A" when not computable
        n = out.get("n-samples", {}).get(task, {})
        rows.append({"task": task, "metrics": metrics, "stderr": stderr, "samples": n.get("effective")})
    return rows
