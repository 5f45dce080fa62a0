"""Glue: the pipeline's robustness stage and the `noisystudent robustness` command.

Model i's results go to `<run_dir>/iter<i>/robustness/results.json` (plus its clean
predictions in `predictions.safetensors`, used when it is another model's reference). The
cached corrupted/perturbed arrays live in `<data.cache_dir or run_dir/cache>/robustness/`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, RobustnessConfig
from ..data import decode_to_array, scan_class_folders
from ..engine import resolve_device
from ..errors import UserError
from ..rundir import RunDir, load_tensors, read_json, save_tensors, write_json
from . import corruptions as C
from . import metrics as M
from .cache import SuiteCache, subset_indices
from .evaluate import SuiteOptions, _guarded, evaluate_hard_set, evaluate_suite

RESULTS = "results.json"
PREDICTIONS = "predictions.safetensors"


def _validate(rc: RobustnessConfig) -> None:
    if rc.subset is not None and rc.subset < 1:
        raise UserError(f"robustness.subset (--subset) must be >= 1, got {rc.subset}")
    if rc.perturbation_subset is not None and rc.perturbation_subset < 1:
        raise UserError(
            f"robustness.perturbation_subset must be >= 1, got {rc.perturbation_subset}"
        )
    if rc.pgd_steps < 1:
        raise UserError(f"robustness.pgd_steps must be >= 1, got {rc.pgd_steps}")
    if any(e < 0 for e in rc.fgsm_eps) or rc.pgd_eps < 0:
        raise UserError("robustness.fgsm_eps and robustness.pgd_eps must be >= 0 (units of 1/255)")
    C.choose_table(8, rc.table)
    spec = str(rc.reference).strip()
    if spec.lower() != "none" and not spec.isdigit():
        p = Path(spec)
        if not (p.is_file() or (p / RESULTS).is_file()):
            raise UserError(
                f"robustness.reference (--reference) '{spec}' is neither an iteration, 'none', "
                "nor an existing results.json"
            )
    if rc.hard_dir is not None and not Path(rc.hard_dir).is_dir():
        raise UserError(f"robustness.hard_dir '{rc.hard_dir}' is not a folder of class folders")


def suite_options(cfg: Config) -> SuiteOptions:
    rc = cfg.robustness
    return SuiteOptions(
        corruptions=rc.corruptions,
        perturbations=rc.perturbations,
        adversarial=rc.adversarial,
        fgsm_eps=list(rc.fgsm_eps),
        pgd_eps=rc.pgd_eps,
        pgd_steps=rc.pgd_steps,
        perturbation_subset=rc.perturbation_subset,
        batch_size=cfg.eval_batch_size,
        seed=rc.seed,
        progress=cfg.progress,
    )


def open_cache(cfg: Config, run: RunDir, data: Any) -> SuiteCache:
    """The test set (subset) as uint8 arrays at the evaluation resolution, and its cache."""
    rc = cfg.robustness
    test = data.test
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.root / "cache"
    if test.array is None or test.array.shape[1] != data.size:
        test = decode_to_array(test, data.size, root, "test", skip_bad=False, progress=cfg.progress)
    idx = subset_indices(len(test), rc.subset, rc.seed)
    images = np.ascontiguousarray(test.array[idx])
    table = C.choose_table(data.size, rc.table)
    return SuiteCache(
        root / "robustness", images, test.labels[idx], table, rc.seed, rc.frost_dir, cfg.progress
    )


def _options_record(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg.robustness)
    d.pop("enabled", None)
    return d


def _load_reference(path: Path) -> tuple[dict[str, Any], np.ndarray | None]:
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise UserError(
            f"reference results '{path}' not found; give robustness.reference an iteration, a "
            "results.json path, or none"
        )
    ref = read_json(path)
    if not isinstance(ref, dict) or "meta" not in ref:
        raise UserError(f"'{path}' is not a robustness results.json (no 'meta')")
    pp = path.parent / PREDICTIONS
    pred = load_tensors(pp)["pred"].numpy() if pp.is_file() else None
    return ref, pred


def robustness_stage(cfg: Config, run: RunDir, data: Any, i: int) -> dict[str, Any]:
    """Evaluate model i on the robustness suite -> iter<i>/robustness/results.json.

    Skipped when results with the same options exist. The reference (default: iteration 0) is
    evaluated first when its results are missing; model i == reference gets the reference's
    own row (normalised scores 100, filtered-hard accuracy 0 by construction)."""
    from ..stages import load_model  # stages imports the whole training stack

    rc = cfg.robustness
    _validate(rc)
    name = f"iter{i}/robustness"
    out = run.iter_dir(i) / "robustness"
    options = _options_record(cfg)
    if run.stage_done(name) and (out / RESULTS).is_file():
        old = read_json(out / RESULTS)
        if old.get("options") == options:
            return old

    spec = str(rc.reference).strip()
    ref, ref_pred, ref_where, ref_info, self_ref = None, None, None, None, False
    if spec.lower() != "none":
        if spec.isdigit():
            r = int(spec)
            if not 0 <= r < len(cfg.models):
                raise UserError(
                    f"robustness.reference {r} is outside models[0..{len(cfg.models) - 1}]"
                )
            if r == i:
                self_ref = True
                ref_info = {"iteration": r, "model": cfg.models[r], "self": True}
            else:
                robustness_stage(cfg, run, data, r)
                ref_where = run.iter_dir(r) / "robustness" / RESULTS
                ref, ref_pred = _load_reference(ref_where)
                ref_info = {"iteration": r, "model": cfg.models[r], "results": str(ref_where)}
        else:
            ref_where = Path(spec)
            ref, ref_pred = _load_reference(ref_where)
            ref_info = {"results": str(ref_where), "model": ref.get("model")}

    model, meta = load_model(run, i, role="model")
    device = resolve_device(cfg.device)
    cache = open_cache(cfg, run, data)
    ref_label = "none" if ref_info is None else "self" if self_ref else ref_info.get("iteration")
    print(
        f"[iter {i}] robustness of {meta['name']} on {cache.meta['n']} test images "
        f"(table {cache.table}, seed {rc.seed}, reference {ref_label or ref_where})"
    )
    run.mark(name, "running", inputs=[run.model_path(i)])
    t0 = time.time()
    res, pred = evaluate_suite(
        model, cache, suite_options(cfg), device, ref, ref_pred, str(ref_where)
    )
    if self_ref:
        _fill_self_reference(res, pred, cache.labels)
    if rc.hard_dir:
        res["hard_set"] = hard_set_results(model, meta, rc.hard_dir, data.size, device, cfg)
    res = {
        "model": meta["name"],
        "iteration": i,
        "checkpoint": str(run.model_path(i)),
        "image_size": data.size,
        "subset": rc.subset,
        "reference": ref_info,
        "options": options,
        **res,
        "total_wall_s": round(time.time() - t0, 2),
    }
    save_tensors(
        out / PREDICTIONS,
        {"pred": torch.from_numpy(pred), "labels": torch.from_numpy(cache.labels)},
    )
    write_json(out / RESULTS, res)
    run.mark(name, "done", outputs=[out / RESULTS, out / PREDICTIONS])
    run.log(
        stage=name,
        event="robustness",
        clean_top1=res["clean_top1"],
        mce=res["mce"],
        mfr=res["mfr"],
        unnormalized_ce=res["unnormalized_ce"],
    )
    return res


def _fill_self_reference(res: dict[str, Any], pred: np.ndarray, labels: np.ndarray) -> None:
    """The reference's own row: every normalised score 100, filtered-hard accuracy 0."""
    if res.get("corruption"):
        err = res["corruption"]
        res["ce"] = _guarded(res, M.corruption_errors, err, err)
        res["mce"] = None if res["ce"] is None else float(np.mean(list(res["ce"].values())))
        clean_err = 100.0 - res["clean_top1"]
        res["relative_mce"] = _guarded(res, M.relative_mce, err, clean_err, err, clean_err)
    if res.get("flip"):
        fr = _guarded(res, M.flip_rates, res["flip"], res["flip"])
        res["flip_rate"] = fr
        res["mfr"] = None if fr is None else float(np.mean(list(fr.values())))
    res["filtered_hard_acc"], res["filtered_hard_n"] = M.filtered_hard_accuracy(pred, labels, pred)
    res["reference_is_self"] = True


