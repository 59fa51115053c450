"""The shared training loop: exact resume, LR schedule, accumulation, clipping, outputs."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from bag_utils import write_random_bags
from torch import nn
from torch.utils.data import Dataset

from slidefm.io.bags import FeatureBagDataset, collate_bags
from slidefm.train.data import make_loader
from slidefm.train.loop import TrainConfig, Trainer, latest_checkpoint


class TinyBagModel(nn.Module):
    """Tile MLP with dropout → masked mean → scalar; also sees the grid."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.tile = nn.Sequential(nn.Linear(dim + 2, 16), nn.GELU(), nn.Dropout(0.3))
        self.head = nn.Linear(16, 1)

    def forward(self, batch):
        x = torch.cat([batch["features"], batch["grid"].float() / 10], dim=-1)
        h = self.tile(x)
        keep = (~batch["padding_mask"]).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1)
        pred = self.head(pooled).squeeze(-1)
        # Random targets: the loss itself consumes the global RNG, as masking will.
        target = batch["features"].mean(dim=(1, 2)) + 0.1 * torch.randn_like(pred)
        loss = ((pred - target) ** 2).mean()
        return loss, {"pred_mean": float(pred.detach().mean())}


def call_model(model, batch):
    return model(batch)


def bag_loader(folder, seed=5, batch_size=3):
    ds = FeatureBagDataset(folder, crop=(3, 6), augment=True, max_tiles=30, seed=1)
    return make_loader(ds, batch_size=batch_size, seed=seed, collate_fn=collate_bags)


def _cfg(out, **kw):
    base = dict(
        max_steps=10,
        lr=1e-2,
        warmup_steps=2,
        accum_steps=2,
        grad_clip=0.5,
        ckpt_every=3,
        log_every=1,
        out_dir=str(out),
        seed=11,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ckpt_every", [2, 5])
def test_exact_resume_matches_uninterrupted_run(tmp_path, ckpt_every):
    """10 steps straight == stop after 7 (checkpoints at ckpt_every) + resume to 10.

    10 bags / batch 3 = 4 batches per epoch, accumulation 2: the run crosses epochs; the
    checkpoint at step 6 (every 2) ends an epoch exactly while the one at step 5 lies inside one.
    """
    write_random_bags(tmp_path / "bags", num=10)
    torch.manual_seed(0)
    straight = TinyBagModel()
    Trainer(
        straight,
        call_model,
        bag_loader(tmp_path / "bags"),
        _cfg(tmp_path / "a", ckpt_every=ckpt_every),
    ).fit()

    torch.manual_seed(0)
    first = TinyBagModel()
    rows1 = Trainer(
        first,
        call_model,
        bag_loader(tmp_path / "bags"),
        _cfg(tmp_path / "b", ckpt_every=ckpt_every),
    ).fit(stop_at_step=7)
    assert rows1[-1]["step"] == 7
    ck = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ck.name == f"step_{(7 // ckpt_every) * ckpt_every:08d}.pt"

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = TinyBagModel()
    rows2 = Trainer(
        resumed,
        call_model,
        bag_loader(tmp_path / "bags"),
        _cfg(tmp_path / "b", ckpt_every=ckpt_every),
    ).fit()

    a, b = _params(straight), _params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Same logged losses at every step, including the re-run steps after the checkpoint.
    ra = read_csv(tmp_path / "a" / "metrics.csv")
    rb = read_csv(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in rb] == [str(s) for s in range(1, 11)]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert rows2[-1]["step"] == 10
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 1000

    # The equality above is not vacuous: another seed or no resume gives other parameters.
    torch.manual_seed(0)
    other = TinyBagModel()
    Trainer(other, call_model, bag_loader(tmp_path / "bags"), _cfg(tmp_path / "c", seed=12)).fit()
    assert not torch.equal(_params(other)["head.weight"], a["head.weight"])


def test_lr_schedule_matches_formula(tmp_path):
    x = torch.randn(32, 3)
    data = [(x[i : i + 4], x[i : i + 4].sum(1)) for i in range(0, 32, 4)]
    model = nn.Linear(3, 1)
    cfg = _cfg(tmp_path, max_steps=20, lr=0.5, warmup_steps=4, min_lr_ratio=0.1, accum_steps=1)
    rows = Trainer(
        model,
        lambda m, b: (((m(b[0]).squeeze(-1) - b[1]) ** 2).mean(), {}),
        lambda epoch: data,
        cfg,
    ).fit()
    got = [r["lr"] for r in rows]
    expected = []
    for s in range(20):  # lr of optimizer step s (0-based)
        f = (s + 1) / 4 if s < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))
        expected.append(0.5 * f)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[3] == 0.5 and got[-1] > 0.05


