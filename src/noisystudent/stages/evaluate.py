"""Top-1/top-5 of model i on the test set -> iter<i>/eval.json."""

from __future__ import annotations

from typing import Any

from ..artifacts import load_model, read_eval
from ..config import Config
from ..engine import evaluate
from ..inputs import Data
from ..rundir import RunDir, write_json
from ..runtime import Runtime


def evaluate_stage(cfg: Config, run: RunDir, data: Data, i: int, rt: Runtime) -> dict[str, Any]:
    paths, name = run.it(i), run.it(i).stage("evaluate")
    reads = data.read("test")
    if run.stage_done(name, reads):
        return read_eval(paths)
    model, _ = load_model(run, i, "model", cfg.models[i], data.classes)
    run.mark(name, "running")
    res = evaluate(model, data.test, data.size, cfg.eval_batch_size, rt, cfg.data.num_workers)
    write_json(paths.eval, res)
    run.log(stage=name, event="eval", top1=res["top1"], top5=res["top5"])
    run.mark(name, "done", inputs=[paths.model], outputs=[paths.eval], data=reads)
    return res