def hard_set_results(
    model: torch.nn.Module, meta: dict, hard_dir: str, size: int, device, cfg: Config
) -> dict[str, Any]:
    """Accuracy on a user-supplied class-folder set of hard images; its classes must be a
    subset of the model's, and the argmax is taken over those classes only."""
    hard = scan_class_folders(hard_dir, "hard")
    classes = meta["classes"]
    unknown = [c for c in hard.classes if c not in classes]
    if unknown:
        raise UserError(
            f"robustness.hard_dir '{hard_dir}' has class folders the model does not know: "
            f"{unknown[:5]}; its folders must be a subset of {classes[:10]}"
        )
    hard = decode_to_array(hard, size, None, "hard", skip_bad=False, progress=cfg.progress)
    class_idx = [classes.index(c) for c in hard.classes]
    labels = np.asarray([class_idx[k] for k in hard.labels], dtype=np.int64)
    out = evaluate_hard_set(model, hard.array, labels, class_idx, device, cfg.eval_batch_size)
    out["dir"] = str(hard_dir)
    return out


# ---------------------------------------------------------------------------------------------
# table
def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """Paper-style Markdown table, one row per (label, results)."""
    eps = []
    for _, r in rows:
        if r.get("adversarial"):
            eps = list(r["adversarial"]["fgsm"])
            break
    pgd_key = next(
        (
            k
            for _, r in rows
            if r.get("adversarial")
            for k in r["adversarial"]
            if k.startswith("pgd")
        ),
        None,
    )
    head = ["model", "clean top-1", "corrupted top-1", "mCE (vs ref)", "uCE", "rel. mCE"]
    head += ["mean FP", "mFR (vs ref)", "mT5D (u)"]
    head += [f"FGSM {e}" for e in eps]
    if pgd_key:
        steps, e = pgd_key[3:].split("_")
        head.append(f"PGD-{steps} @{e}")
    head += ["filtered-hard", "ECE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        cells = [
            label,
            _f(r.get("clean_top1")),
            _f(r.get("mean_corrupted_top1")),
            _f(r.get("mce"), 1),
            _f(r.get("unnormalized_ce")),
            _f(r.get("relative_mce"), 1),
            _f(r.get("mean_flip_prob"), 4),
            _f(r.get("mfr"), 1),
            _f(r.get("top5_distance"), 3),
        ]
        adv = r.get("adversarial") or {}
        cells += [_f((adv.get("fgsm") or {}).get(e)) for e in eps]
        if pgd_key:
            cells.append(_f(adv.get(pgd_key)))
        fh = r.get("filtered_hard_acc")
        cells.append(_f(fh) + (f" (n={r['filtered_hard_n']})" if fh is not None else ""))
        cells.append(_f(r.get("ece")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_line(r: dict[str, Any]) -> str:
    """A short summary of one results dict for the pipeline log."""
    adv = r.get("adversarial") or {}
    pgd = next((v for k, v in adv.items() if k.startswith("pgd")), None)
    return (
        f"corrupted top-1 {_f(r.get('mean_corrupted_top1'))}%  mCE {_f(r.get('mce'), 1)}  "
        f"mean FP {_f(r.get('mean_flip_prob'), 4)}  mFR {_f(r.get('mfr'), 1)}  "
        f"PGD {_f(pgd)}%  filtered-hard {_f(r.get('filtered_hard_acc'))}%"
    )


def run_robustness(cfg: Config, iterations: list[int]) -> list[dict[str, Any]]:
    """`noisystudent robustness`: evaluate the listed iterations of a run; print the table."""
    from ..pipeline import open_run
    from ..stages import load_data

    _validate(cfg.robustness)  # before open_run saves the options into config.yaml
    for i in iterations:
        if not 0 <= i < len(cfg.models):
            raise UserError(f"--iteration {i} is outside models[0..{len(cfg.models) - 1}]")
    run = open_run(cfg)
    data = load_data(cfg, run)
    results = [robustness_stage(cfg, run, data, i) for i in iterations]
    print()
    print(format_table([(f"iter{r['iteration']} {r['model']}", r) for r in results]))
    for r in results:
        print(f"results: {run.iter_dir(r['iteration']) / 'robustness' / RESULTS}")
    return results
