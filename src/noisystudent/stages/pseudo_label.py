"""Model i, without noise, labels every unlabeled image -> iter<i>/pseudo (store.py format).

Sharded (labeling.py): fixed row ranges of cfg.pseudo.shard_size images, one shard file each;
under torchrun every rank labels its own shards. A killed stage re-labels only the shards that
are missing; shards from another teacher or other data are refused."""

from __future__ import annotations

from .. import distributed as dist
from ..artifacts import load_model
from ..config import Config
from ..data import hidden_labels
from ..inputs import Data
from ..labeling import collect_shards, label_shards
from ..rundir import RunDir, sha256_file, write_json
from ..runtime import Runtime
from ..store import PseudoLabelStore, default_topk, shard_ranges, store_files, write_meta


def pseudo_label_stage(cfg: Config, run: RunDir, data: Data, i: int, rt: Runtime) -> None:
    paths, name = run.it(i), run.it(i).stage("pseudo-label")
    reads = data.read("unlabeled")
    if run.stage_done(name, reads):
        return
    model, meta = load_model(run, i, "teacher", cfg.models[i], data.classes)
    if rt.is_main:
        # shards are kept across a re-run when made for the same teacher and images; one whose
        # bytes no longer match what this stage recorded is labeled again, never re-recorded
        for p in run.manifest.damaged_outputs(name):
            for f in (p, p.with_suffix(".safetensors"), p.with_suffix(".uids")):
                f.unlink(missing_ok=True)  # a shard is its tensors and its uid listing
    dist.barrier()
    run.mark(name, "running")
    p = cfg.pseudo
    c, n = len(data.classes), len(data.unlabeled)
    k = default_topk(c, p.topk)
    ident = {
        "teacher_sha256": sha256_file(paths.model),
        "data_fingerprint": data.fingerprints["unlabeled"],
        "k": str(k),
        "temperature": str(p.temperature),
    }
    if rt.is_main:
        paths.pseudo_meta.unlink(missing_ok=True)
    dist.barrier()
    written = label_shards(model, data.unlabeled, data.size, paths.pseudo, c, k, p.temperature,
                           ident, p.shard_size, p.batch_size, rt, cfg.data.num_workers)  # fmt: skip
    if len(written) < len(range(rt.rank, len(shard_ranges(n, p.shard_size)), rt.world)):
        run.log(stage=name, event="resume", relabeled_shards=written)
    dist.barrier()
    if not rt.is_main:
        return
    shards = collect_shards(paths.pseudo, n, p.shard_size, ident)
    teacher = {"model": meta["name"], "iteration": i, "mode": p.mode}
    write_meta(paths.pseudo, c, k, p.temperature, teacher, shards, ident)
    store = PseudoLabelStore.load(paths.pseudo, expect=ident)
    # audit against the hidden labels, where the unlabeled images have them
    hidden = hidden_labels(data.unlabeled, store.index)
    known = hidden >= 0
    audited = int(known.sum())
    correct = int((store.pred[known] == hidden[known]).sum())
    audit = {"audited": audited, "accuracy": 100.0 * correct / audited if audited else None}
    write_json(paths.audit, audit)
    run.log(stage=name, event="pseudo-label", count=len(store), audit_acc=audit["accuracy"])
    run.mark(name, "done", inputs=[paths.model], data=reads,
             outputs=store_files(paths.pseudo, shards) + [paths.audit])  # fmt: skip
    # labels made again (a changed teacher or images, a damaged shard): their selection is made
    # again too, from these very files, rather than kept because the bytes happen to match
    run.manifest.invalidate(paths.stage("select"), f"{name} ran again")
