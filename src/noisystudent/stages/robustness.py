"""Model i on the robustness suite (robustness/) -> iter<i>/robustness: its results and its
clean predictions (used when it is another model's reference). The cached corrupted and
perturbed arrays live in the decode cache's robustness/ folder (data.cache_dir or the run's)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import load_model
from ..config import Config, RobustnessConfig
from ..data import decode_to_array, scan_class_folders
from ..errors import UserError
from ..inputs import Data
from ..robustness import corruptions as C
from ..robustness import metrics as M
from ..robustness.cache import SuiteCache, subset_indices
from ..robustness.evaluate import SuiteOptions, _guarded, evaluate_hard_set, evaluate_suite
from ..rundir import RunDir, load_tensors, read_json, save_tensors, write_json
from ..rundir.layout import robustness_files
from ..runtime import Runtime


def validate(rc: RobustnessConfig) -> None:
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
        if not (p.is_file() or robustness_files(p)[0].is_file()):
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
    root = run.paths.decode_cache(cfg.data.cache_dir)
    if test.array is None or test.array.shape[1] != data.size:
        test = decode_to_array(test, data.size, root, "test", skip_bad=False, progress=cfg.progress)
    idx = subset_indices(len(test), rc.subset, rc.seed)
    images = np.ascontiguousarray(test.array[idx])
    table = C.choose_table(data.size, rc.table)
    return SuiteCache(
        run.paths.robustness_cache(cfg.data.cache_dir),
        images,
        test.labels[idx],
        table,
        rc.seed,
        rc.frost_dir,
        cfg.progress,
    )


def _options_record(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg.robustness)
    d.pop("enabled", None)
    return d


def _load_reference(path: Path) -> tuple[dict[str, Any], np.ndarray | None]:
    if path.is_dir():
        path = robustness_files(path)[0]
    if not path.is_file():
        raise UserError(
            f"reference results '{path}' not found; give robustness.reference an iteration, a "
            "results.json path, or none"
        )
    ref = read_json(path)
    if not isinstance(ref, dict) or "meta" not in ref:
        raise UserError(f"'{path}' is not a robustness results.json (no 'meta')")
    pp = robustness_files(path.parent)[1]
    pred = load_tensors(pp)["pred"].numpy() if pp.is_file() else None
    return ref, pred


def robustness_stage(cfg: Config, run: RunDir, data: Data, i: int, rt: Runtime) -> dict[str, Any]:
    """Evaluate model i on the robustness suite -> iter<i>/robustness/results.json.

    Skipped when results with the same options exist. The reference (default: iteration 0) is
    evaluated first when its results are missing; model i == reference gets the reference's
    own row (normalised scores 100, filtered-hard accuracy 0 by construction)."""
    rc = cfg.robustness
    validate(rc)
    paths = run.it(i)
    name = paths.stage("robustness")
    options = _options_record(cfg)
    reads = data.read("test")
    if run.stage_done(name, reads) and paths.robustness_results.is_file():
        old = read_json(paths.robustness_results)
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
                robustness_stage(cfg, run, data, r, rt)
                ref_where = run.it(r).robustness_results
                ref, ref_pred = _load_reference(ref_where)
                ref_info = {"iteration": r, "model": cfg.models[r], "results": str(ref_where)}
        else:
            ref_where = Path(spec)
            ref, ref_pred = _load_reference(ref_where)
            ref_info = {"results": str(ref_where), "model": ref.get("model")}

    model, meta = load_model(run, i, role="model")
    cache = open_cache(cfg, run, data)
    ref_label = "none" if ref_info is None else "self" if self_ref else ref_info.get("iteration")
    print(
        f"[iter {i}] robustness of {meta['name']} on {cache.meta['n']} test images "
        f"(table {cache.table}, seed {rc.seed}, reference {ref_label or ref_where})"
    )
    # the reference's results are an input too: its scores normalise this model's
    inputs = [paths.model] + ([ref_where] if ref_where is not None and ref_where.is_file() else [])
    run.mark(name, "running", inputs=inputs)
    t0 = time.time()
    res, pred = evaluate_suite(model, cache, suite_options(cfg), rt, ref, ref_pred, str(ref_where))
    if self_ref:
        _fill_self_reference(res, pred, cache.labels)
    if rc.hard_dir:
        res["hard_set"] = hard_set_results(model, meta, rc.hard_dir, data.size, rt, cfg)
    res = {
        "model": meta["name"],
        "iteration": i,
        "checkpoint": str(paths.model),
        "image_size": data.size,
        "subset": rc.subset,
        "reference": ref_info,
        "options": options,
        **res,
        "total_wall_s": round(time.time() - t0, 2),
    }
    save_tensors(
        paths.robustness_predictions,
        {"pred": torch.from_numpy(pred), "labels": torch.from_numpy(cache.labels)},
    )
    write_json(paths.robustness_results, res)
    run.log(
        stage=name,
        event="robustness",
        clean_top1=res["clean_top1"],
        mce=res["mce"],
        mfr=res["mfr"],
        unnormalized_ce=res["unnormalized_ce"],
    )
    run.mark(name, "done", outputs=[paths.robustness_results, paths.robustness_predictions],
             data=reads)  # fmt: skip
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
    model: torch.nn.Module, meta: dict, hard_dir: str, size: int, rt: Runtime, cfg: Config
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
    out = evaluate_hard_set(model, hard.array, labels, class_idx, rt, cfg.eval_batch_size)
    out["dir"] = str(hard_dir)
    return out
