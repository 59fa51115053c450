"""Online patching throughput vs the SSL training step, measured side by side in one run.

For each slide source (real slides from ``../shared/data/slides`` and the bundled sample;
synthetic pyramidal TIFFs made here) the DataLoader of ``pretrain-tiles`` (draw in tissue,
read at the exact µm/px, multi-crop augmentations, in ``--num-workers`` processes) is timed in
samples/s, next to one DINO + iBOT + KoLeo optimizer step of the same config on pre-made
tensors. ratio = loader samples/s ÷ training samples/s; ≥ 1 means the model never waits for
slides. Prints JSON.

    python benchmarks/online_patching.py                       # vit_tiny_dev, CPU recipe
    python benchmarks/online_patching.py --encoder dinov2_vits14 --config default --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from slidefm.encoders.registry import build_model, get_spec
from slidefm.encoders.ssl import DINOModel
from slidefm.encoders.ssl_augment import MultiCrop
from slidefm.runtime import pick_device
from slidefm.train.data import make_loader
from slidefm.train.run_dir import load_run_config
from slidefm.train.tile_ssl import PretrainTilesConfig
from slidefm.wsi.jobs import SlideJob
from slidefm.wsi.online import OnlinePatchDataset, prepare_slides

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SLIDEFM_SHARED_DATA", REPO.parent / "shared" / "data"))


def loader_rate(slides, pcfg, crop, batch_size, workers, batches, seed=0) -> dict:
    ds = OnlinePatchDataset(slides, pcfg, seed, transform=crop)
    dl = make_loader(ds, batch_size, seed=seed, num_workers=workers, drop_last=True)
    it = iter(dl)
    next(it)  # workers started, slides opened
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["global"])
    dt = time.perf_counter() - t0
    del it
    return {"samples_per_s": n / dt, "samples": n, "seconds": round(dt, 3)}


def train_rate(spec, scfg, ccfg, batch_size, steps, device) -> dict:
    model = DINOModel(build_model(spec), scfg, spec.pooling).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {
        "global": torch.randn(batch_size, ccfg.n_global, 3, ccfg.global_size, ccfg.global_size),
        "local": torch.randn(batch_size, ccfg.n_local, 3, ccfg.local_size, ccfg.local_size),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    amp = device.type == "cuda"

    def step(i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.on_optimizer_step(i + 1, 1000)

    step(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"samples_per_s": batch_size * steps / dt, "steps": steps, "seconds": round(dt, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="vit_tiny_dev")
    ap.add_argument("--config", default="synthetic_cpu", help="configs/pretrain_tiles/ name")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--synthetic-slides", type=int, default=4)
    a = ap.parse_args()

    cfg = load_run_config(PretrainTilesConfig, a.config, [], "pretrain_tiles")
    pcfg, ccfg, scfg = cfg.patches, cfg.crops, cfg.ssl
    bs = a.batch_size or cfg.data.batch_size
    spec = get_spec(a.encoder)
    crop = MultiCrop(ccfg, spec.mean, spec.std)
    device = pick_device(a.device)
    torch.manual_seed(0)
    result = {
        "encoder": a.encoder,
        "config": a.config,
        "batch_size": bs,
        "num_workers": a.num_workers,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "train_step": train_rate(spec, scfg, ccfg, bs, a.steps, device),
        "sources": {},
    }
    train_sps = result["train_step"]["samples_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        from slidefm.wsi.synthetic import generate_cohort

        man = generate_cohort(tmp, a.synthetic_slides, seed=0, workers=1, progress=False)
        synth = [SlideJob(r.slide_id, str(Path(tmp) / r.path)) for r in man.itertuples()]
        real = [
            SlideJob(p.stem, str(p))
            for p in [
                REPO / "data" / "sample" / "CMU-1-Small-Region.svs",
                SHARED / "slides" / "test3-DAPI-2-387.ndpi",
            ]
            if p.is_file()
        ]
        for name, jobs in (("real", real), ("synthetic", synth)):
            slides, skipped = prepare_slides(jobs, pcfg)
            r = loader_rate(slides, pcfg, crop, bs, a.num_workers, a.batches)
            r["slides"] = [s.slide_id for s in slides]
            r["skipped"] = [s for s, _ in skipped]
            r["ratio_vs_train_step"] = r["samples_per_s"] / train_sps
            result["sources"][name] = r
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