class Regression(Dataset):
    def __init__(self, n=16, d=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, generator=g) + 0.1 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def mse(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean(), {}


def test_accumulation_equals_big_batch(tmp_path):
    ds = Regression()
    results = []
    for bs, accum in ((4, 2), (8, 1)):
        torch.manual_seed(0)
        model = nn.Linear(5, 1)
        cfg = _cfg(tmp_path / f"{bs}", max_steps=6, accum_steps=accum, lr=0.05, grad_clip=0)
        Trainer(model, mse, make_loader(ds, bs, seed=3, drop_last=True), cfg).fit()
        results.append(_params(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)
    # and batch 4 without accumulation differs (so the test can fail)
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    cfg = _cfg(tmp_path / "x", max_steps=6, accum_steps=1, lr=0.05, grad_clip=0)
    Trainer(model, mse, make_loader(ds, 4, seed=3, drop_last=True), cfg).fit()
    assert not torch.allclose(_params(model)["weight"], results[1]["weight"], atol=1e-4)


def test_grad_clipping(tmp_path):
    ds = Regression(seed=1)
    ds.y = ds.y * 1000  # huge loss → huge gradients
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    ref = copy.deepcopy(model)
    loader = make_loader(ds, 8, seed=3)
    x, y = next(iter(loader))
    mse(ref, (x, y))[0].backward()
    pre_clip = torch.cat([p.grad.ravel() for p in ref.parameters()]).norm().item()
    assert pre_clip > 10

    seen = []
    cfg = _cfg(tmp_path, max_steps=1, accum_steps=1, grad_clip=2.0, warmup_steps=0)
    tr = Trainer(model, mse, loader, cfg)
    tr.optimizer.register_step_pre_hook(
        lambda opt, *a: seen.append(
            torch.cat([p.grad.ravel() for g in opt.param_groups for p in g["params"]]).norm().item()
        )
    )
    rows = tr.fit()
    assert rows[-1]["grad_norm"] == pytest.approx(pre_clip, rel=1e-5)
    assert seen[0] == pytest.approx(2.0, rel=1e-5)


def test_outputs_eval_and_hooks(tmp_path):
    ds = Regression()
    calls = []

    def eval_fn(m):
        assert not m.training
        calls.append("eval")
        return {"eval_loss": 0.5, "rankme": 3.0}

    cfg = _cfg(tmp_path, max_steps=6, accum_steps=1, log_every=2, eval_every=3, ckpt_every=0)
    tr = Trainer(
        nn.Linear(5, 1),
        mse,
        make_loader(ds, 4, seed=0),
        cfg,
        eval_fn=eval_fn,
        hooks=[(2, lambda t: {"hook_step": t.step})],
    )
    rows = tr.fit()
    assert calls == ["eval", "eval"]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [2, 3, 4, 6]
    assert "loss" in by_step[2] and "rankme" in by_step[3] and "loss" not in by_step[3]
    assert by_step[4]["hook_step"] == 4 and by_step[6]["rankme"] == 3.0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000006.pt"]
    header = list(read_csv(tmp_path / "metrics.csv")[0])
    assert {"step", "loss", "lr", "grad_norm", "rankme", "hook_step"} <= set(header)


def test_empty_data_is_an_error(tmp_path):
    tr = Trainer(nn.Linear(2, 1), mse, lambda e: [], _cfg(tmp_path))
    with pytest.raises(ValueError, match="no batches"):
        tr.fit()


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from torch import nn
from slidefm.runtime import dist_info
from slidefm.train.data import make_loader
from slidefm.train.loop import Trainer, TrainConfig
from test_train_loop import Regression, mse
out, stop, dropout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
model = nn.Sequential(nn.Dropout(dropout), nn.Linear(5, 1))
cfg = TrainConfig(max_steps=4, lr=0.05, warmup_steps=1, grad_clip=0, ckpt_every=2,
                  out_dir=out, progress=False)
Trainer(model, mse, make_loader(Regression(), 4, seed=3, drop_last=True), cfg).fit(stop or None)
if dist_info()[0] == 0:
    torch.save(model.state_dict(), out + "/final.pt")
"""


@pytest.mark.slow
def test_ddp_matches_single_process_and_resumes_exactly(tmp_path):
    """torchrun, 2 CPU ranks (gloo):
    - 2 ranks × batch 4 == 1 process × batch 8 (the ResumableSampler interleaves the shuffled
      indices across ranks and DDP averages the gradients);
    - with dropout (per-rank RNG), stop at step 2 + resume == uninterrupted, bit for bit."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))

    def torchrun(out, stop, dropout):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        cmd += [str(script), str(out), str(stop), str(dropout)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return torch.load(out / "final.pt")

    ddp = torchrun(tmp_path / "ddp", 0, 0.0)
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000004.pt").is_file()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.0), nn.Linear(5, 1))
    cfg = _cfg(tmp_path / "one", max_steps=4, lr=0.05, warmup_steps=1, grad_clip=0, accum_steps=1)
    Trainer(model, mse, make_loader(Regression(), 8, seed=3, drop_last=True), cfg).fit()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)

    straight = torchrun(tmp_path / "a", 0, 0.5)
    torchrun(tmp_path / "b", 2, 0.5)
    resumed = torchrun(tmp_path / "b", 0, 0.5)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert not torch.equal(straight["1.weight"], ddp["1.weight"])  # dropout mattered


# -- model selection (select_metric) -------------------------------------------------------
VAL_CURVE = {2: 3.0, 4: 1.5, 6: 0.7, 8: 2.5, 10: 4.0}  # U-shaped: best (min) at step 6


def _scripted_eval(snapshots):
    """eval_fn returning VAL_CURVE[step] and recording the weights it was evaluated on."""
    state = {"step": 0}

    def eval_fn(m):
        state["step"] += 2
        snapshots[state["step"]] = _params(m)
        return {"val_loss": VAL_CURVE[state["step"]], "val_acc": -VAL_CURVE[state["step"]]}

    return eval_fn


@pytest.mark.parametrize("metric,mode", [("val_loss", "min"), ("val_acc", "max")])
def test_select_metric_keeps_the_best_step(tmp_path, metric, mode):
    """The run ends holding the weights evaluated at the step with the best value (argmin /
    argmax of the scripted curve, not the last step), says which, and the last checkpoint
    still holds the last step for exact resume."""
    snaps: dict[int, dict] = {}
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, max_steps=10, accum_steps=1, eval_every=2, ckpt_every=5,
               select_metric=metric, select_mode=mode)  # fmt: skip
    tr = Trainer(nn.Linear(5, 1), mse, make_loader(Regression(), 4, seed=0), cfg,
                 eval_fn=_scripted_eval(snaps))  # fmt: skip
    tr.fit()
    want = min(VAL_CURVE, key=VAL_CURVE.get)  # 6 either way (val_acc = -val_loss)
    assert tr.selection["step"] == want and tr.selection["restored"]
    assert tr.selection["last_step"] == 10
    for k, v in _params(tr.module).items():
        assert torch.equal(v, snaps[want][k])
    assert not torch.equal(_params(tr.module)["weight"], snaps[10]["weight"])
    last = torch.load(tmp_path / "checkpoints" / "step_00000010.pt", weights_only=True)
    assert torch.equal(last["model"]["weight"], snaps[10]["weight"])


def test_select_metric_survives_resume(tmp_path):
    """Stop at step 7 (checkpoint at 5, best at 6 saved after it), resume: same selection and
    weights as an uninterrupted run."""

    def run(out, stop=None):
        torch.manual_seed(0)
        snaps: dict[int, dict] = {}
        cfg = _cfg(out, max_steps=10, accum_steps=1, eval_every=2, ckpt_every=5,
                   select_metric="val_loss")  # fmt: skip
        ev = _scripted_eval(snaps)
        tr = Trainer(nn.Linear(5, 1), mse, make_loader(Regression(), 4, seed=0), cfg, eval_fn=ev)
        tr.fit(stop)
        return tr

    ref = run(tmp_path / "ref")
    part = run(tmp_path / "res", stop=7)
    assert part.selection is None  # unfinished runs select nothing
    torch.manual_seed(123)  # a fresh process: different init, restored from the checkpoint
    cfg = _cfg(tmp_path / "res", max_steps=10, accum_steps=1, eval_every=2, ckpt_every=5,
               select_metric="val_loss")  # fmt: skip
    state = {"step": 4}  # resumed at step 5: the next evaluation is step 6's

    def resumed_eval(m):
        state["step"] += 2
        return {"val_loss": VAL_CURVE[state["step"]]}

    tr = Trainer(nn.Linear(5, 1), mse, make_loader(Regression(), 4, seed=0), cfg,
                 eval_fn=resumed_eval)  # fmt: skip
    tr.fit()
    assert tr.selection["step"] == ref.selection["step"] == 6
    for k, v in _params(tr.module).items():
        assert torch.allclose(v, _params(ref.module)[k], atol=1e-6)


def test_select_metric_never_evaluated_keeps_last(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, max_steps=4, accum_steps=1, select_metric="val_loss")
    tr = Trainer(nn.Linear(5, 1), mse, make_loader(Regression(), 4, seed=0), cfg,
                 eval_fn=lambda m: {})  # fmt: skip
    tr.fit()
    assert tr.selection == {"metric": "val_loss", "mode": "min", "last_step": 4,
                            "value": None, "step": 4, "restored": False}  # fmt: skip
    assert "never evaluated" in caplog.text
    with pytest.raises(ValueError, match="select_mode"):
        Trainer(nn.Linear(5, 1), mse, lambda e: [], _cfg(tmp_path, select_mode="lowest"))


# -- early stopping (ModelSelection callback with patience) ---------------------------------
def _early_stop_run(out, scores, patience, first_always=False, stop=None):
    """Evaluate every 2 steps; the i-th evaluation scores ``scores[i]`` (NaN = undefined)."""
    from slidefm.train.loop import ModelSelection

    torch.manual_seed(0)
    snaps: dict[int, dict] = {}
    holder: dict[str, Trainer] = {}

    def eval_fn(m):
        step = holder["tr"].step
        snaps[step] = _params(m)
        return {"val_score": scores[step // 2 - 1]}

    sel = ModelSelection(lambda m: m["val_score"], out / "best.pt", patience=patience,
                         first_always=first_always)  # fmt: skip
    cfg = _cfg(out, max_steps=2 * len(scores), accum_steps=1, eval_every=2, ckpt_every=3)
    tr = Trainer(nn.Linear(5, 1), mse, make_loader(Regression(), 4, seed=0), cfg,
                 eval_fn=eval_fn, callbacks=[sel])  # fmt: skip
    holder["tr"] = tr
    tr.fit(stop)
    return tr, snaps


def test_early_stopping_stops_where_the_patience_rule_says(tmp_path):
    """Scores 1, 3, 3 (a tie is no improvement), 2, 9, …, patience 2: the best is evaluation 1
    (step 4) and evaluation 3 (step 8) is the second without improvement, so the run stops at
    step 8 of 20 holding step 4's weights. A run interrupted at step 7 and resumed from its
    step-6 checkpoint stops at step 8 too: the best (found before the checkpoint and not
    replayed) comes back with the checkpoint."""
    scores = [1.0, 3.0, 3.0, 2.0, 9.0, 9.5, 9.7, 9.8, 9.9, 10.0]
    tr, snaps = _early_stop_run(tmp_path / "a", scores, patience=2)
    assert tr.step == 8 and tr.should_stop
    assert tr.selection["step"] == 4 and tr.selection["restored"]
    for k, v in _params(tr.module).items():
        assert torch.equal(v, snaps[4][k])
    _early_stop_run(tmp_path / "b", scores, patience=2, stop=7)
    again, _ = _early_stop_run(tmp_path / "b", scores, patience=2)
    assert again.step == 8 and again.selection["step"] == 4
    for k, v in _params(again.module).items():
        torch.testing.assert_close(v, snaps[4][k])


def test_early_stopping_with_undefined_scores(tmp_path):
    """Every score NaN, patience 2: ``first_always`` keeps evaluation 0 (step 2) as the best
    and stops at evaluation 2 (step 6); without it nothing is ever best, counting starts before
    evaluation 0, and the run stops at evaluation 1 (step 4) keeping its last weights."""
    nan = [float("nan")] * 6
    tr, snaps = _early_stop_run(tmp_path / "a", nan, patience=2, first_always=True)
    assert tr.step == 6 and tr.selection["step"] == 2 and tr.selection["restored"]
    for k, v in _params(tr.module).items():
        assert torch.equal(v, snaps[2][k])
    tr, snaps = _early_stop_run(tmp_path / "b", nan, patience=2)
    assert tr.step == 4 and not tr.selection["restored"]
    for k, v in _params(tr.module).items():
        assert torch.equal(v, snaps[4][k])
